"""The CLI table (one override syntax, one error handler, YAML-key help) and what the context / parallel sections
ask of MindSpore (the non-deprecated APIs), plus the loader's drop_remainder and the graph dump of save_graphs."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from telechat_ms.cli import build_parser, main
from telechat_ms.errors import ConfigError
from telechat_ms.job_config import load_job_config
from tests.conftest import REPO

Y7 = os.path.join(REPO, "yaml_configs", "7b", "finetune_telechat2_7b.yaml")
TINY = os.path.join(REPO, "yaml_configs", "tiny", "finetune_tiny_cpu.yaml")
DP2 = os.path.join(REPO, "yaml_configs", "tiny", "finetune_tiny_cpu_dp2.yaml")


def test_every_command_is_in_the_table():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) >= {"convert", "validate-index", "parity", "lora", "process-data", "train-tokenizer",
                                "train", "chat", "generate", "plan"}


def test_yaml_commands_document_their_keys_and_share_one_override_syntax(capsys):
    for command in ("train", "plan"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "telechat_ms/job_config.py" in capsys.readouterr().out
    # plan takes --key.path=value like train; the override reaches the YAML (an invalid layout: exit 1)
    assert main(["plan", "--config", Y7, "--parallel_config.model_parallel=3"]) == 1
    assert "n_head 32 is not divisible by model_parallel = 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "--config", Y7, "parallel_config.model_parallel=3"])
    assert "--key.path=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # commands that read no YAML take no overrides
        main(["validate-index", "x.json", "--runner_config.batch_size=2"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_one_error_handler_names_the_missing_directory(tmp_path, capsys):
    assert main(["convert", "hf2ms", str(tmp_path / "nonexistent"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("telechat-ms convert: error: ") and f"{tmp_path / 'nonexistent'}: no such checkpoint" in err
    assert main(["plan", "--config", Y7, "--runner_config.sink_mode=true"]) == 2
    assert "'runner_config.sink_mode': not supported" in capsys.readouterr().err


def test_context_settings_use_the_replacements_of_deprecated_keys(tmp_path):
    from telechat_ms.parallel.context import context_settings
    job = load_job_config(Y7, ["context.memory_optimize_level=O1", "context.save_graphs=true"])
    s = context_settings(job.context, job.parallel, job.parallel_config, job.source, str(tmp_path), world=8)
    assert s.memory == {"max_size": "58GB", "optimize_level": "O1"}           # mindspore.runtime.set_memory
    assert s.env == {"MS_DEV_SAVE_GRAPHS": "1", "MS_DEV_SAVE_GRAPHS_PATH": str(tmp_path / "graphs")}
    assert (s.device_target, s.device_id, s.jit_level) == ("Ascend", None, "O1")  # msrun assigns the device
    assert s.auto_parallel["parallel_mode"] == "semi_auto_parallel" and s.auto_parallel["device_num"] == 8
    cpu = load_job_config(TINY)
    s = context_settings(cpu.context, cpu.parallel, cpu.parallel_config, cpu.source, world=1)
    assert s.memory == {} and s.env == {} and s.auto_parallel is None
    with pytest.raises(ConfigError, match="'context.jit_level' O1 is Ascend-only"):
        bad = load_job_config(TINY, ["context.jit_level=O1"])
        context_settings(bad.context, bad.parallel, bad.parallel_config, bad.source, world=1)
    with pytest.raises(ConfigError, match="'parallel.gradients_mean' must be false in data_parallel"):
        dp = load_job_config(DP2, ["parallel.gradients_mean=true"])
        context_settings(dp.context, dp.parallel, dp.parallel_config, dp.source, world=2)
    with pytest.raises(ConfigError, match="'parallel.full_batch' must be true"):
        load_job_config(Y7, ["parallel.full_batch=false"])


def test_drop_remainder_false_completes_the_last_batch_from_the_epoch_start(demo_data):
    from telechat_ms.train.loader import BatchLoader
    kept = BatchLoader(demo_data["data"], 7, seed=3, drop_remainder=False)
    dropped = BatchLoader(demo_data["data"], 7, seed=3)
    n = kept.num_records
    assert n % 7, "the demo data must leave a remainder for this test"
    assert (kept.batches_per_epoch, dropped.batches_per_epoch) == (n // 7 + 1, n // 7)
    order = kept._order(0)
    seen = []
    for _ in range(kept.batches_per_epoch):
        seen.append(kept.next_global_batch()[0][0]["input_ids"])
    last = np.concatenate([order[(n // 7) * 7:], order[:7 - n % 7]])
    np.testing.assert_array_equal(seen[-1], kept._read(last)["input_ids"])
    assert kept.next_global_batch()[0][0].keys() and kept.state.epoch == 1  # the next epoch starts afresh


def test_save_graphs_dumps_the_compiled_graphs_into_the_run_directory(demo_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "telechat_ms.cli", "train", "--config", TINY,
           f"--train_dataset.data_dir={demo_data['data']}", f"--output_dir={out}",
           f"--model.model_config.vocab_size={demo_data['vocab_size']}", "--model.model_config.seq_length=64",
           "--runner_config.max_steps=1", "--context.save_graphs=true", "--callbacks.tensorboard=false",
           "--callbacks.loss_curve=false"]
    from telechat_ms import runtime_env
    inherited = {runtime_env.LOG_ENV: runtime_env.DEFAULT_LOG_DIR,   # as a parent that imported MindFormers leaves it
                 runtime_env.DEFAULTED_ENV: runtime_env.DEFAULT_LOG_DIR}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, **inherited})
    assert proc.returncode == 0, proc.stderr[-2000:]
    graphs = list((out / "graphs").rglob("*.ir"))
    assert graphs, f"no .ir files under {out / 'graphs'}"
    assert not (tmp_path / "output").exists()  # MindFormers' log is not written into the working directory
    assert list((out / "mindformers_log").rglob("*.log"))  # but under the run's output directory


def test_a_log_dir_the_user_set_wins_over_the_runs(monkeypatch, tmp_path):
    import sys as _sys
    from telechat_ms import runtime_env
    monkeypatch.delitem(_sys.modules, "mindformers", raising=False)   # as before MindFormers is first imported
    monkeypatch.setenv(runtime_env.LOG_ENV, "/user/choice")
    monkeypatch.delenv(runtime_env.DEFAULTED_ENV, raising=False)
    runtime_env.use_log_dir(str(tmp_path))
    assert os.environ[runtime_env.LOG_ENV] == "/user/choice"
    monkeypatch.delenv(runtime_env.LOG_ENV)
    runtime_env.use_log_dir(str(tmp_path))
    assert os.environ[runtime_env.LOG_ENV] == str(tmp_path / "mindformers_log")
