"""Offline batch jobs: `generate --input` through the serving engine (telechat_ms.serve.offline, what it runs now)
vs the static-cache batch path it replaced (infer.batch.predict_file, batches of --batch prompts), same file, same
process, alternating rounds after one warm-up each (the engine reused: its graphs compiled once). Prints tokens/s of
both, their ratio, whether the two output files are identical (greedy decoding, eos off so every line generates
--new tokens), and the first runs' seconds (compiling included; a CLI run builds a new engine).

    python benchmarks/offline_bench.py [--hidden 256 --layers 4 --lines 32 --prompt 48 --new 64 --batch 8 --rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from serve_bench import _setup   # benchmarks/: the same random checkpoint + demo tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=os.path.join(tempfile.gettempdir(), "telechat_offline_bench"))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lines", type=int, default=32)
    p.add_argument("--prompt", type=int, default=48)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpu-threads", type=int, default=None)
    args = p.parse_args()
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.infer.batch import predict_file
    from telechat_ms.infer.generate import resolve_config
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.serve.offline import predict_file_paged
    from telechat_ms.serve.server import ServeConfig, set_runtime
    set_runtime(None, args.cpu_threads)
    ckpt = _setup(args)
    model = TeleChatForCausalLM.from_pretrained(ckpt)
    tok = TeleChatTokenizer.from_pretrained(ckpt)
    rng = np.random.default_rng(0)
    work = tempfile.mkdtemp()
    src = os.path.join(work, "in.jsonl")
    with open(src, "w", encoding="utf-8") as fh:
        for i in range(args.lines):
            text = tok.decode(rng.integers(9, tok.vocab_size, size=args.prompt - 4 * (i % 3)).tolist())
            fh.write(json.dumps({"id": i, "prompt": text}, ensure_ascii=False) + "\n")
    options = {"max_new_tokens": args.new, "eos_token_id": None}
    settings = ServeConfig(model_dir="", max_batch_size=args.batch)
    from telechat_ms.infer.batch import read_requests
    from telechat_ms.serve.offline import longest_need, offline_engine, run_engine_batch
    config = resolve_config(model, None, options)
    engine = offline_engine(model, tok, settings, longest_need(tok, read_requests(src), args.new))

    def through_engine(out: str) -> dict:   # the same engine every round: its graphs compiled once
        with open(out, "w", encoding="utf-8") as fh:
            return run_engine_batch(engine, tok, read_requests(src),
                                    lambda rec: fh.write(json.dumps(rec, ensure_ascii=False) + "\n"), config)

    runs = {
        "static": lambda out: predict_file(model, tok, src, out, show_progress=False, batch_size=args.batch,
                                           **options),
        "engine": through_engine,
    }
    rates: dict[str, list[float]] = {k: [] for k in runs}
    outputs, cold = {}, {}
    cold["engine (CLI: new engine)"] = time.perf_counter()
    predict_file_paged(model, tok, src, os.path.join(work, "cli.jsonl"), settings, config, show_progress=False)
    cold["engine (CLI: new engine)"] = time.perf_counter() - cold["engine (CLI: new engine)"]
    for name, run in runs.items():     # warm-up: compile
        start = time.perf_counter()
        run(os.path.join(work, f"{name}.jsonl"))
        cold[name] = time.perf_counter() - start
    for _ in range(args.rounds):
        for name, run in runs.items():
            out = os.path.join(work, f"{name}.jsonl")
            start = time.perf_counter()
            counts = run(out)
            rates[name].append(counts["new_tokens"] / (time.perf_counter() - start))
            outputs[name] = open(out, encoding="utf-8").read()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.lines} lines x {args.new} tokens, batch {args.batch}, {args.rounds} rounds: "
          f"static {med['static']:.1f} tok/s {[round(x, 1) for x in rates['static']]}, "
          f"engine {med['engine']:.1f} tok/s {[round(x, 1) for x in rates['engine']]}: "
          f"engine / static {med['engine'] / med['static']:.2f}x; "
          f"output files identical: {outputs['static'] == outputs['engine']}")
    print("first runs (compiling), seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in cold.items()))


if __name__ == "__main__":
    main()
