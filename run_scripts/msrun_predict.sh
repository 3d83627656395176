#!/usr/bin/env bash
# Data-parallel batch prediction with msrun (one node): every worker holds a full model replica and answers lines
# rank, rank+WORKERS, ...; rank 0 merges the parts into OUTPUT in input order.
#
#   run_scripts/msrun_predict.sh WORKERS MODEL_DIR INPUT.jsonl OUTPUT.jsonl [generate options...]
#
# e.g. on Atlas 800T A2: run_scripts/msrun_predict.sh 8 /data/telechat2-7b prompts.jsonl answers.jsonl --batch-size 8
# Environment: DEVICE_TARGET (Ascend; CPU works too, mccl backend), MASTER_PORT (8128), LOG_DIR (./output/msrun_predict_log),
# CLUSTER_TIME_OUT (600). Models that do not fit one device (35B, 115B) need model-parallel inference, which this
# launcher does not provide.
set -euo pipefail
usage="usage: $0 WORKERS MODEL_DIR INPUT.jsonl OUTPUT.jsonl [options]"
workers=${1:?$usage}
model=${2:?$usage}
input=${3:?$usage}
output=${4:?$usage}
shift 4
cli=$(python -c 'import telechat_ms.cli as c; print(c.__file__)')
exec msrun --worker_num="$workers" --local_worker_num="$workers" --master_port="${MASTER_PORT:-8128}" \
  --log_dir="${LOG_DIR:-./output/msrun_predict_log}" --join=True --cluster_time_out="${CLUSTER_TIME_OUT:-600}" \
  "$cli" generate "$model" --input "$input" --output "$output" --data-parallel --quiet \
  --device-target "${DEVICE_TARGET:-Ascend}" "$@"
