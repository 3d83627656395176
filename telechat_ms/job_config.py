"""The job YAML (MindFormers' vocabulary) as typed sections: model, parallel, recompute, runner, optimizer,
lr schedule, dataset, callbacks. One loader for train, plan and predict; every key is documented here, next to
its field, and every key is read by the code (tests/test_yaml_keys.py walks the shipped YAMLs).

    job = load_job_config("yaml_configs/tiny/finetune_tiny_cpu.yaml", overrides=["runner_config.batch_size=4"])
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import ConfigError
from telechat_ms.schema import Where, build, parse_overrides, set_dotted, yaml_line_map


def _one_of(where: Where, path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{where(path)} must be one of {list(allowed)}, got {value!r}")


def _positive(where: Where, path: str, value: int | float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{where(path)} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


@dataclass
class ContextConfig:
    """How MindSpore runs (telechat_ms.parallel.context applies it with MindSpore 2.9's non-deprecated APIs)."""
    mode: str = "GRAPH_MODE"                 # GRAPH_MODE | PYNATIVE_MODE (mindspore.set_context)
    device_target: str = "CPU"               # CPU | Ascend | GPU (mindspore.set_device)
    device_id: int = 0                       # single process only; under msrun DEVICE_ID / msrun assigns it
    max_device_memory: str = ""              # e.g. "58GB" on Atlas 800T A2 (mindspore.runtime.set_memory max_size)
    jit_level: str = "O0"                    # O0 | O1 | O2: JitConfig of every compiled step cell (Ascend; CPU: O0)
    memory_optimize_level: str = "O0"        # O0 | O1 (mindspore.runtime.set_memory optimize_level)
    save_graphs: bool = False                # dump compiled graphs under output_dir/graphs (MS_DEV_SAVE_GRAPHS)

    def check(self, where: Where, prefix: str) -> None:
        _one_of(where, f"{prefix}.mode", self.mode, ("GRAPH_MODE", "PYNATIVE_MODE"))
        _one_of(where, f"{prefix}.device_target", self.device_target, ("CPU", "Ascend", "GPU"))
        _one_of(where, f"{prefix}.jit_level", self.jit_level, ("O0", "O1", "O2"))
        _one_of(where, f"{prefix}.memory_optimize_level", self.memory_optimize_level, ("O0", "O1"))


@dataclass
class ParallelContext:
    """mindspore.set_auto_parallel_context arguments (the YAML 'parallel' section)."""
    parallel_mode: str = "stand_alone"       # stand_alone | data_parallel | semi_auto_parallel | auto_parallel
    gradients_mean: bool = False
    full_batch: bool = True
    search_mode: str = "sharding_propagation"
    enable_parallel_optimizer: bool = False
    parallel_optimizer_threshold: int = 64   # KB; smaller parameters are not sharded
    strategy_ckpt_save_file: str = "./ckpt_strategy.ckpt"
    pipeline_interleave: bool = False
    pipeline_scheduler: str = "1f1b"

    def check(self, where: Where, prefix: str) -> None:
        _one_of(where, f"{prefix}.parallel_mode", self.parallel_mode,
                ("stand_alone", "data_parallel", "semi_auto_parallel", "auto_parallel"))
        if self.parallel_mode in ("semi_auto_parallel", "auto_parallel") and not self.full_batch:
            raise ConfigError(f"{where(prefix + '.full_batch')} must be true under {self.parallel_mode}: every rank "
                              "feeds the whole global batch and the compiled graph splits it")
        _one_of(where, f"{prefix}.pipeline_scheduler", self.pipeline_scheduler, ("1f1b", "gpipe", "seqpipe"))


@dataclass
class ParallelConfig:
    """The model's parallel layout (MindFormers' parallel_config)."""
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    expert_parallel: int = 1                 # MoE: experts split over this many data-parallel ranks (MindFormers')
    context_parallel: int = 1
    context_parallel_algo: str = "colossalai_cp"   # colossalai_cp (ring attention) | ulysses_cp | hybrid_cp
    ulysses_degree_in_cp: int = 1
    use_seq_parallel: bool = False
    micro_batch_num: int = 1
    pp_interleave_num: int = 1
    vocab_emb_dp: bool = False
    gradient_aggregation_group: int = 4

    def check(self, where: Where, prefix: str) -> None:
        for name in ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel", "context_parallel",
                     "micro_batch_num",
                     "pp_interleave_num", "ulysses_degree_in_cp", "gradient_aggregation_group"):
            _positive(where, f"{prefix}.{name}", getattr(self, name))
        _one_of(where, f"{prefix}.context_parallel_algo", self.context_parallel_algo,
                ("colossalai_cp", "ulysses_cp", "hybrid_cp"))

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage * self.context_parallel


@dataclass
class RecomputeConfig:
    """What to recompute in the backward pass (MindFormers' recompute_config)."""
    recompute: bool | list = False           # full recompute of every layer (or a per-stage list of layer counts)
    select_recompute: bool | list = False    # selective: attention scores / softmax / activations only
    select_comm_recompute: bool | list = False  # recompute norms + their sequence-parallel all-gather
    parallel_optimizer_comm_recompute: bool = False
    mp_comm_recompute: bool = True
    recompute_slice_activation: bool = False


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wk_v"])

    def check(self, where: Where, prefix: str) -> None:
        _positive(where, f"{prefix}.rank", self.rank)
        allowed = ("wq", "wk_v", "wo", "w1", "w2", "w3")
        for i, name in enumerate(self.target_modules):
            _one_of(where, f"{prefix}.target_modules[{i}]", name, allowed)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where(prefix + '.dropout')} must be in [0, 1), got {self.dropout}")


@dataclass
class ModelSection:
    model_config: dict[str, Any] = field(default_factory=dict)   # TeleChatConfig fields, or `preset: tiny` + fields
    lora: LoraConfig | None = None
    pipeline_offset: list = field(default_factory=list)          # layers moved between stages, e.g. [-1, 1, 1, -1]
    REJECTED_KEYS = {"fine_grain_interleave": "not supported: MindFormers' fine-grained interleave needs its "
                                              "interleaved layer class, which telechat_ms layers do not implement "
                                              "(a speed feature: results and memory are the same without it); "
                                              "remove the key"}


@dataclass
class MoeConfig:
    """MindFormers' moe_config for an MoE model (TeleChat2-39B-A12B): the routing is the model's (checked against
    its config), the training switches are capacity and the load-balancing loss."""
    expert_num: int = 0                      # 0 = the model's num_experts; else must equal it
    num_experts_chosen: int = 0              # 0 = the model's num_experts_per_tok; else must equal it
    capacity_factor: float = 0.0             # training forwards: each expert keeps ceil(k*tokens*factor/E) choices
                                             # (k-major, the rest dropped); 0 = no dropping. Inference never drops.
    aux_loss_types: list[str] = field(default_factory=lambda: ["expert"])  # "expert": MindFormers' balance loss
    aux_loss_factors: list[float] = field(default_factory=lambda: [0.0])   # its factor (loss added to the NLL)
    routing_policy: str = "TopkRouterV2"     # the only policy: softmax top-k, k-major capacity (MindFormers')
    norm_topk_prob: bool = True              # must equal the model's (TeleChat2-39B-A12B: true)
    router_dense_type: str = "float32"       # the router runs in fp32 (the only value)
    shared_expert_num: int = 0               # TeleChat2 MoE has no shared expert (only 0)
    REJECTED_KEYS = {"enable_sdrop": "not supported: only MindFormers' k-major capacity (enable_sdrop false) is "
                                     "implemented; remove the key"}

    def check(self, where: Where, prefix: str) -> None:
        _positive(where, f"{prefix}.capacity_factor", self.capacity_factor, zero_ok=True)
        self._check_routing(where, prefix)
        for i, kind in enumerate(self.aux_loss_types):
            _one_of(where, f"{prefix}.aux_loss_types[{i}]", kind, ("expert",))
        if len(self.aux_loss_types) != len(self.aux_loss_factors):
            raise ConfigError(f"{where(prefix + '.aux_loss_factors')} must give one factor per aux_loss_types "
                              f"entry ({len(self.aux_loss_types)}), got {self.aux_loss_factors}")
        for i, factor in enumerate(self.aux_loss_factors):
            _positive(where, f"{prefix}.aux_loss_factors[{i}]", factor, zero_ok=True)

    def _check_routing(self, where, prefix: str) -> None:
        """The routing the model implements (one value each): checked on load, and again where the job's model
        config is built (so the keys are what the model runs with, not ignored)."""
        _one_of(where, f"{prefix}.routing_policy", self.routing_policy, ("TopkRouterV2",))
        _one_of(where, f"{prefix}.router_dense_type", self.router_dense_type, ("float32",))
        _one_of(where, f"{prefix}.shared_expert_num", self.shared_expert_num, (0,))

    def apply(self, cfg: TeleChatConfig, source: str) -> TeleChatConfig:
        """The model config with this section's training switches; the routing fields must agree with it."""
        self._check_routing(Where(source), "moe_config")
        if not cfg.is_moe:
            raise ConfigError(f"{source}: 'moe_config' is given but the model is dense (num_experts "
                              f"{cfg.num_experts}); remove it or set model.model_config.num_experts")
        for key, ours, theirs in (("expert_num", self.expert_num, cfg.num_experts),
                                  ("num_experts_chosen", self.num_experts_chosen, cfg.num_experts_per_tok)):
            if ours and ours != theirs:
                raise ConfigError(f"{source}: 'moe_config.{key}' is {ours} but the model has {theirs}")
        if self.norm_topk_prob != cfg.norm_topk_prob:
            raise ConfigError(f"{source}: 'moe_config.norm_topk_prob' is {self.norm_topk_prob} but the model's "
                              f"is {cfg.norm_topk_prob}")
        factor = float(sum(f for t, f in zip(self.aux_loss_types, self.aux_loss_factors) if t == "expert"))
        return cfg.replace(capacity_factor=float(self.capacity_factor), aux_loss_factor=factor)


@dataclass
class RunnerConfig:
    batch_size: int = 1                      # per data-parallel worker, per micro step
    epochs: int = 1
    max_steps: int = -1                      # optimizer steps; -1 = as many as the epochs give
    gradient_accumulation_steps: int = 1
    seq_length: int = 0                      # 0 = the dataset's; else must equal it (checked)
    REJECTED_KEYS = {"sink_mode": "not supported: telechat_ms feeds every step from the host (its resumable, "
                                  "rank-exact loader), not by MindSpore data sink; remove the key"}

    def check(self, where: Where, prefix: str) -> None:
        _positive(where, f"{prefix}.batch_size", self.batch_size)
        _positive(where, f"{prefix}.epochs", self.epochs)
        _positive(where, f"{prefix}.gradient_accumulation_steps", self.gradient_accumulation_steps)


@dataclass
class RunnerWrapper:
    """Clipping and loss scaling around the optimizer step (MindFormers' runner_wrapper)."""
    use_clip_grad: bool = True
    max_grad_norm: float = 1.0
    loss_scale: str = "none"                 # none | static | dynamic (fp16 on Ascend)
    loss_scale_value: float = 65536.0
    scale_factor: float = 2.0
    scale_window: int = 1000

    def check(self, where: Where, prefix: str) -> None:
        _one_of(where, f"{prefix}.loss_scale", self.loss_scale, ("none", "static", "dynamic"))


@dataclass
class OptimizerConfig:
    type: str = "AdamW"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay_keywords: list[str] = field(default_factory=lambda: ["norm", "bias"])  # excluded from decay

    def check(self, where: Where, prefix: str) -> None:
        _one_of(where, f"{prefix}.type", self.type, ("AdamW",))
        if len(self.betas) != 2 or not all(0.0 < b < 1.0 for b in self.betas):
            raise ConfigError(f"{where(prefix + '.betas')} must be two numbers in (0, 1), got {self.betas}")


@dataclass
class LrSchedule:
    type: str = "cosine"                     # cosine | constant | linear
    learning_rate: float = 1.5e-4
    lr_end: float = 1.5e-5
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    total_steps: int = -1                    # -1 = the run's optimizer steps

    def check(self, where: Where, prefix: str) -> None:
        _one_of(where, f"{prefix}.type", self.type, ("cosine", "constant", "linear"))
        _positive(where, f"{prefix}.learning_rate", self.learning_rate, zero_ok=True)


@dataclass
class DatasetConfig:
    data_dir: str                            # a `telechat-ms process-data` output directory
    shuffle: bool = True                     # a seeded permutation of the records every epoch
    drop_remainder: bool = True              # false: the last partial global batch is completed with the epoch's
                                             # first records (no record skipped, static shapes kept)


@dataclass
class EvalDatasetConfig:
    """Held-out data for do_eval (MindFormers' eval_dataset section): read in record order, every record once."""
    data_dir: str                            # a `telechat-ms process-data` output (e.g. its --eval-fraction half)
    batch_size: int = 0                      # rows per data-parallel worker per eval step; 0 = runner_config's

    def check(self, where: Where, prefix: str) -> None:
        _positive(where, f"{prefix}.batch_size", self.batch_size, zero_ok=True)


@dataclass
class CallbacksConfig:
    log_interval: int = 10
    save_interval: int = 0                   # 0 = only at the end
    keep_checkpoint_max: int = 3
    loss_curve: bool = True
    tensorboard: bool = True


@dataclass
class JobConfig:
    """A whole training/predict job."""
    model: ModelSection
    run_mode: str = "finetune"               # finetune | pretrain | predict
    seed: int = 42
    output_dir: str = "./runs/job"
    load_checkpoint: str = ""                # HF or MindSpore checkpoint directory to start from
    resume: str = ""                         # "" | auto | checkpoint directory
    context: ContextConfig = field(default_factory=ContextConfig)
    parallel: ParallelContext = field(default_factory=ParallelContext)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    recompute_config: RecomputeConfig = field(default_factory=RecomputeConfig)
    runner_config: RunnerConfig = field(default_factory=RunnerConfig)
    runner_wrapper: RunnerWrapper = field(default_factory=RunnerWrapper)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LrSchedule = field(default_factory=LrSchedule)
    train_dataset: DatasetConfig | None = None
    moe_config: MoeConfig | None = None      # MoE models only (routing checks, capacity, aux loss)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    # eval while training (MindFormers' names): the token-mean loss and perplexity of eval_dataset at every
    # eval_step_interval optimizer steps and/or every eval_epoch_interval epochs (<= 0: off, as in MindFormers'
    # EvalCallBack), to metrics.jsonl / TensorBoard / loss_curve.png; the model with the lowest eval loss is kept
    # in output_dir/checkpoints/best/ (a model directory)
    do_eval: bool = False
    eval_dataset: EvalDatasetConfig | None = None
    eval_step_interval: int = 100
    eval_epoch_interval: int = -1
    eval_max_steps: int = -1                 # eval batches per evaluation; -1 = the whole eval_dataset
    source: str = ""                         # the YAML file this came from (set by the loader, not a YAML key)
    REJECTED_KEYS = {"source": "not a YAML key: the loader records the file a job came from"}

    def check(self, where: Where, prefix: str) -> None:
        _one_of(where, "run_mode", self.run_mode, ("finetune", "pretrain", "predict"))
        self._check_eval(where)

    def _check_eval(self, where: Where) -> None:
        """do_eval needs eval_dataset and a schedule; eval keys without do_eval would do nothing: rejected."""
        eval_keys = {"eval_dataset": None, "eval_step_interval": 100, "eval_epoch_interval": -1,
                     "eval_max_steps": -1}
        if not self.do_eval:
            for key, default in eval_keys.items():
                if getattr(self, key) != default:
                    raise ConfigError(f"{where(key)} has no effect without do_eval: true (set do_eval: true, or "
                                      f"remove the key)")
            return
        if self.eval_dataset is None:
            raise ConfigError(f"{where('do_eval')}: do_eval needs an eval_dataset section (with data_dir: a "
                              f"process-data output, e.g. the half `process-data --eval-fraction` holds out)")
        if self.eval_step_interval <= 0 and self.eval_epoch_interval <= 0:
            raise ConfigError(f"{where('eval_step_interval')}: do_eval needs eval_step_interval > 0 or "
                              f"eval_epoch_interval > 0 (both are off)")
        if self.eval_max_steps == 0 or self.eval_max_steps < -1:
            raise ConfigError(f"{where('eval_max_steps')} must be > 0 or -1 (the whole eval_dataset), got "
                              f"{self.eval_max_steps}")
        if self.parallel.parallel_mode in ("semi_auto_parallel", "auto_parallel"):
            raise ConfigError(f"{where('do_eval')}: eval while training runs under stand_alone and data_parallel; "
                              f"under {self.parallel.parallel_mode} it is not implemented yet (evaluate the saved "
                              f"checkpoints with `telechat-ms eval --tasks perplexity`)")
        if self.run_mode == "predict":
            raise ConfigError(f"{where('do_eval')}: do_eval is a training key; run_mode is predict")

    def model_config(self, base: TeleChatConfig | None = None) -> TeleChatConfig:
        """The TeleChatConfig this job describes: `preset`, else the checkpoint's config.json, plus overrides
        (and moe_config's training switches)."""
        cfg = self._model_config(base)
        return self.moe_config.apply(cfg, self.source) if self.moe_config is not None else cfg

    def _model_config(self, base: TeleChatConfig | None = None) -> TeleChatConfig:
        fields = dict(self.model.model_config)
        preset = fields.pop("preset", None)
        known = {f.name for f in dataclasses.fields(TeleChatConfig)} - {"extra"}
        for key in fields:
            if key not in known:
                import difflib
                close = difflib.get_close_matches(key, sorted(known), n=1)
                raise ConfigError(f"{self.source}: 'model.model_config.{key}': unknown key"
                                  + (f"; did you mean 'model.model_config.{close[0]}'?" if close else ""))
        if preset:
            return TeleChatConfig.preset(preset, **fields)
        if base is not None:
            return base.replace(**fields)
        if self.load_checkpoint:
            return TeleChatConfig.from_pretrained(self.load_checkpoint).replace(**fields)
        try:
            return TeleChatConfig(**fields)
        except TypeError as exc:
            raise ConfigError(f"{self.source}: model.model_config: {exc}") from None


def job_from_dict(data: dict[str, Any], source: str = "<dict>") -> JobConfig:
    """Validate an already-parsed job (tests, programmatic use) exactly as a YAML file would be."""
    job = build(JobConfig, data, Where(source))
    job.source = source
    return job


def load_job_config(path: str, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML, apply `key.path=value` overrides, and validate every section."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    job = build(JobConfig, data, Where(path, yaml_line_map(text)))
    job.source = path
    return job
