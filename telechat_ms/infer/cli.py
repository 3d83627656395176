"""`telechat-ms chat` and `telechat-ms generate`; `register(subparsers)` wires them into the telechat-ms CLI.

Also runnable alone: python -m telechat_ms.infer.cli generate MODEL_DIR --prompt "..."
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

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


def _load(args: argparse.Namespace):
    """(model, tokenizer) from the command line."""
    import mindspore as ms
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.model.telechat import TeleChatForCausalLM
    if args.device_target:
        ms.set_context(device_target=args.device_target)
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


def _world() -> tuple[int, int]:
    """(rank, size) after initialising MindSpore communication (msrun data-parallel predict)."""
    from mindspore.communication import get_group_size, get_rank, init
    init()
    return get_rank(), get_group_size()


def _barrier() -> None:
    """Wait for every worker: an AllReduce of one number (the Barrier op has no CPU kernel)."""
    import numpy as np
    import mindspore as ms
    from mindspore import ops
    ops.AllReduce()(ms.Tensor(np.ones(1, np.float32))).asnumpy()


def _generate(args: argparse.Namespace) -> int:
    from telechat_ms.infer import batch
    if bool(args.input) == bool(args.prompt):
        raise TeleChatError("give exactly one of --input FILE.jsonl or --prompt TEXT")
    if args.input and not args.output:
        raise TeleChatError("--input needs --output FILE.jsonl")
    world = None
    if args.data_parallel:  # communication first: on Ascend it binds each worker to its device
        if args.device_target:
            import mindspore as ms
            ms.set_context(device_target=args.device_target)
        world = _world()
    model, tokenizer = _load(args)
    options = _options(args)
    if args.prompt:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
            [{"role": "user", "content": args.prompt}]
        req = batch.Request("--prompt", 1, 1, batch.apply_chat_template(messages, add_generation_prompt=True))
        records: list[dict] = []
        batch.run_batch(model, tokenizer, iter([req]), records.append, use_jit=not args.no_jit, **options)
        print(records[0]["answer"])
        return 0
    kwargs = dict(batch_size=args.batch_size, on_error=args.on_error, use_jit=not args.no_jit, **options)
    if not args.data_parallel:
        counts = batch.predict_file(model, tokenizer, args.input, args.output, show_progress=not args.quiet, **kwargs)
    else:
        counts = _generate_data_parallel(model, tokenizer, args, kwargs, *world)
        if counts is None:
            return 0
    print(f"wrote {counts['answered']} answers ({counts['new_tokens']} tokens), {counts['errors']} bad line(s) "
          f"to {args.output}", file=sys.stderr)
    return 0


def _generate_data_parallel(model, tokenizer, args: argparse.Namespace, kwargs: dict, rank: int,
                            size: int) -> dict | None:
    """Each msrun worker answers lines rank, rank+size, ...; rank 0 merges the parts back into input order."""
    from telechat_ms.infer import batch
    part = f"{args.output}.part{rank}"
    requests = (r for i, r in enumerate(batch.read_requests(args.input)) if i % size == rank)
    with open(part + ".tmp", "w", encoding="utf-8") as fh:
        batch.run_batch(model, tokenizer, requests,
                        lambda rec: fh.write(json.dumps(rec, ensure_ascii=False) + "\n"), **kwargs)
    os.replace(part + ".tmp", part)
    _barrier()
    if rank != 0:
        return None
    parts = [open(f"{args.output}.part{r}", encoding="utf-8") for r in range(size)]
    total = {"answered": 0, "errors": 0, "new_tokens": 0}
    with open(args.output + ".tmp", "w", encoding="utf-8") as out:
        done = False
        while not done:
            done = True
            for fh in parts:
                line = fh.readline()
                if line:
                    done = False
                    rec = json.loads(line)
                    total["errors" if "error" in rec else "answered"] += 1
                    total["new_tokens"] += rec.get("new_tokens", 0)
                    out.write(line)
    for r, fh in enumerate(parts):
        fh.close()
        os.remove(f"{args.output}.part{r}")
    os.replace(args.output + ".tmp", args.output)
    return total


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `chat` and `generate` to a telechat-ms argparse subparsers object."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m telechat_ms.infer.cli`: the same parser and error handling as `telechat-ms` (telechat_ms.cli.main)."""
    from telechat_ms.cli import main as cli_main
    return cli_main(list(argv) if argv is not None else None)


if __name__ == "__main__":
    sys.exit(main())
