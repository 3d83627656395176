"""`chat` and `generate`: a terminal chat, and answers for one prompt or a jsonl file (also under msrun)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from telechat_ms.errors import TeleChatError

CHAT_HELP = "commands: /clear (forget the history), /system TEXT (set the system prompt; /system alone: default), " \
            "/history, /exit"


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """Decoding options; anything left unset comes from MODEL_DIR/generation_config.json (or the defaults)."""
    p.add_argument("model_dir", help="checkpoint directory (HF or MindSpore safetensors)")
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


def _load(args: argparse.Namespace):
    """(model, tokenizer) from the command line."""
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.model.telechat import TeleChatForCausalLM
    _set_device(args.device_target)
    tokenizer = TeleChatTokenizer.from_pretrained(args.tokenizer or args.model_dir)
    model = TeleChatForCausalLM.from_pretrained(args.model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TeleChatError(f"{tokenizer.model_file}: {tokenizer.vocab_size} pieces, but the model's vocab_size is "
                            f"{model.config.vocab_size}")
    return model, tokenizer


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


def _generate(args: argparse.Namespace) -> int:
    from telechat_ms.chat_template import apply_chat_template
    from telechat_ms.infer import batch
    if bool(args.input) == bool(args.prompt):
        raise TeleChatError("give exactly one of --input FILE.jsonl or --prompt TEXT")
    if args.input and not args.output:
        raise TeleChatError("--input needs --output FILE.jsonl")
    world = None
    if args.data_parallel:  # communication first: on Ascend it binds each worker to its device
        _set_device(args.device_target)
        world = batch.init_workers()
    model, tokenizer = _load(args)
    options = _options(args)
    if args.prompt:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
            [{"role": "user", "content": args.prompt}]
        req = batch.Request("--prompt", 1, 1, apply_chat_template(messages, add_generation_prompt=True))
        records: list[dict] = []
        batch.run_batch(model, tokenizer, iter([req]), records.append, use_jit=not args.no_jit, **options)
        print(records[0]["answer"])
        return 0
    kwargs = dict(batch_size=args.batch_size, on_error=args.on_error, use_jit=not args.no_jit, **options)
    if not args.data_parallel:
        counts = batch.predict_file(model, tokenizer, args.input, args.output, show_progress=not args.quiet, **kwargs)
    else:
        counts = batch.predict_file_data_parallel(model, tokenizer, args.input, args.output, *world, **kwargs)
        if counts is None:  # not rank 0
            return 0
    print(f"wrote {counts['answered']} answers ({counts['new_tokens']} tokens), {counts['errors']} bad line(s) "
          f"to {args.output}", file=sys.stderr)
    return 0


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add chat and generate."""
    c = subparsers.add_parser("chat", help="interactive multi-turn chat in the terminal (streamed)",
                              description=f"Chat with a TeleChat2 checkpoint. {CHAT_HELP}")
    _add_generation_args(c)
    c.set_defaults(func=_chat)

    g = subparsers.add_parser("generate", help="answer one prompt or a jsonl file of conversations",
                              description="Batch prediction: --input conversations.jsonl --output answers.jsonl "
                                          "(order and ids kept), or --prompt TEXT.")
    _add_generation_args(g)
    g.add_argument("--prompt", default=None, help="one user message; the answer is printed")
    g.add_argument("--input", default=None, help="jsonl of conversations ({messages}, {system, dialog}, {prompt})")
    g.add_argument("--output", default=None, help="jsonl of answers, one per input line, in input order")
    g.add_argument("--batch-size", type=int, default=1, help="prompts generated together (left padding, masked)")
    g.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="malformed lines: report file:line and write an error record (skip) or stop (fail)")
    g.add_argument("--data-parallel", action="store_true",
                   help="under msrun: every worker answers its share of the lines; rank 0 writes --output")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)
