#!/usr/bin/env bash
# Prediction under msrun (one node), in one of two forms.
#
# 1. A predict YAML (model parallel for 35B / 115B, or data-parallel replicas): the worker count is the YAML's
#    data_parallel x model_parallel (x pipeline_stage x context_parallel, both 1 for predict), or WORKERS if given;
#    `telechat-ms plan` checks the YAML against that launch first and the launch is refused when it is invalid.
#
#   run_scripts/msrun_predict.sh CONFIG.yaml [WORKERS] (--prompt TEXT | --input IN.jsonl [--output OUT.jsonl]) \
#       [generate options] [--key.path=value ...]
#
#   e.g. TeleChat2-115B on one Atlas 800T A2 (8 NPUs, model_parallel 8):
#   run_scripts/msrun_predict.sh yaml_configs/115b/predict_telechat2_115b.yaml --input q.jsonl --output a.jsonl \
#       --load_checkpoint=/data/telechat2-115b
#   Rank 0 writes the output (or prints the --prompt answer); the other ranks step in lockstep with it.
#
#   run_scripts/msrun_predict.sh CONFIG.yaml [WORKERS] serve [serve options] [--key.path=value ...]
#   run_scripts/msrun_predict.sh CONFIG.yaml [WORKERS] eval --tasks ... --data-dir DIR [eval options]
#
#   serves the same job over HTTP (`telechat-ms serve --config`): rank 0 owns --host/--port (default
#   127.0.0.1:8000) and its continuous-batching engine drives every rank in lockstep.
#
# 2. Data-parallel replicas without a YAML: every worker holds a full model and answers lines rank, rank+WORKERS, ...;
#    rank 0 merges the parts into OUTPUT in input order.
#
#   run_scripts/msrun_predict.sh WORKERS MODEL_DIR INPUT.jsonl OUTPUT.jsonl [generate options...]
#
# Environment: MASTER_PORT (8128), LOG_DIR (./output/msrun_predict_log), CLUSTER_TIME_OUT (600), PYTHON (python),
# NPUS_PER_NODE (8, form 1: checked by plan), DEVICE_TARGET (form 2 only: Ascend; CPU works too with the mccl
# backend). DRY_RUN=1 prints the msrun command instead of running it.
set -euo pipefail
usage="usage: $0 CONFIG.yaml [WORKERS] (--prompt TEXT | --input IN.jsonl [--output OUT.jsonl]) [options]
   or: $0 CONFIG.yaml [WORKERS] serve [serve options]
   or: $0 WORKERS MODEL_DIR INPUT.jsonl OUTPUT.jsonl [options]"
[[ $# -ge 1 ]] || { echo "$usage" >&2; exit 2; }
PYTHON=${PYTHON:-python}
cli=$("$PYTHON" -c 'import telechat_ms.cli as c; print(c.__file__)')
log_dir=${LOG_DIR:-./output/msrun_predict_log}
run() {  # run WORKERS MSRUN_OPTION CLI_ARGS...
  local workers=$1 option=$2; shift 2
  local cmd=(msrun --worker_num="$workers" --local_worker_num="$workers" --master_port="${MASTER_PORT:-8128}"
             --log_dir="$log_dir" --join=True --cluster_time_out="${CLUSTER_TIME_OUT:-600}" "$option" "$cli" "$@")
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
  mkdir -p "$log_dir"
  exec "${cmd[@]}"
}

if [[ $1 == *.yaml || $1 == *.yml ]]; then
  config=$1; shift
  overrides=()
  for a in "$@"; do [[ $a =~ ^--[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z0-9_.]+= ]] && overrides+=("$a"); done
  need=$("$PYTHON" -c 'import sys
from telechat_ms.errors import TeleChatError
from telechat_ms.job_config import load_job_config
try:
    print(load_job_config(sys.argv[1], sys.argv[2:]).parallel_config.world_size)
except TeleChatError as exc:
    sys.exit(f"error: {exc}")' "$config" "${overrides[@]}") || {
    echo "$0: refusing to launch: cannot read $config" >&2; exit 1; }
  workers=$need
  if [[ $# -gt 0 && $1 != -* && $1 != serve && $1 != eval ]]; then workers=$1; shift; fi
  [[ $workers =~ ^[1-9][0-9]*$ ]] || { echo "$0: WORKERS '$workers' is not a positive integer; $usage" >&2; exit 2; }
  set +e
  "$PYTHON" -m telechat_ms.cli plan --config "$config" --workers "$workers" --npus-per-node "${NPUS_PER_NODE:-8}" \
    "${overrides[@]}"
  rc=$?
  set -e
  if (( rc == 1 || rc == 2 )); then
    echo "$0: refusing to launch: telechat-ms plan rejected $config for $workers worker(s)" >&2; exit 1
  elif (( rc == 3 )); then
    echo "$0: warning: the memory estimate exceeds the limit; launching anyway" >&2
  fi
  # rank 0 prints the answers / serves HTTP (the other ranks only follow): only its log is shown; all are in LOG_DIR
  if [[ $# -gt 0 && $1 == serve ]]; then
    shift
    run "$workers" --tail_worker_log=0 serve --config "$config" "$@"
  fi
  if [[ $# -gt 0 && $1 == eval ]]; then      # model parallel: rank 0 evaluates through the leader stepper
    shift
    run "$workers" --tail_worker_log=0 eval --config "$config" "$@"
  fi
  run "$workers" --tail_worker_log=0 generate --config "$config" --quiet "$@"
fi

workers=$1
model=${2:?$usage}
input=${3:?$usage}
output=${4:?$usage}
shift 4
[[ $workers =~ ^[1-9][0-9]*$ ]] || { echo "$0: WORKERS '$workers' is not a positive integer; $usage" >&2; exit 2; }
run "$workers" --tail_worker_log=-1 generate "$model" --input "$input" --output "$output" --data-parallel --quiet \
  --device-target "${DEVICE_TARGET:-Ascend}" "$@"
