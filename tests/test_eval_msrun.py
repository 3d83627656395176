"""`telechat-ms eval` under msrun for real, on 2 CPU workers, against one single-process run of the same model:

- data-parallel replicas (run_scripts/msrun_eval.sh -> `eval MODEL_DIR --data-parallel`): each worker scores the
  samples doc_id % 2 == its rank, rank 0 gathers the records over AllGather and writes the report: the same
  results, the same per-sample records (log-likelihoods to 1e-6: the replicas batch other rows together);
- model parallel (`eval --config PREDICT.yaml` with semi_auto_parallel, model_parallel 2; the Ascend-only
  semi-auto build replaced by a full CPU replica per rank, tests/lockstep_worker.py): rank 0 scores through the
  leader stepper and generates through an engine over it while rank 1 replays every step: both ranks ran the same
  steps, and rank 0's report equals the single-process one (log-likelihoods to 1e-5)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.predict_fixtures import TINY_PREDICT_YAML as YAML, tiny_predict_dir  # noqa: F401  (fixture)

DATA = Path(__file__).parent / "eval_data"
TASKS = ("ceval", "mmlu", "gsm8k")
ARGS = ["--data-dir", str(DATA), "--tasks", ",".join(TASKS), "--num-fewshot", "1", "--log-samples",
        "--max-gen-toks", "5", "--no-progress"]
MSRUN = os.path.join(os.path.dirname(sys.executable), "msrun")
needs_msrun = pytest.mark.skipif(not os.path.exists(MSRUN), reason="msrun is not installed next to this python")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "GLOG_v": "3", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _samples(out: Path, task: str) -> list[dict]:
    return [json.loads(x) for x in (out / f"samples_{task}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def single(tiny_predict_dir, tmp_path_factory) -> Path:  # noqa: F811
    """One process: MODEL_DIR with the YAML's batch (2) and context (256)."""
    from telechat_ms.cli import main
    out = tmp_path_factory.mktemp("eval_single")
    assert main(["eval", tiny_predict_dir, "--batch-size", "2", "--max-model-len", "256", "--output", str(out),
                 *ARGS]) == 0
    return out


def _same_report(single: Path, other: Path, atol: float) -> None:
    a, b = (json.loads((d / "results.json").read_text())["results"] for d in (single, other))
    assert a == b
    for task in TASKS:
        x_all, y_all = _samples(single, task), _samples(other, task)
        assert len(x_all) == len(y_all) > 1
        for x, y in zip(x_all, y_all):
            lx, ly = x.pop("loglikelihoods"), y.pop("loglikelihoods")
            assert x == y
            assert (lx is None) == (ly is None)
            if lx is not None:
                np.testing.assert_allclose(ly, lx, atol=atol, rtol=0)


def _run(cmd: list[str], tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=str(tmp))
    logs = "".join(p.read_text()[-3000:] for p in sorted((tmp / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    return proc


@needs_msrun
def test_data_parallel_replicas_write_the_single_process_report(single, tiny_predict_dir, tmp_path):  # noqa: F811
    env = {**_env(tmp_path), "PYTHON": sys.executable, "DEVICE_TARGET": "CPU", "MASTER_PORT": str(_free_port()),
           "LOG_DIR": str(tmp_path / "logs"), "CLUSTER_TIME_OUT": "200"}
    proc = _run([os.path.join(REPO, "run_scripts", "msrun_eval.sh"), "2", tiny_predict_dir, "--batch-size", "2",
                 "--max-model-len", "256", "--output", str(tmp_path / "dp"), *ARGS], tmp_path, env)
    _same_report(single, tmp_path / "dp", 1e-6)
    for task in TASKS:                 # each replica scored its own share, and only it
        shares = [[json.loads(x)["doc_id"] for x in (tmp_path / "dp" / "progress" / f"{task}.rank{r}.jsonl")
                   .read_text().splitlines()] for r in (0, 1)]
        assert sorted(shares[0] + shares[1]) == list(range(len(_samples(single, task))))
        assert all(d % 2 == r for r in (0, 1) for d in shares[r])
    assert "| ceval | acc |" in proc.stdout


@needs_msrun
def test_model_parallel_eval_launch_equals_the_single_process_report(single, tiny_predict_dir, tmp_path):  # noqa: F811
    traces = tmp_path / "traces"
    traces.mkdir()
    cmd = [MSRUN, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
           f"--log_dir={tmp_path / 'logs'}", "--join=True", "--cluster_time_out=200",
           os.path.join(REPO, "tests", "lockstep_worker.py"), str(traces), "eval", "--config", YAML,
           f"--load_checkpoint={tiny_predict_dir}", f"--output_dir={tmp_path / 'run'}",
           "--parallel.parallel_mode=semi_auto_parallel", "--parallel_config.model_parallel=2",
           "--output", str(tmp_path / "mp"), *ARGS]
    _run(cmd, tmp_path, _env(tmp_path))
    rank0, rank1 = (np.load(traces / f"rank{r}.npz") for r in (0, 1))
    # scoring: one step per batch of one-token continuations (ceval 4 and mmlu 3 questions, 2 rows: 4 steps);
    # gsm8k: at least a prefill and 4 decode steps
    assert int(rank0["steps"]) == int(rank1["steps"]) >= 9
    for key in rank0.files:
        np.testing.assert_array_equal(rank1[key], rank0[key], err_msg=key)
    _same_report(single, tmp_path / "mp", 1e-5)


def test_launchers_build_the_eval_msrun_commands():
    """DRY_RUN=1: the commands the two launch forms run (Ascend defaults)."""
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    dp = subprocess.run(["bash", os.path.join(REPO, "run_scripts", "msrun_eval.sh"), "4", "/data/7b", "--tasks",
                         "ceval"], capture_output=True, text=True, env=env, timeout=120)
    assert dp.returncode == 0, dp.stderr
    for part in ("msrun", "--worker_num=4", "--local_worker_num=4", "--tail_worker_log=0",
                 "eval /data/7b --data-parallel --device-target Ascend --tasks ceval"):
        assert part in dp.stdout, dp.stdout
    bad = subprocess.run(["bash", os.path.join(REPO, "run_scripts", "msrun_eval.sh"), "x", "/data/7b"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "not a positive integer" in bad.stderr
    y115 = os.path.join(REPO, "yaml_configs", "115b", "predict_telechat2_115b.yaml")
    mp = subprocess.run(["bash", os.path.join(REPO, "run_scripts", "msrun_predict.sh"), y115, "eval", "--tasks",
                         "mmlu", "--data-dir", "/data/bench", "--load_checkpoint=/data/115b"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert mp.returncode == 0, mp.stderr
    cmd = mp.stdout.strip().splitlines()[-1]
    for part in ("--worker_num=8", f"eval --config {y115} --tasks mmlu --data-dir /data/bench",
                 "--load_checkpoint=/data/115b"):
        assert part in cmd, cmd


def test_data_parallel_outside_msrun_is_a_named_error(tiny_predict_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    from telechat_ms.cli import main
    monkeypatch.delenv("MS_ROLE", raising=False)
    monkeypatch.delenv("RANK_TABLE_FILE", raising=False)
    assert main(["eval", tiny_predict_dir, "--data-parallel", "--output", str(tmp_path), *ARGS]) == 2
    assert "run_scripts/msrun_eval.sh WORKERS MODEL_DIR" in capsys.readouterr().err
