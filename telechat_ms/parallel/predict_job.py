"""A predict job YAML (yaml_configs/<size>/predict_telechat2_<size>.yaml): which keys it may set, and the typed
sections `generate --config`, `plan` and the model-parallel stepper read from it.

Every key of a predict YAML does something: load_checkpoint (weights, tokenizer, generation_config.json), seed (the
sampling seed, unless --seed), output_dir (MindFormers' log, saved graphs, the default --output), context.* (device,
mode, memory, jit level, graph dumps), parallel.* (the MindSpore parallel context), parallel_config.* (the split),
model.model_config.* (the model; seq_length is the kv-cache length) and runner_config.batch_size (the rows of the
kv cache: prompts answered together). Keys that only mean something for training are rejected, naming the key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import ConfigError
from telechat_ms.job_config import ContextConfig, JobConfig, ParallelConfig, ParallelContext, load_job_config
from telechat_ms.schema import parse_overrides, set_dotted, yaml_line_map

PREDICT_KEYS = frozenset({
    "run_mode", "seed", "output_dir", "load_checkpoint",
    "context.mode", "context.device_target", "context.device_id", "context.max_device_memory", "context.jit_level",
    "context.memory_optimize_level", "context.save_graphs",
    "parallel.parallel_mode", "parallel.full_batch", "parallel.search_mode", "parallel.strategy_ckpt_save_file",
    "parallel_config.data_parallel", "parallel_config.model_parallel", "parallel_config.pipeline_stage",
    "parallel_config.context_parallel", "parallel_config.vocab_emb_dp",
    "runner_config.batch_size",
})
OPEN_SECTIONS = ("model.model_config",)          # any TeleChatConfig field (checked by JobConfig.model_config)
_TRAINING = "a training setting; a predict job does not read it: remove it"
REJECTED = {
    "resume": _TRAINING, "train_dataset": _TRAINING, "optimizer": _TRAINING, "lr_schedule": _TRAINING,
    "runner_wrapper": _TRAINING, "callbacks": _TRAINING, "recompute_config": _TRAINING,
    "runner_config.epochs": _TRAINING, "runner_config.max_steps": _TRAINING,
    "runner_config.gradient_accumulation_steps": _TRAINING,
    "runner_config.seq_length": "the kv-cache length of a predict job is model.model_config.seq_length",
    "parallel.gradients_mean": _TRAINING, "parallel.enable_parallel_optimizer": _TRAINING,
    "parallel.parallel_optimizer_threshold": _TRAINING, "parallel_config.gradient_aggregation_group": _TRAINING,
    "parallel.pipeline_interleave": "pipeline-parallel inference is not provided",
    "parallel.pipeline_scheduler": "pipeline-parallel inference is not provided",
    "parallel_config.micro_batch_num": "pipeline-parallel inference is not provided",
    "parallel_config.pp_interleave_num": "pipeline-parallel inference is not provided",
    "model.pipeline_offset": "pipeline-parallel inference is not provided",
    "parallel_config.use_seq_parallel": "sequence parallel saves training activations; a decode step has one token "
                                        "per row",
    "parallel_config.context_parallel_algo": "context-parallel inference is not provided",
    "parallel_config.ulysses_degree_in_cp": "context-parallel inference is not provided",
    "model.lora": "merge the adapter into the checkpoint first (telechat-ms lora merge) and point "
                  "load_checkpoint at the merged directory",
}


@dataclass
class PredictJob:
    """The typed sections of a predict YAML."""

    source: str
    load_checkpoint: str
    seed: int
    output_dir: str
    context: ContextConfig
    parallel: ParallelContext
    parallel_config: ParallelConfig
    model_config: TeleChatConfig
    batch_size: int

    @property
    def model_parallel(self) -> bool:
        """True when the job splits the model (semi/auto parallel): generate then runs in lockstep under msrun."""
        return self.parallel.parallel_mode in ("semi_auto_parallel", "auto_parallel")


def _given_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys present in a YAML mapping; sections in OPEN_SECTIONS are kept whole."""
    if not isinstance(node, dict) or prefix in OPEN_SECTIONS:
        return [prefix] if prefix else []
    keys = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        keys += _given_keys(value, path) if isinstance(value, dict) and path not in REJECTED else [path]
    return keys


def key_errors(data: dict[str, Any], source: str, lines: dict[str, int] | None = None) -> list[str]:
    """Messages for every key of a (parsed, overridden) predict YAML that a predict job does not read."""
    lines = lines or {}
    out = []
    for key in _given_keys(data):
        if key in PREDICT_KEYS or key in OPEN_SECTIONS:
            continue
        where = f"{source}:{lines[key]}" if key in lines else source
        why = REJECTED.get(key) or REJECTED.get(key.split(".")[0]) or \
            f"not a predict key; a predict YAML may set {', '.join(sorted(PREDICT_KEYS))} and model.model_config.*"
        out.append(f"{where}: '{key}': {why}")
    return out


SEMI_AUTO_ONLY = ("parallel.full_batch", "parallel.search_mode", "parallel.strategy_ckpt_save_file")


def check_predict_values(job: JobConfig, given: list[str] | None = None) -> None:
    """Values a predict job cannot take (beyond the per-section checks of job_config); `given` are the keys the
    YAML sets (the semi-auto context keys mean nothing to a one-process or data-parallel job)."""
    if job.run_mode != "predict":
        raise ConfigError(f"{job.source}: 'run_mode' is {job.run_mode}; generate --config needs a predict YAML "
                          "(run_mode: predict, e.g. yaml_configs/115b/predict_telechat2_115b.yaml)")
    pc, mode = job.parallel_config, job.parallel.parallel_mode
    for name in ("pipeline_stage", "context_parallel"):
        if getattr(pc, name) != 1:
            raise ConfigError(f"{job.source}: 'parallel_config.{name}' is {getattr(pc, name)}: "
                              f"{name.split('_')[0]}-parallel inference is not provided; set it to 1")
    semi_only = sorted(set(given or ()) & set(SEMI_AUTO_ONLY))
    if semi_only and mode not in ("semi_auto_parallel", "auto_parallel"):
        raise ConfigError(f"{job.source}: {', '.join(repr(k) for k in semi_only)} only apply under "
                          f"parallel.parallel_mode semi_auto_parallel (this job is {mode}): remove them")
    if mode in ("semi_auto_parallel", "auto_parallel") and pc.data_parallel != 1:
        raise ConfigError(f"{job.source}: 'parallel_config.data_parallel' is {pc.data_parallel}: a model-parallel "
                          "predict job holds one replica; launch one job per replica")


def reject_flags(given: list[tuple[Any, str, str]]) -> None:
    """(value, flag, key) of command-line options a predict YAML decides: any given one is an error naming the key
    to override instead (generate --config, serve --config)."""
    for value, flag, key in given:
        if value:
            raise ConfigError(f"{flag} is not used with --config: the YAML's {key} says it "
                              f"(override it with --{key}=VALUE)")


def load_predict_job(path: str, overrides: list[str] | None = None) -> PredictJob:
    """Read a predict YAML with `key.path=value` overrides; every key must be one a predict job reads."""
    job = load_job_config(path, overrides)   # types, sections, line numbers in its errors
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    data = yaml.safe_load(text) or {}
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    errors = key_errors(data, path, yaml_line_map(text))
    if errors:
        raise ConfigError("; ".join(errors))
    check_predict_values(job, _given_keys(data))
    return predict_job(job)


def predict_job(job: JobConfig) -> PredictJob:
    """The typed sections a predict run reads, from a checked job (load_predict_job checks it)."""
    return PredictJob(source=job.source, load_checkpoint=job.load_checkpoint, seed=job.seed,
                      output_dir=os.path.abspath(job.output_dir), context=job.context, parallel=job.parallel,
                      parallel_config=job.parallel_config, model_config=job.model_config(),
                      batch_size=job.runner_config.batch_size)
