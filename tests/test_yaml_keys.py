"""Every key of every shipped YAML is read by the code that runs the job, and keys the code does not implement are
rejected with a message naming them (sink_mode, fine_grain_interleave), never accepted and ignored.

Reads are recorded on the typed sections (and on TeleChatConfig for model.model_config) while the consumers run:
plan, the context / parallel settings, parallelize on a stand-in model of the same head / layer structure, one real
training run on CPU (the trainer reads the same fields whatever the YAML's values) for training YAMLs, and the
predict job generate / serve --config run from for predict YAMLs."""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import typing

import pytest
import yaml

from telechat_ms import job_config as jc
from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import ConfigError
from telechat_ms.job_config import JobConfig, job_from_dict, load_job_config
from tests.conftest import REPO

YAMLS = sorted(glob.glob(os.path.join(REPO, "yaml_configs", "*", "*.yaml")))
SECTIONS = sorted({c for c in vars(jc).values() if dataclasses.is_dataclass(c) and isinstance(c, type)} | {TeleChatConfig},
                  key=lambda c: c.__name__)


@contextlib.contextmanager
def recording():
    """Record (class name, field) of every dataclass field read on the sections while the block runs."""
    reads: set[tuple[str, str]] = set()
    patched = []
    for cls in SECTIONS:
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _names=names, _cls=cls.__name__):
            if name in _names:
                reads.add((_cls, name))
            return object.__getattribute__(self, name)
        assert "__getattribute__" not in cls.__dict__
        cls.__getattribute__ = getattribute
        patched.append(cls)
    try:
        yield reads
    finally:
        for cls in patched:
            del cls.__getattribute__


def leaf_keys(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and path != "model.model_config":
            out += leaf_keys(value, path)
        elif path == "model.model_config":
            out += [f"{path}.{k}" for k in value]
        else:
            out.append(path)
    return out


def owner(path: str) -> tuple[str, str]:
    """(class name, field) a dotted YAML key is stored in."""
    parts = path.split(".")
    if parts[:2] == ["model", "model_config"]:
        return ("JobConfig", "model") if parts[2] == "preset" else ("TeleChatConfig", parts[2])
    cls = JobConfig
    for part in parts[:-1]:
        tp = typing.get_type_hints(cls)[part]
        cls = next(a for a in typing.get_args(tp) or (tp,) if dataclasses.is_dataclass(a))
    return cls.__name__, parts[-1]


def stand_in(job):
    """The YAML's model with tiny hidden sizes but the same heads, kv heads and layers (builds in a second)."""
    from telechat_ms.model.telechat import TeleChatForCausalLM
    cfg = job.model_config()
    return TeleChatForCausalLM(cfg.replace(hidden_size=2 * cfg.n_head, ffn_hidden_size=16 * 8, vocab_size=256))


def consume(job) -> None:
    """The consumers CPU can run for any job: plan, the context settings, parallelize (training layouts), and for a
    predict job what `generate --config` / `serve --config` read (its PredictJob, the predict strategies)."""
    from telechat_ms.parallel.context import context_settings
    from telechat_ms.parallel.parallelize import parallelize, parallelize_predict
    from telechat_ms.parallel.plan import make_plan
    from telechat_ms.parallel.predict_job import predict_job
    make_plan(job)
    world = 1 if job.parallel.parallel_mode == "stand_alone" else job.parallel_config.world_size
    if job.run_mode == "predict":
        pj = predict_job(job)
        context_settings(pj.context, pj.parallel, pj.parallel_config, pj.source, pj.output_dir, world=world)
        model = stand_in(job)                                   # generate / serve --config build the model
        if pj.model_parallel:
            parallelize_predict(model, pj.parallel_config, pj.source)
        return
    context_settings(job.context, job.parallel, job.parallel_config, job.source, job.output_dir, world=world)
    if job.parallel.parallel_mode in ("semi_auto_parallel", "auto_parallel"):
        model = stand_in(job)
        parallelize(model, job.parallel_config, job.recompute_config, job.parallel, job.model,
                    job.runner_config.seq_length or model.config.seq_length, source=job.source)


@pytest.fixture(scope="module")
def trainer_reads(demo_data, tmp_path_factory):
    """Fields one real CPU training run reads (warmup by ratio, so both warmup keys are consulted; do_eval on, so the
    eval keys are)."""
    import mindspore as ms
    from telechat_ms.train.trainer import train
    out = str(tmp_path_factory.mktemp("keys_run"))
    job = load_job_config(os.path.join(REPO, "yaml_configs", "tiny", "finetune_tiny_cpu.yaml"),
                          [f"train_dataset.data_dir={demo_data['data']}", f"output_dir={out}",
                           f"model.model_config.vocab_size={demo_data['vocab_size']}", "model.model_config.seq_length=64",
                           "runner_config.max_steps=-1", "runner_config.epochs=1",
                           "runner_config.batch_size=32", "lr_schedule.warmup_steps=0", "lr_schedule.warmup_ratio=0.5",
                           "callbacks.tensorboard=false", "callbacks.loss_curve=false",
                           "do_eval=true", f"eval_dataset.data_dir={demo_data['data']}", "eval_dataset.batch_size=32",
                           "eval_step_interval=2", "eval_epoch_interval=1", "eval_max_steps=1"])
    with recording() as reads:
        train(job)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return reads


@pytest.mark.parametrize("path", YAMLS, ids=[os.path.relpath(p, REPO) for p in YAMLS])
def test_every_key_of_the_shipped_yaml_is_read(path, trainer_reads):
    job = load_job_config(path)
    with recording() as reads:
        consume(job)
    if job.run_mode != "predict":
        reads |= trainer_reads
    with open(path, encoding="utf-8") as fh:
        keys = leaf_keys(yaml.safe_load(fh))
    unread = [k for k in keys if owner(k) not in reads]
    assert not unread, f"{os.path.relpath(path, REPO)}: keys no code reads: {unread}"


@pytest.mark.parametrize("key,value,message", [
    ("runner_config.sink_mode", True, "not supported: telechat_ms feeds every step from the host"),
    ("model.fine_grain_interleave", 2, "fine-grained interleave needs its interleaved layer class"),
    ("source", "x.yaml", "not a YAML key"),
])
def test_unimplemented_keys_are_rejected_naming_them(key, value, message):
    section, _, name = key.rpartition(".")
    data = {"model": {"model_config": {"preset": "tiny"}}}
    (data.setdefault(section, {}) if section else data)[name] = value
    with pytest.raises(ConfigError, match=rf"'{key}'.*{message}"):
        job_from_dict(data, source="job.yaml")


def test_a_key_nobody_reads_would_fail_the_walk():
    """The recorder itself: a field the consumers never touch is reported."""
    job = job_from_dict({"model": {"model_config": {"preset": "tiny"}}})
    with recording() as reads:
        _ = job.runner_config.batch_size
    assert ("RunnerConfig", "batch_size") in reads and ("RunnerConfig", "epochs") not in reads
    assert owner("runner_config.epochs") == ("RunnerConfig", "epochs")
    assert owner("model.model_config.training_seqlen") == ("TeleChatConfig", "training_seqlen")
