"""Evaluation throughput, ratios measured in one run on a random TeleChat2 model:

- multiple choice: 4-choice questions as C-Eval / MMLU / CMMLU ask them (single-token continuations " A".." D";
  the questions of a subject repeat its few-shot exemplars, --fewshot-tokens of the --context) scored batched
  (--batch rows a forward, the context once per question, a subject's exemplars once per subject) vs one
  question a forward, and vs one choice a forward (the context recomputed per choice); target >= 4x at batch 8.
  Also shown: batched without the shared exemplars (every row computes its whole context);
- generation: greedy answers through the serving engine with --batch rows decoding together vs one at a time
  (an engine of one row); target >= 3x.

    python benchmarks/eval_bench.py [--questions 32] [--context 256] [--fewshot-tokens 192] [--gen-samples 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(args):
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    d = tempfile.mkdtemp(prefix="eval_bench_")
    cfg = tiny_config(hidden_size=args.hidden, n_layer=args.layers, n_head=4, num_key_value_heads=2,
                      ffn_hidden_size=args.hidden * 3, vocab_size=args.vocab, seq_length=args.max_len,
                      training_seqlen=args.max_len, base_seqlen=args.max_len)
    write_random_hf_checkpoint(d, cfg, seed=0)
    return TeleChatForCausalLM.from_pretrained(d)


class _Tok:
    """The engine decodes text for stop strings; a byte-free stand-in keeps the benchmark tokenizer-independent."""

    vocab_size = 0

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"t{i}" for i in ids)


def bench_mc(model, args) -> dict[str, float]:
    from telechat_ms.eval.prefix import LocalPrefixForward
    from telechat_ms.eval.scoring import LoglikelihoodScorer, local_forward
    rng = np.random.default_rng(0)
    forward, prefix = local_forward(model), LocalPrefixForward(model)
    shots = [rng.integers(9, args.vocab, size=args.fewshot_tokens).tolist() for _ in range(args.subjects)]
    requests = []
    for q in range(args.questions):             # a subject's questions repeat its few-shot exemplars
        ctx = shots[q % args.subjects] + rng.integers(9, args.vocab, size=args.context - args.fewshot_tokens).tolist()
        requests += [(ctx, [int(t)]) for t in (10, 11, 12, 13)]
    runs = {"batched": LoglikelihoodScorer(forward, args.max_len, args.batch, prefix=prefix),
            "batched, no shared prefix": LoglikelihoodScorer(forward, args.max_len, args.batch),
            "one question a forward": LoglikelihoodScorer(forward, args.max_len, 1),
            "one choice a forward": LoglikelihoodScorer(forward, args.max_len, 1, share_context=False)}
    if args.skip_one_choice:
        del runs["one choice a forward"]
    LoglikelihoodScorer(forward, args.max_len, args.batch, prefix=prefix).score(requests[:8 * args.batch])  # warm up
    LoglikelihoodScorer(forward, args.max_len, args.batch).score(requests[:4 * args.batch])
    out, ref = {}, None
    for name, scorer in runs.items():
        start = time.perf_counter()
        got = scorer.score(requests)
        out[name] = args.questions / (time.perf_counter() - start)
        vals = np.array([g[0] for g in got])
        if ref is None:
            ref = vals
        assert np.allclose(vals, ref, atol=1e-4), f"{name}: scores differ from the batched run"
    return out


def bench_gen(model, args) -> dict[str, float]:
    from telechat_ms.eval.generation import GenRequest, generate_greedy
    from telechat_ms.eval.model import engine_for
    tok = _Tok()
    tok.vocab_size = args.vocab
    rng = np.random.default_rng(1)
    reqs = [GenRequest(rng.integers(9, args.vocab, size=int(rng.integers(args.context // 2, args.context))).tolist(),
                       (), args.gen_tokens) for _ in range(args.gen_samples)]
    out, texts = {}, {}
    for name, rows in (("engine batch", args.batch), ("sequential", 1)):
        engine = engine_for(model, tok, args.max_len, rows, use_jit=args.jit)
        try:
            generate_greedy(engine, reqs[:1], ())          # warm up
            start = time.perf_counter()
            texts[name] = generate_greedy(engine, reqs, ())
            out[name] = args.gen_samples * args.gen_tokens / (time.perf_counter() - start)
        finally:
            engine.shutdown()
    assert texts["engine batch"] == texts["sequential"], "batched greedy answers differ from sequential ones"
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--context", type=int, default=256, help="context tokens per question / prompt")
    p.add_argument("--fewshot-tokens", type=int, default=192,
                   help="tokens of the few-shot exemplars the questions of a subject share (0: none shared)")
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--skip-one-choice", action="store_true", help="leave out the slowest mode")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gen-samples", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--jit", action="store_true", help="compile the engine's steps")
    p.add_argument("--cpu-threads", type=int, default=None)
    p.add_argument("--only", choices=["mc", "gen"], default=None)
    args = p.parse_args()
    if not 0 <= args.fewshot_tokens < args.context:
        p.error("--fewshot-tokens must be in [0, --context)")
    from telechat_ms.serve.server import set_runtime
    set_runtime(None, args.cpu_threads)
    model = _model(args)
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; context {args.context} tokens "
          f"({args.fewshot_tokens} shared by the questions of each of {args.subjects} subjects); batch {args.batch}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if args.only in (None, "mc"):
        mc = bench_mc(model, args)
        for name, qps in mc.items():
            print(f"mc  {name:24s} {qps:8.2f} questions/s")
        print(f"mc  ratio batched / one question a forward: {mc['batched'] / mc['one question a forward']:.2f}x "
              "(target >= 4x)")
        print(f"mc  ratio batched, no shared prefix / one question a forward: "
              f"{mc['batched, no shared prefix'] / mc['one question a forward']:.2f}x")
        if "one choice a forward" in mc:
            print(f"mc  ratio batched / one choice a forward: {mc['batched'] / mc['one choice a forward']:.2f}x")
    if args.only in (None, "gen"):
        gen = bench_gen(model, args)
        for name, tps in gen.items():
            print(f"gen {name:24s} {tps:8.2f} tokens/s")
        print(f"gen ratio engine batch / sequential: {gen['engine batch'] / gen['sequential']:.2f}x (target >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
