"""`chat` and `generate`: a terminal chat, and answers for one prompt or a jsonl file (also under msrun)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from telechat_ms.errors import TeleChatError

CHAT_HELP = "commands: /clear (forget the history), /system TEXT (set the system prompt; /system alone: default), " \
            "/history, /exit"


def _add_generation_args(p: argparse.ArgumentParser, optional_model: bool = False) -> None:
    """Decoding options; anything left unset comes from MODEL_DIR/generation_config.json (or the defaults)."""
    p.add_argument("model_dir", nargs="?" if optional_model else None,
                   help="checkpoint directory (HF or MindSpore safetensors)"
                        + ("; not with --config (its load_checkpoint)" if optional_model else ""))
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or its directory (default: MODEL_DIR)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    sample = p.add_mutually_exclusive_group()
    sample.add_argument("--do-sample", dest="do_sample", action="store_true", default=None, help="sample")
    sample.add_argument("--greedy", dest="do_sample", action="store_false", help="pick the most likely token")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--stop-id", type=int, action="append", default=None, help="extra stop token id (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible draws)")
    p.add_argument("--system", default=None,
                   help="system prompt for chat and --prompt (default: the released default system text)")
    p.add_argument("--no-jit", action="store_true", help="run the decode step in PyNative mode (no compiling)")
    p.add_argument("--device-target", default=None, choices=["CPU", "Ascend", "GPU"],
                   help="MindSpore device (default: MindSpore's own default)")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """GenerationConfig overrides the user actually gave."""
    pairs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
             "top_k": args.top_k, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty,
             "stop_token_ids": args.stop_id, "seed": args.seed}
    return {k: v for k, v in pairs.items() if v is not None}


def _set_device(target: str | None) -> None:
    """mindspore.set_device for --device-target (before any kernel runs)."""
    if target:
        import mindspore as ms
        ms.set_device(target)


def _tokenizer(path: str, model):
    """The tokenizer at path (tokenizer.model or its directory), checked against the model's vocabulary."""
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    return TeleChatTokenizer.for_model(path, model.config.vocab_size)


def _load(args: argparse.Namespace):
    """(model, tokenizer) from the command line."""
    from telechat_ms.model.telechat import TeleChatForCausalLM
    _set_device(args.device_target)
    model = TeleChatForCausalLM.from_pretrained(args.model_dir)
    return model, _tokenizer(args.tokenizer or args.model_dir, model)


def _chat(args: argparse.Namespace) -> int:
    from telechat_ms.infer.chat import chat
    model, tokenizer = _load(args)
    options, system, history = _options(args), args.system, []
    print(f"TeleChat2 chat ({args.model_dir}). {CHAT_HELP}", flush=True)
    while True:
        try:
            question = input("\nuser> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = question.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "exit", "quit"):
            return 0
        if text == "/clear":
            history = []
            print("(history cleared)")
            continue
        if text == "/history":
            print(json.dumps(history, ensure_ascii=False, indent=1))
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            history = [m for m in history if m.get("role") != "system"]
            print(f"(system prompt {'set' if system else 'reset to the default'}; history kept)")
            continue
        if text.startswith("/"):
            print(CHAT_HELP)
            continue
        print("bot> ", end="", flush=True)
        stream = chat(model, tokenizer, question, history=history, stream=True, system=system,
                      use_jit=not args.no_jit, **options)
        try:
            for piece in stream:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print("\n(interrupted; turn discarded)")
            continue
        history = stream.history
        s = stream.stats
        print(f"\n[{s['new_tokens']} tokens in {s['seconds']:.2f} s: {s['tokens_per_second']:.1f} tokens/s "
              f"(decode steps {s['decode_tokens_per_second']:.1f}/s); prompt {s['prompt_tokens']} tokens, prefill "
              f"{s['prefill_seconds']:.2f} s; {stream.finish_reason}]", flush=True)


def _answer(model, tokenizer, args: argparse.Namespace, output: str | None, batch_size: int,
            options: dict[str, Any], world: tuple[int, int] | None = None, paged: dict[str, Any] | None = None) -> int:
    """--prompt: print the answer; --input: answer the file into output (this process, or its share of it).
    paged: answer the file through the serving engine (serve.offline) with these predict_file_paged arguments."""
    from telechat_ms.chat_template import apply_chat_template
    from telechat_ms.infer import batch
    if args.prompt:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
            [{"role": "user", "content": args.prompt}]
        req = batch.Request("--prompt", 1, 1, apply_chat_template(messages, add_generation_prompt=True))
        records: list[dict] = []
        batch.run_batch(model, tokenizer, iter([req]), records.append, use_jit=not args.no_jit, **options)
        print(records[0]["answer"])
        return 0
    if paged is not None:
        from telechat_ms.infer.generate import resolve_config
        from telechat_ms.serve.offline import predict_file_paged
        counts = predict_file_paged(model, tokenizer, args.input, output, config=resolve_config(model, None, options),
                                    show_progress=not args.quiet, on_error=args.on_error, use_jit=not args.no_jit,
                                    **paged)
        print(f"wrote {counts['answered']} answers ({counts['new_tokens']} tokens), {counts['errors']} bad line(s) "
              f"to {output}", file=sys.stderr)
        return 0
    kwargs = dict(batch_size=batch_size, on_error=args.on_error, use_jit=not args.no_jit, **options)
    if world is None:
        counts = batch.predict_file(model, tokenizer, args.input, output, show_progress=not args.quiet, **kwargs)
    else:
        counts = batch.predict_file_data_parallel(model, tokenizer, args.input, output, *world, **kwargs)
        if counts is None:  # not rank 0
            return 0
    print(f"wrote {counts['answered']} answers ({counts['new_tokens']} tokens), {counts['errors']} bad line(s) "
          f"to {output}", file=sys.stderr)
    return 0


def _check_request(args: argparse.Namespace, default_output: str | None = None) -> str | None:
    """Exactly one of --input / --prompt; the output file of --input."""
    if bool(args.input) == bool(args.prompt):
        raise TeleChatError("give exactly one of --input FILE.jsonl or --prompt TEXT")
    if args.input and not (args.output or default_output):
        raise TeleChatError("--input needs --output FILE.jsonl")
    return args.output or default_output if args.input else None


def _generate(args: argparse.Namespace) -> int:
    from telechat_ms.infer import batch
    if args.config:
        return _generate_from_config(args)
    if args.overrides:
        raise TeleChatError(f"{args.overrides[0]}: --key.path=value overrides need --config PREDICT.yaml")
    if not args.model_dir:
        raise TeleChatError("give MODEL_DIR or --config PREDICT.yaml")
    output = _check_request(args)
    world = None
    if args.data_parallel or args.prompt:
        _refuse_paged_flags(args, "only generate --input in one process runs the serving engine")
    if args.data_parallel:  # communication first: on Ascend it binds each worker to its device
        _set_device(args.device_target)
        world = batch.init_workers()
    model, tokenizer = _load(args)
    paged = None
    if args.input and world is None:   # one process: the serving engine (continuous batching, paged kv cache)
        paged = dict(settings=_engine_settings(args, args.batch_size), max_model_len=args.max_model_len)
    return _answer(model, tokenizer, args, output, args.batch_size or 1, _options(args), world, paged)


def _refuse_paged_flags(args: argparse.Namespace, why: str) -> None:
    """The engine's flags where no engine runs: an error naming the first one, never silently ignored."""
    given = [flag for flag, value in (("--block-size", args.block_size), ("--num-blocks", args.num_blocks),
                                      ("--kv-cache-memory-bytes", args.kv_cache_memory_bytes),
                                      ("--max-num-batched-tokens", args.max_num_batched_tokens),
                                      ("--no-prefix-caching", args.no_prefix_caching),
                                      ("--max-decode-slowdown", args.max_decode_slowdown),
                                      ("--max-model-len", args.max_model_len),
                                      ("--compile-cache-dir", args.compile_cache_dir),
                                      ("--no-compile-cache", args.no_compile_cache)) if value not in (None, False)]
    if given:
        raise TeleChatError(f"{given[0]} is not used here: {why}")


def _engine_settings(args: argparse.Namespace, max_batch_size: int | None):
    """serve's engine options (ServeConfig: one source of truth for the defaults) of a generate --input job."""
    from telechat_ms.commands.serve import paged_cache_options
    from telechat_ms.serve.server import ServeConfig
    extra = {} if max_batch_size is None else {"max_batch_size": max_batch_size}
    return ServeConfig(model_dir="", **extra, **paged_cache_options(args))


def _generate_from_config(args: argparse.Namespace) -> int:
    """generate --config PREDICT.yaml: one process, data-parallel replicas, or model parallel in lockstep."""
    from telechat_ms.parallel.predict_job import load_predict_job, reject_flags
    job = load_predict_job(args.config, args.overrides)
    reject_flags([(args.model_dir, "MODEL_DIR", "load_checkpoint"),
                  (args.device_target, "--device-target", "context.device_target"),
                  (args.data_parallel, "--data-parallel", "parallel.parallel_mode"),
                  (args.batch_size, "--batch-size", "runner_config.batch_size"),
                  (args.max_model_len, "--max-model-len", "model.model_config.seq_length")])
    stem = os.path.splitext(os.path.basename(args.input or ""))[0]
    output = _check_request(args, os.path.join(job.output_dir, f"{stem}.answers.jsonl"))
    from telechat_ms.runtime_env import use_log_dir
    use_log_dir(job.output_dir)
    options = _options(args)
    options.setdefault("seed", job.seed)
    if job.model_parallel and args.input:
        return _paged_lockstep(args, job, output, options)
    if job.model_parallel:
        from telechat_ms.parallel.predict import build_model_parallel
        _refuse_paged_flags(args, "generate --config --prompt of a model-parallel job runs the static-cache lockstep")
        return _lockstep(args, job, build_model_parallel(job, use_jit=not args.no_jit), output, options)
    from telechat_ms.infer.kv_cache import CacheStepper, use_stepper_factory
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.parallel.context import setup_context
    from telechat_ms.parallel.predict import stepper_factory
    run = setup_context(job.context, job.parallel, job.parallel_config, job.source, job.output_dir)
    model = TeleChatForCausalLM.from_pretrained(job.load_checkpoint, config=job.model_config)
    if args.input and run.world_size == 1:   # the serving engine: runner_config.batch_size rows of seq_length
        from telechat_ms.serve.server import paged_stepper_factory
        tokenizer = _tokenizer(args.tokenizer or job.load_checkpoint, model)
        settings = _engine_settings(args, job.batch_size)
        paged = dict(settings=settings, max_model_len=job.model_config.seq_length,
                     stepper_factory=paged_stepper_factory(model, not args.no_jit, run.jit_config(),
                                                           settings.compile_cache))
        return _answer(model, tokenizer, args, output, job.batch_size, options, paged=paged)
    _refuse_paged_flags(args, "only generate --input in one process runs the serving engine")
    # the job's kv cache, as plan sizes it: runner_config.batch_size rows x seq_length slots, compiled at jit_level
    stepper = CacheStepper(model, job.batch_size, job.model_config.seq_length, use_jit=not args.no_jit)
    stepper.cell.set_jit_config(run.jit_config())
    use_stepper_factory(model, stepper_factory(stepper))
    tokenizer = _tokenizer(args.tokenizer or job.load_checkpoint, model)
    world = (run.rank, run.world_size) if run.world_size > 1 else None
    return _answer(model, tokenizer, args, output, job.batch_size, options, world)


def _paged_lockstep(args: argparse.Namespace, job, output: str, options: dict[str, Any]) -> int:
    """generate --config --input of a model-parallel job: the serving engine on rank 0 over the paged
    model-parallel step (the cache split by whole kv heads), the other ranks replaying its calls (as serve
    --config); rank 0 writes the output."""
    from telechat_ms.parallel.paged_predict import build_model_parallel_paged
    from telechat_ms.parallel.predict import run_lockstep
    from telechat_ms.serve.server import fixed_paged_factory, paged_settings
    if args.compile_cache_dir:
        raise TeleChatError("--compile-cache-dir is not used here: the compile cache serves one process, not a "
                            "model-parallel job")
    settings = _engine_settings(args, job.batch_size)
    seq = job.model_config.seq_length
    cache = paged_settings(settings, job.model_config, seq, mp=job.parallel_config.model_parallel)
    session = build_model_parallel_paged(job, cache["num_blocks"], cache["block_size"], use_jit=not args.no_jit)

    def work(model, leader) -> int:
        tokenizer = _tokenizer(args.tokenizer or job.load_checkpoint, model)
        paged = dict(settings=settings, max_model_len=seq, stepper_factory=fixed_paged_factory(leader),
                     mp=job.parallel_config.model_parallel)
        return _answer(model, tokenizer, args, output, job.batch_size, options, paged=paged)

    result = run_lockstep(session, work, paged=True)
    return 0 if result is None else result


def _lockstep(args: argparse.Namespace, job, session, output: str | None, options: dict[str, Any]) -> int:
    """Every rank steps in lockstep: rank 0 tokenizes, schedules, samples and writes; the others follow it."""
    from telechat_ms.infer.kv_cache import use_stepper_factory
    from telechat_ms.parallel.predict import run_lockstep, stepper_factory

    def work(model, leader) -> int:
        use_stepper_factory(model, stepper_factory(leader))
        tokenizer = _tokenizer(args.tokenizer or job.load_checkpoint, model)
        return _answer(model, tokenizer, args, output, job.batch_size, options)

    result = run_lockstep(session, work)
    return 0 if result is None else result


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add chat and generate."""
    c = subparsers.add_parser("chat", help="interactive multi-turn chat in the terminal (streamed)",
                              description=f"Chat with a TeleChat2 checkpoint. {CHAT_HELP}")
    _add_generation_args(c)
    c.set_defaults(func=_chat)

    g = subparsers.add_parser("generate", allow_abbrev=False, help="answer one prompt or a jsonl file of conversations",
                              description="Batch prediction: --input conversations.jsonl --output answers.jsonl "
                                          "(order and ids kept), or --prompt TEXT; from MODEL_DIR, or from a predict "
                                          "YAML (--config) in one process, as data-parallel replicas or model "
                                          "parallel under msrun (run_scripts/msrun_predict.sh).")
    _add_generation_args(g, optional_model=True)
    g.add_argument("--config", default=None,
                   help="predict YAML (yaml_configs/<size>/predict_telechat2_<size>.yaml) instead of MODEL_DIR: "
                        "checkpoint, device, parallel layout (model_parallel > 1: run it under msrun, e.g. "
                        "run_scripts/msrun_predict.sh), kv cache of runner_config.batch_size x seq_length; "
                        "--key.path=value overrides its keys")
    g.add_argument("--prompt", default=None, help="one user message; the answer is printed")
    g.add_argument("--input", default=None, help="jsonl of conversations ({messages}, {system, dialog}, {prompt})")
    g.add_argument("--output", default=None,
                   help="jsonl of answers, one per input line, in input order (with --config default: "
                        "OUTPUT_DIR/<input name>.answers.jsonl)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="sequences decoded together (--input: the engine's rows, default 8 as serve's "
                        "--max-batch-size; --prompt: 1; with --config: runner_config.batch_size)")
    g.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="malformed lines: report file:line and write an error record (skip) or stop (fail)")
    g.add_argument("--data-parallel", action="store_true",
                   help="under msrun: every worker answers its share of the lines; rank 0 writes --output")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="--input: prompt + answer limit of a line (default: the longest line's prompt + "
                        "--max-new-tokens; with --config: seq_length); longer lines get an error record")
    from telechat_ms.commands.serve import add_paged_cache_args
    add_paged_cache_args(g)   # --input runs serve's engine: the same cache and token-budget flags
    g.set_defaults(func=_generate, overrides=[], takes_overrides=True)
