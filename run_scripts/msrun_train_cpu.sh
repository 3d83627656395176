#!/usr/bin/env bash
# Data-parallel training on one machine's CPU with msrun (mccl backend):
#   run_scripts/msrun_train_cpu.sh WORKERS CONFIG.yaml [--key.path=value ...]
# Logs go to $LOG_DIR (default ./msrun_log); MASTER_PORT defaults to 8118.
set -euo pipefail
workers=${1:?usage: $0 WORKERS CONFIG.yaml [overrides...]}
config=${2:?usage: $0 WORKERS CONFIG.yaml [overrides...]}
shift 2
cli=$(python -c 'import telechat_ms.cli as c; print(c.__file__)')
exec msrun --worker_num="$workers" --local_worker_num="$workers" --master_port="${MASTER_PORT:-8118}" \
  --log_dir="${LOG_DIR:-./msrun_log}" --join=True --cluster_time_out="${CLUSTER_TIMEOUT:-600}" \
  "$cli" train --config "$config" "$@"
