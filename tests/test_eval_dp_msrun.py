"""Data-parallel eval replicas for real: run_scripts/msrun_eval.sh starts 2 msrun CPU workers of `telechat-ms eval
--data-parallel`; each scores its share of the samples (doc_id % 2), rank 0 gathers the records over the workers'
AllGather and writes the report, equal to a single-process run: the same per-sample log-likelihoods (1e-6: the
replicas batch other rows together), generations, preds and the same metrics."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DATA = Path(__file__).parent / "eval_data"
TASKS = ("ceval", "mmlu", "gsm8k")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(out: Path, task: str) -> list[dict]:
    return [json.loads(x) for x in (out / f"samples_{task}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_two_replicas_write_the_single_process_report(tmp_path):
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "msrun")):
        pytest.skip("msrun is not installed next to this python")
    from telechat_ms.cli import main
    from telechat_ms.data.train_tokenizer import train_tokenizer
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    tok = train_tokenizer(str(tmp_path / "tok"), vocab_size=1024)
    model = str(tmp_path / "model")
    write_random_hf_checkpoint(model, tiny_config(vocab_size=tok.vocab_size, seq_length=512, training_seqlen=512,
                                                  base_seqlen=512), qk_scale=4.0, seed=8)
    tok.save_pretrained(model)
    args = ["--data-dir", str(DATA), "--tasks", ",".join(TASKS), "--num-fewshot", "1", "--batch-size", "2",
            "--log-samples", "--max-gen-toks", "6", "--no-progress"]
    assert main(["eval", model, "--output", str(tmp_path / "single"), *args]) == 0
    env = {**os.environ, "GLOG_v": "3", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "PYTHON": sys.executable, "DEVICE_TARGET": "CPU", "MASTER_PORT": str(_free_port()),
           "LOG_DIR": str(tmp_path / "logs"), "CLUSTER_TIME_OUT": "200", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([os.path.join(REPO, "run_scripts", "msrun_eval.sh"), "2", model, "--output",
                           str(tmp_path / "dp"), *args], capture_output=True, text=True, timeout=400, env=env,
                          cwd=str(tmp_path))
    logs = "".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    single, dp = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("single", "dp"))
    assert dp["results"] == single["results"]
    for task in TASKS:
        a, b = _samples(tmp_path / "single", task), _samples(tmp_path / "dp", task)
        assert [r["doc_id"] for r in b] == list(range(len(a)))
        for x, y in zip(a, b):
            lx, ly = x.pop("loglikelihoods"), y.pop("loglikelihoods")
            assert x == y
            assert (lx is None) == (ly is None)
            if lx is not None:
                assert max(abs(p - q) for p, q in zip(lx, ly)) < 1e-6
    # each replica scored its own share
    for task in TASKS:
        shares = [[json.loads(x)["doc_id"] for x in (tmp_path / "dp" / "progress" / f"{task}.rank{r}.jsonl")
                   .read_text().splitlines()] for r in (0, 1)]
        assert all(d % 2 == r for r in (0, 1) for d in shares[r]) and sum(map(len, shares)) == len(_samples(
            tmp_path / "single", task))
    assert "| ceval | acc |" in proc.stdout
