"""`telechat-ms serve --config PREDICT.yaml`: the paged engine over a predict job (runner_config.batch_size
sequences of seq_length tokens, the cache flags sizing its blocks), in one process and model parallel in lockstep
under msrun (rank 0 serves HTTP; each CPU rank a full replica of the paged predict configuration in place of the
Ascend-only semi-auto build; prompt log-probs through the paged step), and the static engine over the
model-parallel stepper answering exactly what it answers over the local one (generate --config's lockstep)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("mindspore")
openai = pytest.importorskip("openai")

from tests.conftest import REPO  # noqa: E402
from tests.predict_fixtures import TINY_PREDICT_YAML as YAML, tiny_predict_dir  # noqa: E402,F401  (fixture)

QUESTIONS = ["你好", "1+1=?", "tell me a story about the sea"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    import httpx
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the server did not come up")


def _ask(url: str) -> list[str]:
    """Greedy answers of three concurrent chats (they share decode steps), in question order."""
    from concurrent.futures import ThreadPoolExecutor
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")

    def one(q: str) -> str:
        r = client.chat.completions.create(model=client.models.list().data[0].id, temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": q}])
        return r.choices[0].message.content
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        return list(pool.map(one, QUESTIONS))


def _prompt_logprobs(client) -> list:
    """echo + logprobs with max_tokens 0 (lm-eval's scoring request) of one prompt: its tokens' log-probs."""
    r = client.completions.create(model=client.models.list().data[0].id, prompt="tell me a story about the sea",
                                  echo=True, logprobs=1, max_tokens=0)
    return r.choices[0].logprobs.token_logprobs


def _metric(text: str, name: str) -> float:
    from tests.serve_fixtures import metric
    return metric(text, name)


def test_engine_over_the_model_parallel_stepper_answers_as_over_the_local_one(tiny_predict_dir):  # noqa: F811
    """Staggered requests make mixed prefill + decode steps (padding columns in the scratch slot, several per row)
    and reuse rows (the model-parallel stepper clears their slots first): every greedy answer is the same."""
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.infer.kv_cache import CacheStepper
    from telechat_ms.job_config import ParallelConfig
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.parallel.parallelize import parallelize_predict
    from telechat_ms.parallel.predict import ModelParallelStepper
    from telechat_ms.serve.engine import Engine, Sequence
    from telechat_ms.serve.sampler import SamplingParams
    from telechat_ms.serve.server import fixed_stepper_factory

    tok = TeleChatTokenizer.from_pretrained(tiny_predict_dir)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(9, tok.vocab_size, size=n).tolist() for n in (5, 23, 40, 9, 31, 3)]
    answers = {}
    for kind in ("local", "sharded"):
        model = TeleChatForCausalLM.from_pretrained(tiny_predict_dir)
        if kind == "local":
            stepper = CacheStepper(model, 3, 97)
        else:
            stepper = ModelParallelStepper(model, 3, 97, parallelize_predict(model, ParallelConfig(model_parallel=2)))
        engine = Engine(fixed_stepper_factory(stepper), tok, tok.vocab_size, 96, max_batch_size=3, warmup=False)
        engine.prepare()
        out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        seqs = [Sequence(p, SamplingParams(max_tokens=12, temperature=0.0),
                         lambda d, i=i: out[i].extend(d.token_ids), index=0) for i, p in enumerate(prompts)]
        schedule = {0: seqs[:2], 3: seqs[2:4], 7: seqs[4:]}      # joins running batches; rows are reused
        for it in range(400):
            for seq in schedule.get(it, []):
                engine.submit([seq])
            if not engine.run_once() and it > max(schedule):
                break
        answers[kind] = out
        if kind == "sharded":
            assert stepper.clears >= 1                           # a reused row was cleared before its prefill
    assert all(len(v) == 12 for v in answers["local"].values())
    assert answers["sharded"] == answers["local"]


def test_serve_config_in_one_process_and_model_parallel_in_lockstep(tiny_predict_dir, tmp_path):  # noqa: F811
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    env = {**os.environ, "GLOG_v": "3", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    common = ["--config", YAML, f"--load_checkpoint={tiny_predict_dir}", "--runner_config.batch_size=3",
              "--no-warmup"]
    # one process (stand_alone YAML): the paged engine over batch_size sequences of seq_length tokens
    port = _free_port()
    single = subprocess.Popen([sys.executable, "-m", "telechat_ms.cli", "serve", *common, "--port", str(port),
                               f"--output_dir={tmp_path / 'run1'}"], env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}", single)
        want = _ask(f"http://127.0.0.1:{port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        models = client.models.list().data
        assert models[0].max_model_len == 256                    # seq_length: a sequence's prompt + answer
        want_lp = _prompt_logprobs(client)                       # the full forward's
    finally:
        single.send_signal(signal.SIGINT)
        out, _ = single.communicate(timeout=120)
    assert single.returncode == 0, out[-2000:]
    assert all(want)
    # model parallel: 2 msrun CPU workers, rank 0 serving HTTP, rank 1 replaying its steps
    traces = tmp_path / "traces"
    traces.mkdir()
    port = _free_port()
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
           f"--log_dir={tmp_path / 'logs'}", "--join=True", "--cluster_time_out=300",
           os.path.join(REPO, "tests", "lockstep_worker.py"), str(traces), "serve", *common, "--port", str(port),
           f"--output_dir={tmp_path / 'run2'}", "--parallel.parallel_mode=semi_auto_parallel",
           "--parallel_config.model_parallel=2", "--block-size", "8", "--num-blocks", "65",
           "--max-num-batched-tokens", "64"]
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}", proc, timeout=300)
        got = _ask(f"http://127.0.0.1:{port}")
        assert got == want
        # no full forward under mp: prompt log-probs go through the paged step, equal to the full forward's
        got_lp = _prompt_logprobs(openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x"))
        assert got_lp[0] is None and want_lp[0] is None and len(got_lp) == len(want_lp) > 5
        np.testing.assert_allclose(got_lp[1:], want_lp[1:], atol=1e-4, rtol=0)
        import httpx
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert _metric(text, "telechat_kv_cache_blocks_used") + _metric(text, "telechat_kv_cache_blocks_free") == 64
    finally:
        pid = int((traces / "rank0.pid").read_text()) if (traces / "rank0.pid").exists() else None
        if pid is not None:
            os.kill(pid, signal.SIGTERM)                          # rank 0 stops serving and releases rank 1
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    logs = "".join(open(p).read()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, out[-2000:] + logs
    rank0, rank1 = (np.load(traces / f"rank{r}.npz") for r in (0, 1))
    assert int(rank0["steps"]) == int(rank1["steps"]) >= 8          # a prefill + 7 decode steps at least
    for key in rank0.files:
        np.testing.assert_array_equal(rank1[key], rank0[key], err_msg=key)
