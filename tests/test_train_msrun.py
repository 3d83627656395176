"""Data parallel for real: 2 msrun CPU workers reproduce the single-process run with the same global batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from telechat_ms.checkpoint_io import safetensors_entries
from telechat_ms.job_config import load_job_config
from tests.train_helpers import losses, run_train, tiny_job, write_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_msrun_workers_match_single_process(demo_data, tmp_path):
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    if not os.path.exists(msrun):
        pytest.skip("msrun is not installed next to this python")
    # global batch 4 both ways: 1 process x 2 accumulated micro batches of 2 (three graphs per step), or
    # 2 workers x 1 micro batch of 2 (one graph with the AllReduce inside, then the update)
    # do_eval both ways: the held-out loss is a global token mean (NLL sum and count AllReduced over the workers)
    evaluate = {"do_eval": True, "eval_step_interval": 4}
    single = tiny_job(demo_data["data"], str(tmp_path / "single"), demo_data["vocab_size"],
                      runner_config={"batch_size": 2, "max_steps": 8, "gradient_accumulation_steps": 2},
                      eval_dataset={"data_dir": demo_data["data"], "batch_size": 6}, **evaluate)
    run_train(write_yaml(str(tmp_path / "single.yaml"), single))
    # the shipped DP config's context and parallel sections, the test's model and data
    shipped = load_job_config(os.path.join(REPO, "yaml_configs", "tiny", "finetune_tiny_cpu_dp2.yaml"))
    dp = tiny_job(demo_data["data"], str(tmp_path / "dp"), demo_data["vocab_size"],
                  runner_config={"batch_size": 2, "max_steps": 8, "gradient_accumulation_steps": 1},
                  parallel={"parallel_mode": shipped.parallel.parallel_mode},
                  parallel_config={"data_parallel": shipped.parallel_config.data_parallel},
                  eval_dataset={"data_dir": demo_data["data"], "batch_size": 3}, **evaluate)
    cfg = write_yaml(str(tmp_path / "dp.yaml"), dp)
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "LOG_DIR": str(tmp_path / "logs"), "GLOG_v": "3",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(["bash", os.path.join(REPO, "run_scripts", "msrun_train_cpu.sh"), "2", cfg],
                          capture_output=True, text=True, timeout=400, env=env)
    logs = "".join(open(p).read()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    a, b = losses(str(tmp_path / "single")), losses(str(tmp_path / "dp"))
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6, atol=1e-6)
    evals = [[r["eval_loss"] for r in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if "eval_loss" in r]
             for run in ("single", "dp")]
    assert len(evals[0]) == len(evals[1]) == 2
    np.testing.assert_allclose(evals[1], evals[0], rtol=1e-6)
    wa = {e.name: e.read() for e in safetensors_entries(str(tmp_path / "single" / "final" / "model.safetensors"))}
    wb = {e.name: e.read() for e in safetensors_entries(str(tmp_path / "dp" / "final" / "model.safetensors"))}
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], atol=1e-6, err_msg=name)
