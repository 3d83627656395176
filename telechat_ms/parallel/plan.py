"""`telechat-ms plan`: is a parallel job valid for its launch, and does it fit? Checked before a job is queued.

Validates the world size against the launch, heads / kv heads / ffn / vocab against mp, layers and offsets
against pp (and interleave), sequence against cp (and sp), micro batches against pp, the global batch, and the
CPU / Ascend switches; then estimates per-NPU memory per pipeline stage (formulas in memory.py, printed) and
per-step FLOPs, and predicts tokens/s per NPU for an assumed MFU. Needs no dataset and no MindSpore.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import ConfigError
from telechat_ms.job_config import JobConfig
from telechat_ms.parallel.layout import Issue, ParallelDims, StageLayout, check_layout, stage_layout
from telechat_ms.parallel.memory import (FORMULAS, GIB, HBM_GBS_ATLAS_800T_A2, PREDICT_FORMULAS,
                                         PUBLISHED_DECODE_TOKENS_S, PUBLISHED_FINETUNE_TOKENS_S, DecodeEstimate, Flops, MemoryInputs, StageMemory,
                                         kv_bytes_per_token, largest_fitting, predict_memory, released_size,
                                         stage_memory, training_flops)
from telechat_ms.parallel.parallelize import recompute_sets

ASCEND_ONLY = ("use_flash_attention", "fused_rms_norm")


@dataclass
class Launch:
    """How many workers a launch starts: explicit `workers`, or nodes x npus_per_node."""

    nodes: int | None = None
    npus_per_node: int = 8
    workers: int | None = None

    @property
    def world(self) -> int | None:
        if self.workers is not None:
            return self.workers
        return None if self.nodes is None else self.nodes * self.npus_per_node


@dataclass
class PredictPlan:
    """What a predict job needs per NPU, how far it stretches, and how fast it can decode at best."""

    batch: int
    seq: int
    kv_per_token: float                # bytes per token of one row on each NPU
    max_batch: int                     # rows of seq slots that fit the limit
    max_seq: int                       # slots per row that fit the limit at `batch` rows
    decode: DecodeEstimate | None      # weights + the whole static kv cache read per step (Ascend jobs)
    weights_only: DecodeEstimate | None
    size: str | None = None
    published: float | None = None     # the MindSpore port's tokens/s for this size
    paged: dict | None = None          # the paged engine's terms: blocks per NPU, sequences, the token budget


@dataclass
class PlanReport:
    """Everything `plan` found; `valid` and `fits` are the verdicts."""

    source: str
    dims: ParallelDims
    issues: list[Issue]
    launch: Launch
    stages: list[StageMemory] = field(default_factory=list)
    interleave_peak: float = 0.0
    limit_gib: float = 0.0
    flops: Flops | None = None
    tokens_per_s_per_npu: float = 0.0
    mfu: float = 0.0
    peak_tflops: float = 0.0
    params: str = ""                          # MoE: total and active parameter counts
    published_train: float | None = None      # published fine-tuning tokens/s per NPU of this model
    what_if: dict[str, float] = field(default_factory=dict)   # peak bytes under other recompute / optimizer choices
    predict: PredictPlan | None = None

    @property
    def valid(self) -> bool:
        return not any(i.level == "error" for i in self.issues)

    @property
    def peak(self) -> StageMemory | None:
        return max(self.stages, key=lambda s: s.total) if self.stages else None

    @property
    def fits(self) -> bool:
        return self.peak is not None and self.peak.total / GIB <= self.limit_gib


def _gib(text: str) -> float | None:
    """'58GB' / '54.5GB' / '1024MB' -> GiB (MindSpore reads GB as GiB); '' -> None."""
    if not text:
        return None
    t = text.strip().upper()
    for unit, scale in (("GB", 1.0), ("MB", 1 / 1024), ("G", 1.0)):
        if t.endswith(unit):
            return float(t[: -len(unit)]) * scale
    raise ConfigError(f"context.max_device_memory {text!r}: expected a size like '58GB'")


def _check_job(job: JobConfig, cfg: TeleChatConfig, dims: ParallelDims, seq: int,
               launch: Launch) -> tuple[list[Issue], StageLayout | None]:
    """Layout checks plus launch, mode, switch, batch and recompute checks."""
    issues = check_layout(cfg, dims, seq)
    err = lambda f, m: issues.append(Issue("error", f, m))   # noqa: E731
    warn = lambda f, m: issues.append(Issue("warning", f, m))  # noqa: E731
    world = dims.world
    need = (f"data_parallel x model_parallel x pipeline_stage x context_parallel = {dims.dp} x {dims.mp} x "
            f"{dims.pp} x {dims.cp} = {world}")
    if launch.world is not None and launch.world != world:
        how = f"{launch.workers} workers" if launch.workers is not None else \
            f"{launch.nodes} node(s) x {launch.npus_per_node} NPUs = {launch.world} workers"
        err("launch", f"the launch starts {how} but the YAML needs {need}; launch "
            f"{math.ceil(world / launch.npus_per_node)} node(s) x {launch.npus_per_node} (worker_num {world})")
    if dims.mp > launch.npus_per_node:
        warn("parallel_config.model_parallel", f"model_parallel {dims.mp} spans nodes ({launch.npus_per_node} "
             "NPUs per node): tensor-parallel collectives would cross the network")
    mode, target = job.parallel.parallel_mode, job.context.device_target
    if max(dims.mp, dims.pp, dims.cp) > 1 and mode not in ("semi_auto_parallel", "auto_parallel"):
        err("parallel.parallel_mode", f"{mode} cannot split the model (mp/pp/cp > 1): use semi_auto_parallel")
    if mode in ("semi_auto_parallel", "auto_parallel") and target != "Ascend":
        err("context.device_target", f"{mode} needs Ascend; MindSpore cannot run it on {target}")
    if mode == "stand_alone" and world > 1:
        err("parallel.parallel_mode", f"stand_alone runs one process but parallel_config needs {need}")
    if target == "CPU":
        for name in ASCEND_ONLY:
            if getattr(cfg, name):
                err(f"model.model_config.{name}", "Ascend-only (no CPU kernel): set false for CPU")
        if cfg.compute_dtype == "bfloat16":
            err("model.model_config.compute_dtype", "CPU has no bfloat16 matmul/softmax kernels: use float32")
    if dims.interleave > 1 and not job.parallel.pipeline_interleave:
        err("parallel.pipeline_interleave", f"parallel_config.pp_interleave_num {dims.interleave} needs "
            "parallel.pipeline_interleave: true")
    rows = job.runner_config.batch_size * seq
    if job.run_mode == "predict":
        for name, value in (("pipeline_stage", dims.pp), ("context_parallel", dims.cp)):
            if value != 1:
                err(f"parallel_config.{name}", f"{value}: {name.split('_')[0]}-parallel inference is not provided")
        if dims.dp != 1 and mode in ("semi_auto_parallel", "auto_parallel"):
            err("parallel_config.data_parallel", f"{dims.dp}: a model-parallel predict job holds one replica; "
                "launch one job per replica")
    elif rows % (dims.cp * dims.mp):
        err("runner_config.batch_size", f"batch_size x seq_length = {rows} tokens per micro batch is not "
            f"divisible by context_parallel x model_parallel = {dims.cp * dims.mp} (row-parallel loss)")
    layout = None
    try:
        layout = stage_layout(cfg.n_layer, dims.pp, dims.interleave, job.model.pipeline_offset or None)
        recompute_sets(job.recompute_config, layout, dims.pp, job.source)
    except ConfigError as exc:
        err("model.pipeline_offset / recompute_config", str(exc))
        layout = None
    return issues, layout


def _predict_plan(cfg: TeleChatConfig, dims: ParallelDims, batch: int, seq: int, limit_bytes: float,
                  bandwidth_gbs: float, ascend: bool) -> PredictPlan:
    """Per-NPU kv cache, the largest batch / length that fit, and (Ascend) the memory-bound decode speed."""
    mem = predict_memory(cfg, dims, batch, seq)
    size = released_size(cfg)
    return PredictPlan(
        batch=batch, seq=seq, kv_per_token=kv_bytes_per_token(cfg, dims),
        max_batch=largest_fitting(lambda b: predict_memory(cfg, dims, b, seq).total, limit_bytes, 1 << 16),
        max_seq=largest_fitting(lambda n: predict_memory(cfg, dims, batch, n).total, limit_bytes, 1 << 22),
        decode=DecodeEstimate(mem.parts["weights"] + mem.parts["kv_cache"], bandwidth_gbs, batch) if ascend else None,
        weights_only=DecodeEstimate(mem.parts["weights"], bandwidth_gbs, batch) if ascend else None,
        size=size, published=PUBLISHED_DECODE_TOKENS_S.get(size or ""),
        paged=_paged_terms(cfg, dims, batch, seq, limit_bytes, mem.parts["weights"]))


def _paged_terms(cfg: TeleChatConfig, dims: ParallelDims, batch: int, seq: int, limit_bytes: float,
                 weights: float, block_size: int = 16, budget: int = 512) -> dict:
    """The memory left for a paged kv cache (telechat_ms.serve.paged_engine: serve's defaults --block-size 16,
    --max-num-batched-tokens 512) once the weights and the largest step's activations are in, and what it holds."""
    from telechat_ms.infer.paged_budget import paged_capacity, step_activation_bytes
    act = step_activation_bytes(cfg, budget, batch, seq, mp=dims.mp)
    free = limit_bytes - weights - act
    blocks, at_seq = paged_capacity(cfg, free, seq, block_size, dims.mp)
    return dict(block_size=block_size, budget=budget, activations=act, free=free, blocks=blocks, at_seq=at_seq,
                at_2048=paged_capacity(cfg, free, 2048, block_size, dims.mp)[1])


def make_plan(job: JobConfig, launch: Launch | None = None, hbm_gb: float = 64.0, runtime_reserve_gb: float = 2.0,
              mfu: float = 0.4, peak_tflops: float = 313.0,
              hbm_bandwidth_gbs: float = HBM_GBS_ATLAS_800T_A2) -> PlanReport:
    """Validate a job against a launch and estimate memory, FLOPs and throughput."""
    launch = launch or Launch()
    cfg = job.model_config()
    dims = ParallelDims.from_config(job.parallel_config)
    seq = job.runner_config.seq_length or cfg.seq_length
    issues, layout = _check_job(job, cfg, dims, seq, launch)
    report = PlanReport(source=job.source, dims=dims, issues=issues, launch=launch, mfu=mfu, peak_tflops=peak_tflops)
    if cfg.is_moe:
        report.params = (f"{cfg.num_parameters() / 1e9:.2f}B total, {cfg.num_parameters(active=True) / 1e9:.2f}B "
                         f"active per token ({cfg.num_experts_per_tok} of {cfg.num_experts} experts)")
    limit = _gib(job.context.max_device_memory)
    report.limit_gib = min(limit, hbm_gb - runtime_reserve_gb) if limit else hbm_gb - runtime_reserve_gb
    if layout is None or not report.valid:
        return report
    if job.run_mode == "predict":
        batch = job.runner_config.batch_size
        report.stages = [predict_memory(cfg, dims, batch, seq)]
        report.predict = _predict_plan(cfg, dims, batch, seq, report.limit_gib * GIB, hbm_bandwidth_gbs,
                                       job.context.device_target == "Ascend")
        return report
    full, select, comm = recompute_sets(job.recompute_config, layout, dims.pp, job.source)
    accumulate = dims.pp > 1 or job.runner_config.gradient_accumulation_steps > 1
    inp = MemoryInputs(seq=seq, micro_batch_size=job.runner_config.batch_size, compute_dtype=cfg.compute_dtype,
                       parallel_optimizer=job.parallel.enable_parallel_optimizer and
                       job.parallel.parallel_mode != "data_parallel",
                       accumulate=accumulate, full=full, select=select, comm=comm,
                       slice_activation=job.recompute_config.recompute_slice_activation)
    report.stages = stage_memory(cfg, dims, layout, inp)
    report.interleave_peak = max(s.total for s in stage_memory(cfg, dims, layout, inp, megatron_interleave=True))
    every = set(range(cfg.n_layer))
    variants = {"no recompute": dict(full=set(), select=set(), comm=set()),
                "selective": dict(full=set(), select=every, comm=set()),
                "selective+comm": dict(full=set(), select=every, comm=every),
                "full": dict(full=every, select=set(), comm=set()),
                "parallel optimizer on": dict(parallel_optimizer=True),
                "parallel optimizer off": dict(parallel_optimizer=False)}
    for name, change in variants.items():
        alt = MemoryInputs(**{**inp.__dict__, **change})
        report.what_if[name] = max(s.total for s in stage_memory(cfg, dims, layout, alt))
    micro = dims.micro if dims.pp > 1 else 1
    tokens = job.runner_config.batch_size * dims.dp * micro * job.runner_config.gradient_accumulation_steps * seq
    report.flops = training_flops(cfg, seq, tokens, len(full) / cfg.n_layer)
    report.published_train = PUBLISHED_FINETUNE_TOKENS_S.get(released_size(cfg) or "") \
        if job.run_mode == "finetune" else None
    report.tokens_per_s_per_npu = mfu * peak_tflops * 1e12 / report.flops.per_token  # each NPU: 1/world of it all
    return report


def _format_predict(p: PredictPlan, limit_gib: float) -> list[str]:
    """The inference lines of the plan: kv cache, the largest fit, the decode-speed estimate."""
    lines = [f"  kv cache per NPU: {p.kv_per_token / 1024:.1f} KiB per token per row; "
             f"{p.kv_per_token * p.batch * p.seq / GIB:.2f} GiB at batch {p.batch} x seq_length {p.seq}",
             f"  largest that fits {limit_gib:.2f} GiB: batch {p.max_batch} at seq_length {p.seq}; "
             f"seq_length {p.max_seq} at batch {p.batch}"]
    if p.paged is not None:
        g = p.paged
        lines.append(f"  paged engine terms (serve MODEL_DIR's cache; block {g['block_size']}, "
                     f"--max-num-batched-tokens {g['budget']}): weights + the largest step's activations "
                     f"({g['activations'] / GIB:.2f} GiB) leave {max(g['free'], 0) / GIB:.2f} GiB = "
                     f"{g['blocks']} blocks per NPU "
                     f"({g['blocks'] * g['block_size']} tokens): {g['at_seq']} sequences at {p.seq} tokens, "
                     f"{g['at_2048']} at 2048")
    if p.decode is None:
        return lines + ["  decode estimate: for Ascend jobs (context.device_target: Ascend) only"]
    dec, weights = p.decode, p.weights_only.bytes_per_step
    lines += [f"  decode estimate (memory-bound: each step reads the weights and the whole static kv cache once; "
              f"HBM {dec.bandwidth_gbs:.1f} GB/s, --hbm-bandwidth-gbs): {(dec.bytes_per_step - weights) / 1e9:.2f} "
              f"GB kv + {weights / 1e9:.2f} GB weights per step -> {dec.tokens_per_s:.1f} tokens/s per request "
              f"({p.weights_only.tokens_per_s:.1f} with the weights alone)"]
    if p.published is not None:
        lines.append(f"  published (MindSpore port, Atlas 800T A2, TeleChat2-{p.size.upper()}): {p.published} "
                     f"tokens/s = {p.published / dec.tokens_per_s:.0%} of the estimate (an upper bound: it ignores "
                     "collectives, kernel launches and host time)")
    else:
        lines.append("  published: no decode speed was published for this model")
    return lines


def format_plan(r: PlanReport) -> str:
    """The human-readable plan: verdict, issues, memory table with formulas, FLOPs and throughput."""
    d = r.dims
    lines = [f"plan for {r.source}",
             f"  layout: dp {d.dp} x mp {d.mp} x pp {d.pp} x cp {d.cp} = {d.world} NPUs"
             f"{'; expert_parallel %d' % d.ep if d.ep > 1 else ''}"
             f"{' (ulysses %d)' % d.cp_ulysses if d.cp_ulysses > 1 else ''}; sequence parallel "
             f"{'on' if d.sp else 'off'}; micro batches {d.micro}; interleave {d.interleave}"]
    if r.launch.world is not None:
        lines.append(f"  launch: {r.launch.world} workers")
    for issue in r.issues:
        lines.append(f"  {issue}")
    if r.stages:
        keys = list(r.stages[0].parts)
        short = {"gradients": "grads", "grad_buffers": "grad_bufs", "optimizer": "optim", "activations": "activ"}
        head = ["stage", "layers", "in-flight"] + [short.get(k, k) for k in keys] + ["total"]
        lines.append("  memory per NPU (GiB):")
        lines.append("  " + "".join(f"{h:>11}" for h in head))
        for s in r.stages:
            vals = "".join(f"{s.parts[k] / GIB:>11.2f}" for k in keys)
            lines.append(f"  {s.stage:>11}{s.layers:>11}{s.in_flight:>11}{vals}{s.total / GIB:>11.2f}")
        lines.append("  formulas (bytes per NPU; a = compute-dtype bytes; per-layer activation terms in "
                     "telechat_ms/parallel/memory.py):")
        lines += [f"    {f}" for f in (PREDICT_FORMULAS if "kv_cache" in keys else FORMULAS)]
        peak = r.peak
        lines.append(f"  peak: stage {peak.stage}, {peak.total / GIB:.2f} GiB of a {r.limit_gib:.2f} GiB limit "
                     f"(max_device_memory, or HBM minus the runtime reserve) -> "
                     f"{'fits' if r.fits else 'DOES NOT FIT'}")
        if r.what_if:
            lines.append("  peak GiB under other choices: " + "; ".join(
                f"{name} {v / GIB:.1f}" for name, v in r.what_if.items()))
        if r.predict:
            lines += _format_predict(r.predict, r.limit_gib)
        if d.interleave > 1:
            lines.append(f"  note: under Megatron's interleaved 1F1B (more micro batches in flight on early stages) "
                         f"the peak would be {r.interleave_peak / GIB:.2f} GiB")
    if r.params:
        lines.append("  parameters: " + r.params)
    if r.flops:
        f = r.flops
        lines.append(f"  FLOPs: {f.per_token / 1e9:.1f} GFLOP/token (6 x matmul params + 6 x layers x s x h"
                     f"{'; MoE: the active parameters' if r.params else ''}), "
                     f"{f.per_step / 1e15:.2f} PFLOP/step over {f.tokens_per_step} tokens; full recompute adds "
                     f"{f.recompute_per_token / 1e9:.1f} GFLOP/token")
        lines.append(f"  throughput at MFU {r.mfu:.0%} of {r.peak_tflops:.0f} TFLOPS: "
                     f"{r.tokens_per_s_per_npu:.0f} tokens/s per NPU "
                     f"({f.tokens_per_step / (r.tokens_per_s_per_npu * d.world):.1f} s/step)")
        if r.published_train:
            lines.append(f"  published fine-tuning (MindSpore port, Atlas 800T A2): {r.published_train} tokens/s per "
                         f"NPU = {r.published_train / r.tokens_per_s_per_npu:.0%} of this estimate "
                         f"(MFU {r.mfu * r.published_train / r.tokens_per_s_per_npu:.0%})")
    lines.append(f"verdict: {'VALID' if r.valid else 'INVALID'}"
                 + (f", {'fits' if r.fits else 'does not fit'} in memory" if r.stages else ""))
    return "\n".join(lines)
