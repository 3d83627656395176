"""`serve`: an OpenAI-compatible HTTP server (and the released /generate API) with continuous batching."""
from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    from telechat_ms.errors import ConfigError
    job = None
    if args.config:
        from telechat_ms.parallel.predict_job import load_predict_job, reject_flags
        from telechat_ms.runtime_env import use_log_dir
        reject_flags([(args.model_dir, "MODEL_DIR", "load_checkpoint"),
                      (args.device_target, "--device-target", "context.device_target"),
                      (args.max_batch_size, "--max-batch-size", "runner_config.batch_size"),
                      (args.max_model_len, "--max-model-len", "model.model_config.seq_length")])
        job = load_predict_job(args.config, args.overrides)
        if job.model_parallel and args.compile_cache_dir:
            raise ConfigError(f"{args.config}: --compile-cache-dir serves one process; a model-parallel job "
                              "compiles its graphs every start")
        use_log_dir(job.output_dir)       # before the server's imports bring MindFormers in
    elif args.overrides:
        raise ConfigError(f"{args.overrides[0]}: --key.path=value overrides need --config PREDICT.yaml")
    elif not args.model_dir:
        raise ConfigError("give MODEL_DIR or --config PREDICT.yaml")
    from telechat_ms.serve.server import ServeConfig, run, run_job
    cfg = ServeConfig(model_dir=args.model_dir or "", tokenizer=args.tokenizer,
                      served_model_name=args.served_model_name, host=args.host, port=args.port,
                      max_batch_size=args.max_batch_size or 8, max_model_len=args.max_model_len,
                      max_queue=args.max_queue, api_key=args.api_key, use_jit=not args.no_jit,
                      warmup=not args.no_warmup, device_target=args.device_target, cpu_threads=args.cpu_threads,
                      batch_window_ms=args.batch_window_ms, **paged_cache_options(args))
    return run(cfg) if job is None else run_job(job, cfg)


def add_paged_cache_args(p: argparse.ArgumentParser) -> None:
    """The paged kv cache's flags (serve, serve --config, generate --input): their defaults live in ServeConfig."""
    p.add_argument("--block-size", type=int, default=None, help="tokens per kv-cache block (default 16)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="kv-cache blocks (as vLLM's --num-gpu-blocks-override; default: what "
                        "--kv-cache-memory-bytes holds)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="kv-cache size in bytes (default 1 GiB, never more than --max-batch-size sequences of "
                        "--max-model-len fill); sequences are admitted while blocks are free")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens one step computes at most: every decoding sequence's next token, then chunks of "
                        "prompts (a longer prompt is prefilled over several steps; default 512)")
    p.add_argument("--max-decode-slowdown", type=float, default=None,
                   help="while sequences decode, a step takes only the prompt chunk it is measured to afford: at "
                        "most this many times a step of decodes alone (their inter-token latency beside a long "
                        "prompt); 0: always the whole --max-num-batched-tokens (default 2)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the kv-cache blocks of identical prompt prefixes")
    p.add_argument("--compile-cache-dir", default=None,
                   help="keep the compiled step graphs here, one directory per graph keyed by this package's "
                        "source, the versions, the model config and the shape, so a restart loads instead of "
                        "compiling (default ~/.cache/telechat_ms/compile; one process only, not under model "
                        "parallel)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile every graph afresh, keep none")


def paged_cache_options(args: argparse.Namespace) -> dict:
    """ServeConfig keyword arguments of the paged-cache flags the user gave (ServeConfig holds the defaults)."""
    given = {"block_size": args.block_size, "num_blocks": args.num_blocks,
             "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
             "max_num_batched_tokens": args.max_num_batched_tokens, "max_decode_slowdown": args.max_decode_slowdown}
    from telechat_ms.errors import ConfigError
    if args.no_compile_cache and args.compile_cache_dir:
        raise ConfigError("--compile-cache-dir and --no-compile-cache contradict each other: give one")
    if args.no_compile_cache:
        cache = None
    else:
        from telechat_ms.infer.compile_cache import default_dir
        cache = args.compile_cache_dir or default_dir()
    return {**{k: v for k, v in given.items() if v is not None}, "prefix_caching": not args.no_prefix_caching,
            "compile_cache": cache}


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add serve."""
    p = subparsers.add_parser(
        "serve", allow_abbrev=False, help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve a TeleChat2 checkpoint: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, "
                    "/detokenize, the released /generate, /health, /metrics and the web chat at /. "
                    "Sampling defaults come from MODEL_DIR/generation_config.json.")
    p.add_argument("model_dir", nargs="?", default=None,
                   help="checkpoint directory (HF or MindSpore safetensors) with tokenizer.model")
    p.add_argument("--config", default=None,
                   help="predict YAML (yaml_configs/<size>/predict_telechat2_<size>.yaml) instead of MODEL_DIR: one "
                        "process, or model parallel under msrun (run_scripts/msrun_predict.sh ... serve), rank 0 "
                        "serving HTTP; the paged engine over runner_config.batch_size sequences of seq_length "
                        "tokens (the cache flags below size it, per NPU); --key.path=value overrides")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or its directory (default: MODEL_DIR)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL_DIR)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="rows of the decode batch (sequences at once; default 8)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + answer limit in tokens (default: seq_length); the kv cache is sized by "
                        "--num-blocks / --kv-cache-memory-bytes, not by this")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 503 + Retry-After")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*, /generate, "
                   "/tokenize, /detokenize")
    p.add_argument("--no-jit", action="store_true", help="run the model step in PyNative mode (no compiling)")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not compile the decode and prefill graphs before serving (first requests pay)")
    p.add_argument("--device-target", default=None, choices=["CPU", "Ascend", "GPU"],
                   help="MindSpore device (default: MindSpore's own default)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="threads of MindSpore's CPU kernels (default: MindSpore's); on a small CPU machine leave a "
                        "core for the HTTP side")
    p.add_argument("--batch-window-ms", type=float, default=0.0,
                   help="an idle engine woken by a request waits up to this long for more, to prefill a burst in "
                        "one step; 0 admits at once (default 0: a request arriving during a step joins the next "
                        "one as a prompt chunk, so waiting only adds to the first token's latency)")
    add_paged_cache_args(p)
    p.set_defaults(func=_serve, overrides=[], takes_overrides=True)
