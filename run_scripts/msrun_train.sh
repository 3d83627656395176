#!/usr/bin/env bash
# Single-node training on Atlas 800T A2 with msrun (all workers on this machine):
#
#   run_scripts/msrun_train.sh CONFIG.yaml [WORKERS=8] [--key.path=value ...]
#
# e.g. run_scripts/msrun_train.sh yaml_configs/7b/finetune_telechat2_7b.yaml 8
# Environment: MASTER_PORT (8118), LOG_DIR (./output/msrun_log), JOIN (True), CLUSTER_TIME_OUT (600), DRY_RUN=1
# prints the msrun command. `telechat-ms plan` runs first and the launch is refused for an invalid layout.
set -euo pipefail
config=${1:?usage: $0 CONFIG.yaml [WORKERS] [overrides...]}
shift
workers=8
if [[ $# -gt 0 && $1 != --* ]]; then workers=$1; shift; fi
exec "$(dirname "$0")/msrun_train_multinode.sh" "$config" "$workers" "$workers" 127.0.0.1 "${MASTER_PORT:-8118}" 0 \
  "${LOG_DIR:-./output/msrun_log}" "${JOIN:-True}" "${CLUSTER_TIME_OUT:-600}" "$@"
