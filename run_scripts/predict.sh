#!/usr/bin/env bash
# Single-process TeleChat2 prediction (a thin shell around `telechat-ms generate`):
#
#   run_scripts/predict.sh MODEL_DIR --prompt "你好"
#   run_scripts/predict.sh MODEL_DIR --input prompts.jsonl --output answers.jsonl [--batch-size 8]
#
# Any other `telechat-ms generate` option passes through (--max-new-tokens, --do-sample, --top-p, --seed, ...);
# unset decoding options come from MODEL_DIR/generation_config.json. DEVICE_TARGET: CPU (default), Ascend or GPU.
set -euo pipefail
model=${1:?usage: $0 MODEL_DIR (--prompt TEXT | --input IN.jsonl --output OUT.jsonl) [options]}
shift
exec python -m telechat_ms.cli generate "$model" --device-target "${DEVICE_TARGET:-CPU}" "$@"
