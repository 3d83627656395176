"""Inference speed: telechat_ms (kv cache, graph mode) vs the torch reference generate loop.

Each implementation runs in a process of its own (MindSpore's runtime threads slow torch down in a shared
process), alternately in rounds; prints prefill and decode tokens/s for both on the same random model (hidden 512,
8 layers by default) and their ratios per round, plus decode time per token at position ~64 and ~1024.

    python benchmarks/infer_bench.py [--hidden 512 --layers 8 --prompt 256 --new 64 --threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def _median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def _ms_decode_times(model, prompt: np.ndarray, steps: int, cache_len: int) -> list[float]:
    """Seconds of each decode step after a prefill of `prompt` (greedy) in a cache of cache_len slots."""
    from telechat_ms.infer.kv_cache import session_for
    session = session_for(model, 1, cache_len, use_jit=True)
    logits = session.prefill([prompt[0].tolist()])
    times = []
    for _ in range(steps):
        token = logits.argmax(-1)
        start = time.perf_counter()
        logits = session.decode(token)
        times.append(time.perf_counter() - start)
    return times


def _torch_decode_times(ref, prompt: np.ndarray, steps: int) -> list[float]:
    import torch
    with torch.no_grad():
        logits, past = ref.forward_step(torch.from_numpy(prompt), None, 0)
        times = []
        for _ in range(steps):
            token = logits[:, -1].argmax(-1)[:, None]
            start = time.perf_counter()
            logits, past = ref.forward_step(token, past, None)
            times.append(time.perf_counter() - start)
    return times


def _setup(args):
    """(random HF checkpoint dir, prompt) shared by both implementations (same seed in every process)."""
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    cfg = tiny_config(hidden_size=args.hidden, n_layer=args.layers, n_head=args.heads,
                      num_key_value_heads=args.kv_heads, ffn_hidden_size=3 * args.hidden, vocab_size=args.vocab,
                      training_seqlen=2048, base_seqlen=2048, seq_length=2048)
    if not os.path.isdir(args.ckpt) or not os.listdir(args.ckpt):
        write_random_hf_checkpoint(args.ckpt, cfg, seed=0)
    return np.random.default_rng(0).integers(10, args.vocab, size=(1, args.prompt))


def run_ours(args) -> dict:
    """telechat_ms in this process: generate (after a compiling warm-up), decode ms/token at positions 64, 1024."""
    from telechat_ms.model.telechat import TeleChatForCausalLM
    prompt = _setup(args)
    model = TeleChatForCausalLM.from_pretrained(args.ckpt)
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=args.new, eos_token_id=None)
    compile_s = time.perf_counter() - start
    out = model.generate(prompt, max_new_tokens=args.new, eos_token_id=None)
    # Same cache (2048 slots) for both positions: a step's cost depends on the cache's allocated length L
    # (attention and the in-place update touch all L slots), not on the position.
    per_pos = {}
    for pos in (64, 1024):
        p = np.random.default_rng(pos).integers(10, args.vocab, size=(1, pos))
        _ms_decode_times(model, p, 3, 2048)  # compile this prefill bucket
        per_pos[pos] = _median_ms(_ms_decode_times(model, p, 16, 2048))
    p = np.random.default_rng(64).integers(10, args.vocab, size=(1, 64))
    _ms_decode_times(model, p, 3, 128)
    return {"prefill_tps": args.prompt / out.prefill_seconds,
            "decode_tps": len(out.step_seconds) / out.decode_seconds, "compile_s": compile_s,
            "ms_64": per_pos[64], "ms_1024": per_pos[1024], "ms_64_L128": _median_ms(_ms_decode_times(model, p, 16, 128)),
            "tokens": out.sequences[0]}


def run_torch(args) -> dict:
    """The torch reference in this process: the same measurements with its own kv-cache loop."""
    import torch
    from telechat_ms.reference.torch_model import TeleChatRef
    torch.set_num_threads(args.threads)
    prompt = _setup(args)
    ref = TeleChatRef.from_pretrained(args.ckpt)
    ref.generate(torch.from_numpy(prompt), 2, eos_token_id=None)
    with torch.no_grad():
        start = time.perf_counter()
        ref.forward_step(torch.from_numpy(prompt), None, 0)
        prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = ref.generate(torch.from_numpy(prompt), args.new, eos_token_id=None)
    total = time.perf_counter() - start
    per_pos = {pos: _median_ms(_torch_decode_times(ref, np.random.default_rng(pos).integers(
        10, args.vocab, size=(1, pos)), 16)) for pos in (64, 1024)}
    return {"prefill_tps": args.prompt / prefill, "decode_tps": (args.new - 1) / (total - prefill),
            "ms_64": per_pos[64], "ms_1024": per_pos[1024], "tokens": out.sequences[0].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=256, help="prefill length")
    parser.add_argument("--new", type=int, default=64, help="new tokens in the generate comparison")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: with 2 shared cores, more threads made torch ~8x slower)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the two runs (alternating order)")
    parser.add_argument("--impl", choices=["telechat_ms", "torch"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        print(json.dumps((run_ours if args.impl == "telechat_ms" else run_torch)(args)))
        return

    args.ckpt = tempfile.mkdtemp()
    _setup(args)
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv, "
          f"vocab {args.vocab}; prompt {args.prompt}, {args.new} new tokens, batch 1, fp32, torch threads "
          f"{args.threads}; each run in its own process, alternating")
    flags = [a for a in sys.argv[1:]] + [f"--ckpt={args.ckpt}"]
    for r in range(args.rounds):
        got = {}
        for impl in (("telechat_ms", "torch") if r % 2 == 0 else ("torch", "telechat_ms")):
            out = subprocess.run([sys.executable, __file__, f"--impl={impl}", *flags], capture_output=True,
                                 text=True, check=True).stdout
            got[impl] = json.loads(out.strip().splitlines()[-1])
        ours, ref = got["telechat_ms"], got["torch"]
        print(f"round {r}: first generate (incl. graph compile) {ours['compile_s']:.1f} s; greedy tokens identical "
              f"to torch: {ours['tokens'] == ref['tokens']}")
        for key, label in (("prefill_tps", "prefill tokens/s"), ("decode_tps", "decode tokens/s ")):
            print(f"  {label}  telechat_ms {ours[key]:9.1f}   torch ref {ref[key]:9.1f}   "
                  f"ratio ms/torch {ours[key] / ref[key]:.2f}")
        print(f"  decode ms/token at 64 / 1024: telechat_ms {ours['ms_64']:.2f} / {ours['ms_1024']:.2f} (cache "
              f"L=2048; {ours['ms_64_L128']:.2f} at L=128)   torch ref {ref['ms_64']:.2f} / {ref['ms_1024']:.2f}")
        print(f"  position 1024 / position 64 time per token: telechat_ms {ours['ms_1024'] / ours['ms_64']:.2f}x   "
              f"torch ref {ref['ms_1024'] / ref['ms_64']:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("GLOG_v", "3")
    main()
