"""`parallelize(model, ...)`: apply the whole parallel layout of a job to a TeleChatForCausalLM from one place.

Shard strategies on every primitive, ring-attention flags on the flash-attention kernel, pipeline stage of
each cell (with offsets and interleave), gradient fusion groups, and full / selective / communication
recompute per layer. In stand_alone and data_parallel MindSpore ignores strategies and pipeline stages, so
calling this on CPU is harmless; the trainer calls it only for semi_auto / auto parallel jobs.

`parallelize_predict(model, ...)` does the same for inference: the predict table on every primitive of the cached
prefill and decode steps, and the kv-cache write MindSpore can split by kv heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import ConfigError
from telechat_ms.job_config import ModelSection, ParallelConfig, ParallelContext, RecomputeConfig
from telechat_ms.parallel.layout import ParallelDims, StageLayout, check_layout, per_stage_layers, stage_layout
from telechat_ms.parallel.strategies import (Shard, apply_strategies, moe_groups, paged_predict_strategy_table,
                                             parameter_splits, predict_strategy_table, strategy_table)

# Primitives recomputed by selective recompute (MindFormers' default patterns feed_forward.mul and the
# SiLU, plus the attention-score ops when flash attention is off).
SELECT_FFN = ("feed_forward.mul", "feed_forward.silu.silu")
SELECT_MOE = ("feed_forward.ffn.mul", "feed_forward.ffn.silu.silu")   # the same, in the MoE experts
SELECT_ATTN = ("attention.qk_matmul", "attention.mul_scale", "attention.mask_add", "attention.softmax",
               "attention.pv_matmul")


@dataclass
class AppliedParallel:
    """What parallelize did, for logs, plans and tests."""

    dims: ParallelDims
    table: dict[str, Shard]
    layout: StageLayout
    full_recompute: set[int] = field(default_factory=set)
    select_recompute: set[int] = field(default_factory=set)
    comm_recompute: set[int] = field(default_factory=set)
    ring_attention: bool = False


def recompute_sets(rc: RecomputeConfig, layout: StageLayout, pp: int,
                   source: str = "") -> tuple[set[int], set[int], set[int]]:
    """(full, selective, communication) recompute layer ids from a recompute_config section."""
    full = per_stage_layers(rc.recompute, layout, pp, f"{source}: recompute_config.recompute")
    select = per_stage_layers(rc.select_recompute, layout, pp, f"{source}: recompute_config.select_recompute")
    comm = per_stage_layers(rc.select_comm_recompute, layout, pp, f"{source}: recompute_config.select_comm_recompute")
    return full, select - full, comm - full


def model_layout(cfg: TeleChatConfig, pc: ParallelConfig, par: ParallelContext, section: ModelSection,
                 seq_length: int, source: str = "") -> tuple[ParallelDims, StageLayout]:
    """Degrees and stage layout of a model under parallel_config, raising ConfigError for a layout it cannot take."""
    dims = ParallelDims.from_config(pc)
    if dims.interleave > 1 and not par.pipeline_interleave:
        raise ConfigError(f"{source}: parallel_config.pp_interleave_num {dims.interleave} needs "
                          "parallel.pipeline_interleave: true")
    errors = [i for i in check_layout(cfg, dims, seq_length) if i.level == "error"]
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(f"{i.field}: {i.message}" for i in errors))
    layout = stage_layout(cfg.n_layer, dims.pp, dims.interleave, section.pipeline_offset or None,
                          where=f"{source}: model.pipeline_offset")
    return dims, layout


def _comm_fusion(model, dims: ParallelDims, group: int) -> None:
    """Gradient all-reduce fusion groups, as MindFormers sets them."""
    layers = model.model.layers
    dis = max(int((len(layers) + 1) / group), 1)
    for i, layer in enumerate(layers):
        layer.set_comm_fusion(2 if dims.pp > 1 else int(i / dis) + 1)
    for cell in (model.model.tok_embeddings, model.model.norm_out):
        cell.set_comm_fusion(2 if dims.pp > 1 else group)


def _pipeline_stages(model, dims: ParallelDims, layout: StageLayout) -> None:
    """Stage of every cell: embedding on 0, layers per layout, final norm and lm_head on the last stage."""
    if dims.pp == 1:
        return
    inner = model.model
    inner.tok_embeddings.pipeline_stage = 0
    if getattr(inner, "embed_layernorm", False):
        inner.word_embeddings_layernorm.pipeline_stage = 0
    for layer, stage in zip(inner.layers, layout.stage_of):
        layer.pipeline_stage = stage
    inner.norm_out.pipeline_stage = dims.pp - 1
    model.lm_head.pipeline_stage = dims.pp - 1


def _norm_tail(norm):
    """The primitive whose output a sequence-parallel all-gather follows (for communication recompute)."""
    return norm.norm if not getattr(norm, "self_define", True) else norm.mul2


def _recompute(model, rc: RecomputeConfig, full: set[int], select: set[int], comm: set[int], flash: bool) -> None:
    """Full recompute of whole layers, selective recompute of primitives, comm recompute of norm all-gathers."""
    for i, layer in enumerate(model.model.layers):
        if i in full:
            layer.recompute(mp_comm_recompute=rc.mp_comm_recompute,
                            parallel_optimizer_comm_recompute=rc.parallel_optimizer_comm_recompute,
                            recompute_slice_activation=rc.recompute_slice_activation)
            continue
        if i in select:
            ffn = SELECT_MOE if hasattr(layer.feed_forward, "ffn") else SELECT_FFN
            for path in ffn + (() if flash else SELECT_ATTN):
                prim = layer
                for part in path.split("."):
                    prim = getattr(prim, part)
                prim.recompute()
        if i in comm:
            for norm in (layer.attention_norm, layer.ffn_norm):
                _norm_tail(norm).add_prim_attr("recompute_comm_op", True)


def _ring_attention(model, dims: ParallelDims) -> bool:
    """Turn on MindSpore's ring attention in every flash-attention kernel when cp has a ring part."""
    if dims.cp_ring == 1:
        return False
    for layer in model.model.layers:
        fa = layer.attention.flash_attention
        fa.use_ring_attention = True
        fa.flash_attention.add_prim_attr("enable_ring_attention", True)
        fa.flash_attention.add_prim_attr("enable_ra_send_recv", True)
    return True


def _strategy_forms(model) -> None:
    """Switch off the stand-alone forms whose primitives the strategy tables do not name: the hand-written
    backwards of the loss, the attention's softmax and the norms (autodiff's primitives carry the strategies), and
    the rope tables broadcast to full shape (the strategies split the shared tables)."""
    model.nll_bprop = False
    for layer in model.model.layers:
        layer.attention.softmax_bprop = False
        layer.attention.rotary.full_tables = False
    for _, cell in model.cells_and_names():
        if hasattr(cell, "hand_bprop"):   # layers.RMSNorm
            cell.hand_bprop = False


def parallelize(model, pc: ParallelConfig, rc: RecomputeConfig, par: ParallelContext, section: ModelSection,
                seq_length: int, batched_inputs: bool = True, source: str = "") -> AppliedParallel:
    """Apply a parallel layout to `model` (a freshly built TeleChatForCausalLM); returns what was done.

    batched_inputs: the rope tables and mask come per sample ([B, 1, S, d], [B, 1, S, S]: positions.BATCHED);
    False for shared [S, d] tables and a [1, 1, S, S] mask (positions.SHARED). The caller feeds the same layout.
    """
    cfg = model.config
    dims, layout = model_layout(cfg, pc, par, section, seq_length, source)
    fused = not getattr(model.model.norm_out, "self_define", True)
    table = strategy_table(cfg, dims, fused_norm=fused, batched_inputs=batched_inputs)
    _strategy_forms(model)
    apply_strategies(model, table)
    if cfg.is_moe:  # route (and cap) each token shard on its own, as MindFormers does per data-parallel shard
        for layer in model.model.layers:
            layer.feed_forward.groups = moe_groups(dims)
    ring = _ring_attention(model, dims) if cfg.use_flash_attention else False
    _pipeline_stages(model, dims, layout)
    _comm_fusion(model, dims, pc.gradient_aggregation_group)
    full, select, comm = recompute_sets(rc, layout, dims.pp, source)
    _recompute(model, rc, full, select, comm, cfg.use_flash_attention)
    return AppliedParallel(dims=dims, table=table, layout=layout, full_recompute=full, select_recompute=select,
                           comm_recompute=comm, ring_attention=ring)


@dataclass
class AppliedPredict:
    """What parallelize_predict did: degrees, the strategy table, and the split of every model parameter."""

    dims: ParallelDims
    table: dict[str, Shard]
    param_splits: dict[str, tuple]


def predict_layout(cfg: TeleChatConfig, pc: ParallelConfig, source: str = "") -> ParallelDims:
    """Degrees of a model-parallel predict job, raising ConfigError for a split inference cannot take.

    Inference splits heads, kv heads, ffn and vocabulary by model_parallel only: no pipeline, context or data
    parallel inside one model (data-parallel replicas are separate jobs: run_scripts/msrun_predict.sh WORKERS ...).
    The kv-head rule is the training one (whole [k_h; v_h] pairs per rank), checked by check_layout.
    """
    for name, why in (("pipeline_stage", "pipeline-parallel inference is not provided"),
                      ("context_parallel", "context-parallel inference is not provided"),
                      ("data_parallel", "a model-parallel predict job holds one replica; for data-parallel "
                                        "replicas launch one job per replica (run_scripts/msrun_predict.sh "
                                        "WORKERS MODEL_DIR ...)")):
        if getattr(pc, name) != 1:
            raise ConfigError(f"{source}: 'parallel_config.{name}' is {getattr(pc, name)}: {why}; set it to 1")
    dims = ParallelDims(mp=pc.model_parallel, vocab_emb_dp=bool(pc.vocab_emb_dp))
    errors = [i for i in check_layout(cfg, dims, cfg.seq_length) if i.level == "error"]
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(f"{i.field}: {i.message}" for i in errors))
    return dims


def parallelize_predict(model, pc: ParallelConfig, source: str = "", paged: bool = False,
                        kernels: bool = False) -> AppliedPredict:
    """Apply the predict strategies to `model` (a TeleChatForCausalLM built under the semi-auto context).

    Shards every primitive of the cached prefill and decode graphs, and switches the attention's cache write to
    the shardable ScatterNdAdd (the stepper of telechat_ms.parallel.predict zeroes the slots it writes). paged:
    the paged step's table instead (telechat_ms.parallel.paged_predict; its ScatterUpdate write splits as it is);
    kernels: that table for Ascend's paged-attention kernels.
    """
    cfg = model.config
    dims = predict_layout(cfg, pc, source)
    fused = not getattr(model.model.norm_out, "self_define", True)
    table = paged_predict_strategy_table(cfg, dims, fused_norm=fused, kernels=kernels) if paged else \
        predict_strategy_table(cfg, dims, fused_norm=fused)
    _strategy_forms(model)
    apply_strategies(model, table)
    for layer in model.model.layers:
        layer.attention.cache_write_by_add = not paged
    splits = parameter_splits([p.name for p in model.get_parameters() if p.requires_grad], table)  # not MoE stats
    return AppliedPredict(dims=dims, table=table, param_splits=splits)
