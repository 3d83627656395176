"""Helpers for the training tests: tiny job dicts and running `telechat-ms train` in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml


def tiny_job(data_dir: str, out_dir: str, vocab_size: int, **sections) -> dict:
    """A small CPU job: 2 layers, hidden 64, seq 64, batch 4, AdamW + cosine, clipping on."""
    job = {
        "seed": 7, "output_dir": out_dir,
        "context": {"mode": "GRAPH_MODE", "device_target": "CPU"},
        "model": {"model_config": {"preset": "tiny", "hidden_size": 64, "n_head": 4, "num_key_value_heads": 2,
                                   "ffn_hidden_size": 96, "vocab_size": vocab_size, "training_seqlen": 32,
                                   "base_seqlen": 32}},
        "runner_config": {"batch_size": 4, "max_steps": 10},
        "optimizer": {"weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8},
        "lr_schedule": {"type": "cosine", "learning_rate": 2e-3, "lr_end": 2e-4, "warmup_steps": 2},
        "runner_wrapper": {"use_clip_grad": True, "max_grad_norm": 1.0},
        "train_dataset": {"data_dir": data_dir},
        "callbacks": {"log_interval": 5, "save_interval": 0, "keep_checkpoint_max": 3, "tensorboard": False,
                      "loss_curve": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


def write_yaml(path: str, job: dict) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(job, fh)
    return path


def run_train(config: str, *overrides: str, env: dict | None = None, check: bool = True,
              timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "telechat_ms.cli", "train", "--config", config, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "GLOG_v": "3", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(out_dir: str) -> dict[int, float]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh)}
