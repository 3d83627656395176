"""Inference speed: telechat_ms (kv cache, graph mode) vs the torch reference generate loop, in one run.

Prints prefill and decode tokens/s for both on the same random model (hidden 512, 8 layers by default) and their
ratios, plus decode time per token at position ~64 and ~1024 (a kv cache keeps it nearly flat).

    python benchmarks/infer_bench.py [--hidden 512 --layers 8 --prompt 256 --new 64 --threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
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
    args = parser.parse_args()

    import torch
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    from telechat_ms.reference.torch_model import TeleChatRef
    torch.set_num_threads(args.threads)

    cfg = tiny_config(hidden_size=args.hidden, n_layer=args.layers, n_head=args.heads,
                      num_key_value_heads=args.kv_heads, ffn_hidden_size=3 * args.hidden, vocab_size=args.vocab,
                      training_seqlen=2048, base_seqlen=2048, seq_length=2048)
    with tempfile.TemporaryDirectory() as tmp:
        write_random_hf_checkpoint(tmp, cfg, seed=0)
        model = TeleChatForCausalLM.from_pretrained(tmp)
        ref = TeleChatRef.from_pretrained(tmp)
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv, "
          f"vocab {args.vocab}; prompt {args.prompt}, {args.new} new tokens, batch 1, fp32, "
          f"torch threads {torch.get_num_threads()}")
    prompt = np.random.default_rng(0).integers(10, args.vocab, size=(1, args.prompt))

    # warm-up: compile the prefill and decode graphs of this bucket once
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=args.new, eos_token_id=None)
    compile_s = time.perf_counter() - start
    ms_out = model.generate(prompt, max_new_tokens=args.new, eos_token_id=None)
    ref.generate(torch.from_numpy(prompt), 2, eos_token_id=None)
    with torch.no_grad():
        start = time.perf_counter()
        ref.forward_step(torch.from_numpy(prompt), None, 0)
        torch_prefill = time.perf_counter() - start
    start = time.perf_counter()
    ref_out = ref.generate(torch.from_numpy(prompt), args.new, eos_token_id=None)
    torch_total = time.perf_counter() - start
    torch_decode = torch_total - torch_prefill
    same = ms_out.sequences[0] == ref_out.sequences[0].tolist()

    ms_prefill_tps = args.prompt / ms_out.prefill_seconds
    torch_prefill_tps = args.prompt / torch_prefill
    ms_decode_tps = len(ms_out.step_seconds) / ms_out.decode_seconds
    torch_decode_tps = (args.new - 1) / torch_decode
    print(f"first generate (incl. graph compile): {compile_s:.1f} s; greedy tokens identical to torch: {same}")
    print(f"prefill tokens/s   telechat_ms {ms_prefill_tps:9.1f}   torch ref {torch_prefill_tps:9.1f}   "
          f"ratio ms/torch {ms_prefill_tps / torch_prefill_tps:.2f}")
    print(f"decode tokens/s    telechat_ms {ms_decode_tps:9.1f}   torch ref {torch_decode_tps:9.1f}   "
          f"ratio ms/torch {ms_decode_tps / torch_decode_tps:.2f}")

    # Same cache (2048 slots) for both positions: the cost of a step depends on the cache's allocated length L
    # (attention and the in-place update touch all L slots; L is a power-of-two bucket of prompt + max_new_tokens),
    # not on the position. The torch reference's cache grows with the position.
    rows = []
    for pos in (64, 1024):
        p = np.random.default_rng(pos).integers(10, args.vocab, size=(1, pos))
        _ms_decode_times(model, p, 3, 2048)  # compile this prefill bucket
        ms_t = _median_ms(_ms_decode_times(model, p, 16, 2048))
        torch_t = _median_ms(_torch_decode_times(ref, p, 16))
        rows.append((pos, ms_t, torch_t))
        print(f"decode ms/token at position {pos:5d}: telechat_ms {ms_t:7.2f} (cache L=2048)   "
              f"torch ref {torch_t:7.2f}")
    (_, ms64, t64), (_, ms1k, t1k) = rows
    print(f"position 1024 / position 64 time per token: telechat_ms {ms1k / ms64:.2f}x   torch ref {t1k / t64:.2f}x")
    p = np.random.default_rng(64).integers(10, args.vocab, size=(1, 64))
    _ms_decode_times(model, p, 3, 128)
    small = _median_ms(_ms_decode_times(model, p, 16, 128))
    print(f"telechat_ms decode ms/token at position 64 with cache L=128 (what generate picks for 64 + 64 tokens): "
          f"{small:.2f}  (L=2048: {ms64:.2f})")

if __name__ == "__main__":
    os.environ.setdefault("GLOG_v", "3")
    main()
