"""Serving speed: `telechat-ms serve` under 1, 4 and 8 concurrent streaming clients vs offline batched `generate`.

A random checkpoint (hidden 256, 4 layers by default) with a demo tokenizer is served by `telechat-ms serve` in a
process of its own; clients stream /v1/completions from this process (asyncio + httpx), each sending its share of
the same 8 token-id prompts (1 client: 8 in a row; 4 clients: 2 each; 8 clients: 1 each), ignore_eos, the same
max_tokens. The offline baseline is `model.generate` of the same 8 prompts as one batch, in another process, run
alternately with the server rounds. Prints aggregate generated tokens/s, time to first token p50/p95 and
inter-token latency p50 (gaps between streamed chunks, as vLLM's benchmark_serving counts them), medians over
rounds, and the two targets:

    8 clients >= 3x the aggregate throughput of 1 client
    8 clients >= 0.8x offline batched generate

    python benchmarks/serve_bench.py [--hidden 256 --layers 4 --prompt 48 --new 64 --rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCURRENCY = (1, 4, 8)
N_PROMPTS = 8


def _prompts(args) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(9, args.vocab_floor, size=args.prompt - 4 * (i % 3)).tolist() for i in range(N_PROMPTS)]


def _setup(args) -> str:
    """Random checkpoint + demo tokenizer in args.ckpt (written once)."""
    if os.path.isfile(os.path.join(args.ckpt, "tokenizer.model")):
        return args.ckpt
    from telechat_ms.data.train_tokenizer import train_tokenizer
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    tok = train_tokenizer(os.path.join(args.ckpt, "tok"), vocab_size=1024)
    cfg = tiny_config(hidden_size=args.hidden, n_layer=args.layers, n_head=8, num_key_value_heads=2,
                      ffn_hidden_size=int(2.6875 * args.hidden), vocab_size=tok.vocab_size, training_seqlen=256,
                      base_seqlen=256, seq_length=256)
    write_random_hf_checkpoint(args.ckpt, cfg, seed=0)
    tok.save_pretrained(args.ckpt)
    return args.ckpt


def _cache_len(args) -> int:
    """The offline generate's kv-cache length (telechat_ms.infer.kv_cache.bucket of prompt + new)."""
    n = max(args.prompt + args.new, 128)
    return 1 << (n - 1).bit_length()


# ---------------------------------------------------------------------------------------------- offline worker
def offline_worker(args) -> None:
    """Child process: tokens/s of model.generate over the 8 prompts as one batch (after one warm-up call)."""
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.serve.server import set_runtime
    set_runtime(None, args.cpu_threads)
    model = TeleChatForCausalLM.from_pretrained(args.ckpt)
    prompts = _prompts(args)
    model.generate(prompts, max_new_tokens=args.new, eos_token_id=None)     # compile
    rates = []
    for _ in range(args.offline_repeats):
        start = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=args.new, eos_token_id=None)
        rates.append(sum(len(t) for t in out.new_tokens) / (time.perf_counter() - start))
    print(json.dumps({"tokens_per_second": statistics.median(rates)}))


def _offline(args) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--offline-worker", "--ckpt", args.ckpt, "--prompt",
           str(args.prompt), "--new", str(args.new), "--offline-repeats", str(args.offline_repeats)] + \
        (["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=True, timeout=900).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_second"]


def _env() -> dict:
    return {**os.environ, "GLOG_v": "3", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ---------------------------------------------------------------------------------------------- clients
def _byte_pieces(ckpt: str) -> dict[str, float]:
    """logit_bias that keeps the random model off byte-fallback pieces: their text is held back until a UTF-8
    character completes, which would make streamed chunks (TTFT, inter-token gaps) stand for several tokens."""
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    tok = TeleChatTokenizer(ckpt)
    return {str(i): -100.0 for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")}


async def _one(client, url: str, prompt: list[int], new: int, bias: dict[str, float]) -> dict:
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": bias}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():   # light parsing: the client shares the CPU with the server
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if '"choices":[]' in line or '"choices": []' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            elif '"text":""' not in line and '"text": ""' not in line:
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start, "gaps": list(np.diff(stamps)), "tokens": tokens}


async def _clients(url: str, prompts: list[list[int]], concurrency: int, new: int, bias: dict[str, float]) -> dict:
    import httpx
    shares = [prompts[i::concurrency] for i in range(concurrency)]
    async with httpx.AsyncClient(timeout=600) as client:
        async def run(share):
            return [await _one(client, url, p, new, bias) for p in share]
        start = time.perf_counter()
        results = [r for group in await asyncio.gather(*(run(s) for s in shares)) for r in group]
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"tokens_per_second": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95)),
            "itl_p50": float(np.percentile(gaps, 50)) if gaps else float("nan")}


def _start_server(args, port: int) -> subprocess.Popen:
    import httpx
    cmd = [sys.executable, "-m", "telechat_ms.cli", "serve", args.ckpt, "--port", str(port), "--max-batch-size", "8",
           "--max-model-len", str(_cache_len(args) - 1), "--served-model-name", "bench"] + \
        (["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []) + \
        (["--batch-window-ms", str(args.batch_window_ms)] if args.batch_window_ms is not None else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=48, help="prompt tokens (the 8 prompts are 0-8 shorter)")
    p.add_argument("--new", type=int, default=64, help="generated tokens per request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--offline-repeats", type=int, default=2)
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--batch-window-ms", type=float, default=None, help="the server's --batch-window-ms "
                   "(default: the server's default)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="MindSpore CPU kernel threads for both the server and offline generate (same setting)")
    p.add_argument("--ckpt", default=os.path.join(tempfile.gettempdir(), "telechat_serve_bench"))
    p.add_argument("--vocab-floor", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.offline_worker:
        offline_worker(args)
        return
    sys.path.insert(0, REPO)
    _setup(args)
    prompts, url, bias = _prompts(args), f"http://127.0.0.1:{args.port}", _byte_pieces(args.ckpt)
    server = _start_server(args, args.port)
    rows: dict[str, list[dict]] = {f"{c} clients": [] for c in CONCURRENCY}
    offline: list[float] = []
    try:
        asyncio.run(_clients(url, prompts, 8, args.new, bias))          # warm the server's paths
        for r in range(args.rounds):
            offline.append(_offline(args))
            for c in CONCURRENCY:
                rows[f"{c} clients"].append(asyncio.run(_clients(url, prompts, c, args.new, bias)))
            print(f"round {r + 1}: offline {offline[-1]:.1f} tok/s; " + "; ".join(
                f"{k} {v[-1]['tokens_per_second']:.1f} tok/s" for k, v in rows.items()), flush=True)
    finally:
        server.terminate()
        server.wait(60)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    off = statistics.median(offline)
    print(f"\nmodel hidden {args.hidden} x {args.layers} layers, {N_PROMPTS} prompts of ~{args.prompt} tokens, "
          f"{args.new} new tokens each, cache {_cache_len(args)} slots, medians of {args.rounds} rounds")
    print(f"{'':12s} {'tok/s':>8s} {'TTFT p50':>10s} {'TTFT p95':>10s} {'ITL p50':>9s}")
    for k, m in med.items():
        print(f"{k:12s} {m['tokens_per_second']:8.1f} {1e3 * m['ttft_p50']:8.1f}ms {1e3 * m['ttft_p95']:8.1f}ms "
              f"{1e3 * m['itl_p50']:7.2f}ms")
    print(f"{'offline gen':12s} {off:8.1f}   (model.generate, batch of {N_PROMPTS})")
    scale = med["8 clients"]["tokens_per_second"] / med["1 clients"]["tokens_per_second"]
    vs_offline = med["8 clients"]["tokens_per_second"] / off
    print(f"target 8 clients >= 3x 1 client:        {scale:.2f}x  {'MET' if scale >= 3 else 'MISSED'}")
    print(f"target 8 clients >= 0.8x offline batch:  {vs_offline:.2f}x  {'MET' if vs_offline >= 0.8 else 'MISSED'}")


if __name__ == "__main__":
    main()
