"""The lockstep protocol for real: 2 msrun CPU workers run `generate --config --input` of a model-parallel predict
YAML on the paged engine (each rank a full CPU replica of the paged predict configuration in place of the
Ascend-only semi-auto build): rank 0's broadcast paged calls drive rank 1 call for call, both ranks compute the same
logits, and rank 0's output file equals the single-process answers of the same YAML."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.predict_fixtures import TINY_PREDICT_YAML as YAML, tiny_predict_dir  # noqa: F401  (fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_step_in_lockstep_and_rank0_writes_the_single_process_answers(
        tiny_predict_dir, tmp_path):  # noqa: F811
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    if not os.path.exists(msrun):
        pytest.skip("msrun is not installed next to this python")
    lines = [{"id": "a", "prompt": "你好"}, {"id": "b", "prompt": "1+1=?"}, {"id": "c", "prompt": "tell me more"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    common = ["--input", str(src), "--max-new-tokens", "6", "--quiet", f"--load_checkpoint={tiny_predict_dir}"]
    single = tmp_path / "single.jsonl"
    env = {**os.environ, "GLOG_v": "3", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run([sys.executable, "-m", "telechat_ms.cli", "generate", "--config", YAML, "--output",
                           str(single), f"--output_dir={tmp_path / 'run1'}", *common],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    traces, out = tmp_path / "traces", tmp_path / "mp.jsonl"
    traces.mkdir()
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
           f"--log_dir={tmp_path / 'logs'}", "--join=True", "--cluster_time_out=200",
           os.path.join(REPO, "tests", "lockstep_worker.py"), str(traces), "generate", "--config", YAML,
           "--output", str(out), f"--output_dir={tmp_path / 'run2'}", "--parallel.parallel_mode=semi_auto_parallel",
           "--parallel_config.model_parallel=2", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=str(tmp_path))
    logs = "".join(open(p).read()[-3000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-2000:] + logs
    rank0, rank1 = (np.load(traces / f"rank{r}.npz") for r in (0, 1))
    steps = int(rank0["steps"])
    # the paged engine over 2 rows (runner_config.batch_size): 3 prompts of 6 tokens, continuous batching
    assert steps == int(rank1["steps"]) >= 6 + 6 // 2
    for key in rank0.files:
        np.testing.assert_array_equal(rank1[key], rank0[key], err_msg=key)
    calls = [rank0[f"s{i}_in0"] for i in range(steps)]
    assert max(c.shape[0] for c in calls) == 2 and {c.shape[1] for c in calls} >= {1}   # batched decodes
    assert out.read_text(encoding="utf-8") == single.read_text(encoding="utf-8")
    assert [json.loads(x)["id"] for x in out.read_text(encoding="utf-8").splitlines()] == ["a", "b", "c"]
