#!/usr/bin/env bash
# Data-parallel evaluation under msrun (one node): every worker holds the whole model (`telechat-ms eval
# --data-parallel`) and scores the samples whose doc_id % WORKERS == its rank; the records are gathered over the
# workers' communication and rank 0 writes OUT/results.{md,json} (and --log-samples files), the same report one
# process writes. For 35B / 115B (model parallel) use run_scripts/msrun_predict.sh CONFIG.yaml eval ... instead.
#
#   run_scripts/msrun_eval.sh WORKERS MODEL_DIR --tasks ceval,mmlu,gsm8k --data-dir DIR [--output OUT] [options]
#
#   e.g. TeleChat2-7B on one Atlas 800T A2, 8 replicas:
#   run_scripts/msrun_eval.sh 8 /data/telechat2-7b --tasks ceval,mmlu,cmmlu --data-dir ~/benchmarks --output out/eval
#
# Environment: MASTER_PORT (8138), LOG_DIR (./output/msrun_eval_log), CLUSTER_TIME_OUT (600), PYTHON (python),
# DEVICE_TARGET (Ascend; CPU works with the mccl backend). Only rank 0's log is shown (all are in LOG_DIR).
# DRY_RUN=1 prints the msrun command instead of running it.
set -euo pipefail
usage="usage: $0 WORKERS MODEL_DIR --tasks T1,T2 --data-dir DIR [telechat-ms eval options]"
[[ $# -ge 2 ]] || { echo "$usage" >&2; exit 2; }
workers=$1
model=$2
shift 2
[[ $workers =~ ^[1-9][0-9]*$ ]] || { echo "$0: WORKERS '$workers' is not a positive integer; $usage" >&2; exit 2; }
PYTHON=${PYTHON:-python}
cli=$("$PYTHON" -c 'import telechat_ms.cli as c; print(c.__file__)')
log_dir=${LOG_DIR:-./output/msrun_eval_log}
cmd=(msrun --worker_num="$workers" --local_worker_num="$workers" --master_port="${MASTER_PORT:-8138}"
     --log_dir="$log_dir" --join=True --cluster_time_out="${CLUSTER_TIME_OUT:-600}" --tail_worker_log=0
     "$cli" eval "$model" --data-parallel --device-target "${DEVICE_TARGET:-Ascend}" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
mkdir -p "$log_dir"
exec "${cmd[@]}"
