#!/usr/bin/env bash
# Serve a `telechat-ms convert ms2hf` export with vLLM (GPU) or vLLM-MindSpore (Ascend NPU), OpenAI-compatible.
#
#   run_scripts/serve_vllm.sh MODEL_DIR [TP]
#
# MODEL_DIR  an HF export written by `telechat-ms convert ms2hf` (or save_pretrained(fmt="hf") / lora merge
#            --format hf): config.json with architectures TeleChat2ForCausalLM, its configuration module, weights,
#            and the tokenizer files. Anything else is refused before vLLM starts.
# TP         tensor-parallel size (default 1): GPUs / NPUs one model is split across; n_head must divide by it.
#
# Environment:
#   BACKEND            auto (default) | vllm | vllm-mindspore. auto picks vllm-mindspore when an Ascend NPU is
#                      visible (npu-smi on PATH or ASCEND_HOME_PATH set), else vllm.
#   HOST, PORT         bind address (default 127.0.0.1:8000).
#   SERVED_MODEL_NAME  the model name clients send (default: the directory's name).
#   MAX_MODEL_LEN      prompt + answer limit (default: seq_length from config.json). Past training_seqlen vLLM uses
#                      plain RoPE, not TeleChat2's NTK + mscale rule: long prompts are not the released function.
#   DTYPE              auto (default: the weights' dtype, fp32 downcast by vLLM) | bfloat16 | float16 | float32.
#   EXTRA_ARGS         appended to the command line as is (word-split).
#   DRY_RUN=1          print the command instead of running it.
#   PYTHON             interpreter used to read config.json (default python3).
set -euo pipefail

die() { echo "serve_vllm.sh: error: $*" >&2; exit 2; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: serve_vllm.sh MODEL_DIR [TP]"
MODEL_DIR=$1
TP=${2:-1}
[[ -d $MODEL_DIR ]] || die "$MODEL_DIR: no such directory"
[[ $TP =~ ^[1-9][0-9]*$ ]] || die "TP must be a positive integer, got '$TP'"

# Check the directory is an export and read what the command needs (prints: seq_length n_head num_key_value_heads).
read -r SEQ_LENGTH N_HEAD N_KV < <("${PYTHON:-python3}" - "$MODEL_DIR" "$TP" <<'PY' || echo "FAILED"
import glob, json, os, sys

d, tp = sys.argv[1], int(sys.argv[2])
hint = "make one with: telechat-ms convert ms2hf SRC_DIR DST_DIR"

def fail(msg):
    print(f"serve_vllm.sh: error: {d}: {msg}", file=sys.stderr)
    sys.exit(1)

path = os.path.join(d, "config.json")
if not os.path.isfile(path):
    fail(f"no config.json: not a TeleChat2 HF export ({hint})")
try:
    cfg = json.load(open(path, encoding="utf-8"))
except ValueError as exc:
    fail(f"config.json is not valid JSON ({exc})")
if "TeleChat2ForCausalLM" not in (cfg.get("architectures") or []):
    fail(f"config.json architectures is {cfg.get('architectures')!r}, vLLM needs ['TeleChat2ForCausalLM']: "
         f"not a telechat-ms export ({hint})")
module = (cfg.get("auto_map") or {}).get("AutoConfig", "").split(".")[0]
if not module or not os.path.isfile(os.path.join(d, module + ".py")):
    fail(f"config.json auto_map.AutoConfig names no configuration module present in the directory ({hint})")
for key in ("n_head", "num_key_value_heads", "seq_length", "hidden_size", "n_layer"):
    if type(cfg.get(key)) is not int or cfg[key] <= 0:
        fail(f"config.json field '{key}' must be a positive integer, got {cfg.get(key)!r} ({hint})")
if not glob.glob(os.path.join(d, "*.safetensors")):
    fail("no *.safetensors weights")
for name in ("tokenizer.model", "tokenizer_config.json"):
    if not os.path.isfile(os.path.join(d, name)):
        fail(f"no {name}: convert from a directory that holds the tokenizer ({hint})")
tok = json.load(open(os.path.join(d, "tokenizer_config.json"), encoding="utf-8"))
tok_module = ((tok.get("auto_map") or {}).get("AutoTokenizer") or [""])[0].split(".")[0]
if not tok_module or not os.path.isfile(os.path.join(d, tok_module + ".py")):
    fail(f"tokenizer_config.json auto_map.AutoTokenizer names no tokenizer module present ({hint})")
heads, kv = cfg["n_head"], cfg["num_key_value_heads"]
if heads % tp:
    fail(f"n_head {heads} is not divisible by TP {tp}")
if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
    fail(f"num_key_value_heads {kv} and TP {tp}: one must divide the other")
print(cfg["seq_length"], heads, kv)
PY
)
[[ $SEQ_LENGTH != FAILED && -n ${N_KV:-} ]] || exit 2

BACKEND=${BACKEND:-auto}
if [[ $BACKEND == auto ]]; then
    BACKEND=vllm
    if command -v npu-smi >/dev/null 2>&1 || [[ -n ${ASCEND_HOME_PATH:-} ]]; then BACKEND=vllm-mindspore; fi
fi
case $BACKEND in
    vllm) EXE=vllm; PREFIX=() ;;
    # vLLM-MindSpore runs TeleChat2 through MindFormers' in-tree (mcore) TeleChat2ForCausalLM.
    vllm-mindspore) EXE=vllm-mindspore; PREFIX=(env vLLM_MODEL_BACKEND=MindFormers) ;;
    *) die "BACKEND must be auto, vllm or vllm-mindspore, got '$BACKEND'" ;;
esac

MAX_MODEL_LEN=${MAX_MODEL_LEN:-$SEQ_LENGTH}
[[ $MAX_MODEL_LEN =~ ^[1-9][0-9]*$ ]] || die "MAX_MODEL_LEN must be a positive integer, got '$MAX_MODEL_LEN'"
NAME=${SERVED_MODEL_NAME:-$(basename "$(cd "$MODEL_DIR" && pwd)")}
CMD=("${PREFIX[@]}" "$EXE" serve "$MODEL_DIR"
     --trust-remote-code
     --tensor-parallel-size "$TP"
     --served-model-name "$NAME"
     --max-model-len "$MAX_MODEL_LEN"
     --dtype "${DTYPE:-auto}"
     --host "${HOST:-127.0.0.1}"
     --port "${PORT:-8000}")
# shellcheck disable=SC2206  # EXTRA_ARGS is meant to be word-split
[[ -n ${EXTRA_ARGS:-} ]] && CMD+=(${EXTRA_ARGS})

if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${CMD[@]}" | sed 's/ $//'
    echo
    exit 0
fi
command -v "$EXE" >/dev/null 2>&1 \
    || die "$EXE: not installed here (vLLM: pip install vllm on a CUDA machine; vLLM-MindSpore: its Ascend install)"
exec "${CMD[@]}"
