"""`telechat-ms generate --config PREDICT.yaml`: every key of a predict YAML is read (or rejected, naming it), and on
CPU the one-process path answers exactly what `generate MODEL_DIR` answers with the same batch size and seed."""
from __future__ import annotations

import glob
import json
import os

import pytest
import yaml

from telechat_ms.cli import main
from telechat_ms.errors import ConfigError
from telechat_ms.parallel.predict_job import load_predict_job
from tests.conftest import REPO
from tests.predict_fixtures import TINY_PREDICT_YAML, tiny_predict_dir  # noqa: F401  (fixture)

PREDICT_YAMLS = sorted(glob.glob(os.path.join(REPO, "yaml_configs", "*", "predict_*.yaml")))


@pytest.mark.parametrize("path", PREDICT_YAMLS, ids=[os.path.basename(p) for p in PREDICT_YAMLS])
def test_every_shipped_predict_yaml_sets_only_keys_a_predict_job_reads(path):
    job = load_predict_job(path)
    raw = yaml.safe_load(open(path, encoding="utf-8"))
    assert job.batch_size == raw["runner_config"]["batch_size"] and job.seed == raw["seed"]
    assert job.parallel_config.model_parallel == raw["parallel_config"]["model_parallel"]
    assert job.model_config.seq_length == raw["model"]["model_config"]["seq_length"]
    assert job.model_parallel == (raw["parallel"]["parallel_mode"] == "semi_auto_parallel")
    assert job.output_dir == os.path.abspath(raw["output_dir"]) and job.load_checkpoint == raw["load_checkpoint"]


@pytest.mark.parametrize("override,message", [
    ("optimizer.eps=1e-6", "'optimizer': a training setting"),
    ("runner_config.epochs=2", "'runner_config.epochs': a training setting"),
    ("runner_config.seq_length=4096", "kv-cache length of a predict job is model.model_config.seq_length"),
    ("parallel_config.use_seq_parallel=true", "'parallel_config.use_seq_parallel': sequence parallel"),
    ("parallel.enable_parallel_optimizer=true", "'parallel.enable_parallel_optimizer': a training setting"),
    ("parallel_config.micro_batch_num=4", "pipeline-parallel inference is not provided"),
    ("parallel_config.pipeline_stage=2", "'parallel_config.pipeline_stage' is 2: pipeline-parallel inference"),
    ("parallel_config.data_parallel=2", "'parallel_config.data_parallel' is 2: a model-parallel predict job holds"),
    ("run_mode=finetune", "'run_mode' is finetune; generate --config needs a predict YAML"),
    ("parallel.parallel_mode=stand_alone", "'parallel.full_batch', 'parallel.search_mode', "
                                           "'parallel.strategy_ckpt_save_file' only apply under "
                                           "parallel.parallel_mode semi_auto_parallel (this job is stand_alone)"),
])
def test_keys_that_mean_nothing_for_predict_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_predict_job(os.path.join(REPO, "yaml_configs", "115b", "predict_telechat2_115b.yaml"), [override])


def test_the_semi_auto_keys_default_when_a_one_npu_yaml_is_split():
    job = load_predict_job(os.path.join(REPO, "yaml_configs", "7b", "predict_telechat2_7b.yaml"),
                           ["parallel.parallel_mode=semi_auto_parallel", "parallel_config.model_parallel=2"])
    assert job.model_parallel and job.parallel.full_batch and job.parallel.search_mode == "sharding_propagation"


def test_a_rejected_key_is_reported_with_its_line(tmp_path):
    data = yaml.safe_load(open(TINY_PREDICT_YAML, encoding="utf-8"))
    data["model"]["lora"] = {"rank": 4}
    path = tmp_path / "with_lora.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith("lora:"))
    with pytest.raises(ConfigError, match=rf"with_lora.yaml:{line}: 'model.lora': merge the adapter"):
        load_predict_job(str(path))


def _records(path) -> list[dict]:
    return [json.loads(x) for x in open(path, encoding="utf-8").read().splitlines()]


def test_generate_config_answers_like_generate_model_dir(tiny_predict_dir, tmp_path, capsys,  # noqa: F811
                                                         pynative_after):
    lines = [{"id": i, "prompt": p} for i, p in enumerate(["你好", "1+1=?", "tell me more"])]
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    run_dir = tmp_path / "run"
    rc = main(["generate", "--config", TINY_PREDICT_YAML, "--input", str(src), "--max-new-tokens", "6", "--quiet",
               "--do-sample", f"--load_checkpoint={tiny_predict_dir}", f"--output_dir={run_dir}"])
    assert rc == 0
    got = _records(run_dir / "q.answers.jsonl")            # the default output: OUTPUT_DIR/<input>.answers.jsonl
    ref = tmp_path / "ref.jsonl"
    assert main(["generate", tiny_predict_dir, "--input", str(src), "--output", str(ref), "--max-new-tokens", "6",
                 "--quiet", "--do-sample", "--seed", "0", "--batch-size", "2"]) == 0   # the YAML's seed and batch
    assert got == _records(ref) and len(got) == 3
    # the YAML's seed is the one used: another seed samples other answers
    other = tmp_path / "other.jsonl"
    assert main(["generate", tiny_predict_dir, "--input", str(src), "--output", str(other), "--max-new-tokens", "6",
                 "--quiet", "--do-sample", "--seed", "4", "--batch-size", "2"]) == 0
    assert _records(other) != got
    assert main(["generate", "--config", TINY_PREDICT_YAML, "--prompt", "你好", "--max-new-tokens", "6",
                 f"--load_checkpoint={tiny_predict_dir}", f"--output_dir={run_dir}", "--greedy"]) == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.parametrize("argv,message", [
    (["MODEL", "--config", TINY_PREDICT_YAML, "--prompt", "x"], "MODEL_DIR is not used with --config"),
    (["--config", TINY_PREDICT_YAML, "--prompt", "x", "--batch-size", "4"], "--batch-size is not used with --config"),
    (["MODEL", "--prompt", "x", "--runner_config.batch_size=2"], "overrides need --config"),
    (["--prompt", "x"], "give MODEL_DIR or --config"),
    (["--config", TINY_PREDICT_YAML], "give exactly one of --input"),
])
def test_generate_config_usage_errors(argv, message, capsys):
    assert main(["generate", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--block-size", "--num-blocks", "--kv-cache-memory-bytes",
                                  "--max-num-batched-tokens"])
def test_serve_config_reads_the_paged_cache_flags(flag, capsys):
    """serve --config runs the paged engine: its cache flags are read (a bad value is refused, naming the flag,
    before anything loads); tests/test_serve_config.py serves with them under msrun."""
    assert main(["serve", "--config", TINY_PREDICT_YAML, flag, "0"]) == 2
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_serve_config_sizes_the_paged_cache_per_npu():
    """--kv-cache-memory-bytes is per NPU: mp NPUs hold 1/mp of every block, so the same budget holds mp x the
    blocks (never more than runner_config.batch_size sequences of seq_length fill)."""
    from telechat_ms.parallel.predict_job import load_predict_job
    from telechat_ms.serve.server import ServeConfig, paged_settings
    cfg = load_predict_job(TINY_PREDICT_YAML).model_config
    per_block = 2 * cfg.n_layer * cfg.num_key_value_heads * cfg.head_dim * 4 * 16
    settings = ServeConfig(model_dir="", max_batch_size=64, kv_cache_memory_bytes=per_block * 10)
    assert paged_settings(settings, cfg, 256)["num_blocks"] == 10
    assert paged_settings(settings, cfg, 256, mp=2)["num_blocks"] == 20
    assert paged_settings(ServeConfig(model_dir="", max_batch_size=2), cfg, 256, mp=2)["num_blocks"] == 2 * 16 + 1


@pytest.mark.parametrize("argv,message", [
    (["MODEL", "--prompt", "x", "--block-size", "8"], "--block-size is not used here"),
    (["MODEL", "--input", "x.jsonl", "--output", "y", "--data-parallel", "--num-blocks", "9"],
     "--num-blocks is not used here"),
    (["--config", TINY_PREDICT_YAML, "--input", "x.jsonl", "--max-model-len", "64"],
     "--max-model-len is not used with --config"),
])
def test_generate_refuses_engine_flags_where_no_engine_runs(argv, message, capsys):
    assert main(["generate", *argv]) == 2
    assert message in capsys.readouterr().err
