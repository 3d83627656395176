#!/usr/bin/env bash
# Multi-node training on Atlas 800T A2 with msrun. Run the same command on every node; only NODE_RANK differs.
#
#   run_scripts/msrun_train_multinode.sh CONFIG.yaml WORKER_NUM LOCAL_WORKER_NUM MASTER_ADDR MASTER_PORT NODE_RANK \
#       [LOG_DIR=./output/msrun_log] [JOIN=False] [CLUSTER_TIME_OUT=600] [--key.path=value ...]
#
# Example, TeleChat2-115B (64 NPUs = 8 nodes x 8), on node 0 (master 192.168.1.1):
#   run_scripts/msrun_train_multinode.sh yaml_configs/115b/finetune_telechat2_115b.yaml 64 8 192.168.1.1 8118 0
#
# `telechat-ms plan` checks the YAML against WORKER_NUM / LOCAL_WORKER_NUM first and the launch is refused when the
# layout is invalid (exit 1), e.g. 16 workers for a YAML that needs dp x mp x pp x cp = 64. A plan that is valid
# but estimated over memory only warns. DRY_RUN=1 prints the msrun command instead of running it.
set -euo pipefail
usage="usage: $0 CONFIG.yaml WORKER_NUM LOCAL_WORKER_NUM MASTER_ADDR MASTER_PORT NODE_RANK [LOG_DIR] [JOIN] [TIMEOUT] [overrides...]"
config=${1:?$usage}; worker_num=${2:?$usage}; local_worker_num=${3:?$usage}
master_addr=${4:?$usage}; master_port=${5:?$usage}; node_rank=${6:?$usage}
shift 6
log_dir=./output/msrun_log; join=False; timeout=600
if [[ $# -gt 0 && $1 != --* ]]; then log_dir=$1; shift; fi
if [[ $# -gt 0 && $1 != --* ]]; then join=$1; shift; fi
if [[ $# -gt 0 && $1 != --* ]]; then timeout=$1; shift; fi
for n in "$worker_num" "$local_worker_num" "$node_rank" "$master_port" "$timeout"; do
  [[ $n =~ ^[0-9]+$ ]] || { echo "$0: '$n' is not a non-negative integer; $usage" >&2; exit 2; }
done
if (( worker_num % local_worker_num != 0 )); then
  echo "$0: WORKER_NUM $worker_num is not a multiple of LOCAL_WORKER_NUM $local_worker_num" >&2; exit 2
fi
if (( node_rank >= worker_num / local_worker_num )); then
  echo "$0: NODE_RANK $node_rank out of range for $((worker_num / local_worker_num)) node(s)" >&2; exit 2
fi
PYTHON=${PYTHON:-python}
set +e
"$PYTHON" -m telechat_ms.cli plan --config "$config" --workers "$worker_num" \
  --npus-per-node "$local_worker_num" "$@"
rc=$?
set -e
if (( rc == 1 || rc == 2 )); then
  echo "$0: refusing to launch: telechat-ms plan rejected $config for $worker_num workers" >&2; exit 1
elif (( rc == 3 )); then
  echo "$0: warning: the memory estimate exceeds the limit; launching anyway" >&2
fi
cli=$("$PYTHON" -c 'import telechat_ms.cli as c; print(c.__file__)')
cmd=(msrun --worker_num="$worker_num" --local_worker_num="$local_worker_num" --master_addr="$master_addr"
     --master_port="$master_port" --node_rank="$node_rank" --log_dir="$log_dir" --join="$join"
     --cluster_time_out="$timeout" "$cli" train --config "$config" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
mkdir -p "$log_dir"
exec "${cmd[@]}"
