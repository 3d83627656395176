"""`serve`: an OpenAI-compatible HTTP server (and the released /generate API) with continuous batching."""
from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    from telechat_ms.serve.server import ServeConfig, run
    return run(ServeConfig(model_dir=args.model_dir, tokenizer=args.tokenizer, served_model_name=args.served_model_name,
                           host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                           max_model_len=args.max_model_len, max_queue=args.max_queue, api_key=args.api_key,
                           use_jit=not args.no_jit, warmup=not args.no_warmup, device_target=args.device_target))


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add serve."""
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve a TeleChat2 checkpoint: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, "
                    "/detokenize, the released /generate, /health, /metrics and the web chat at /. "
                    "Sampling defaults come from MODEL_DIR/generation_config.json.")
    p.add_argument("model_dir", help="checkpoint directory (HF or MindSpore safetensors) with tokenizer.model")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or its directory (default: MODEL_DIR)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL_DIR)")
    p.add_argument("--max-batch-size", type=int, default=8, help="rows of the decode batch (sequences at once)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + answer limit in tokens; the kv cache holds this per row (default: seq_length)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 503 + Retry-After")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*, /generate, "
                   "/tokenize, /detokenize")
    p.add_argument("--no-jit", action="store_true", help="run the model step in PyNative mode (no compiling)")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not compile the decode and prefill graphs before serving (first requests pay)")
    p.add_argument("--device-target", default=None, choices=["CPU", "Ascend", "GPU"],
                   help="MindSpore device (default: MindSpore's own default)")
    p.set_defaults(func=_serve)
