"""Shard strategies for every parallelised primitive of TeleChat2, in one table, from the parallel config.

MindFormers conventions (dp = data, mp = model/tensor, cp = context parallel; `sp` = sequence parallel):
- column-parallel wq / wk_v / w1 / w3 (weight [out, in] split on out), row-parallel wo / w2 (split on in;
  all-reduce, or reduce-scatter along the sequence with sp);
- the fused wk_v output rows are [k_h0; v_h0; k_h1; v_h1; ...]: an mp-way split of its rows gives each rank
  whole kv heads ([k_h; v_h] pairs) exactly when num_key_value_heads % mp == 0 (checked in layout.py), and
  the [B, S, K, 2d] view, split_kv and the kv-head repeat then stay local to the rank;
- vocab-parallel embedding and lm_head (or replicated with vocab_emb_dp); the loss is computed row-parallel
  (the [B*S, V] logits are redistributed to rows so log-softmax never spans ranks);
- norms and residual adds split along the sequence by cp (and by mp with sp);
- attention internals split heads by mp (x Ulysses degree) and the sequence by the ring-attention degree; rope
  tables are split on their sequence axis so each sequence chunk multiplies by the rows of its GLOBAL positions.
  The trainer feeds per-sample tables and masks ([B, 1, S, d], [B, 1, S, S]: `batched_inputs`); a model called
  with shared [S, d] tables and a [1, 1, S, S] mask uses `batched_inputs=False`.

`strategy_table` is pure data (tested against hand-written tables); `apply_strategies` calls `.shard()` on the
model's primitives (silently ignored by MindSpore in stand_alone / data_parallel, so CPU runs are unaffected).

`predict_strategy_table` is the same table for the cached prefill and decode steps of inference (dp = cp = 1, no
sequence parallel): the kv caches [B, K, L, d] are split by whole kv heads, so a rank's cache holds exactly the
heads its slice of wk_v projects and its query heads read (query head j -> kv head j // n_rep); the new keys and
values reach the cache write whole (MindSpore's ScatterNdAdd splits neither its indices nor its update rows; each
rank keeps its heads' part); the vocab-parallel logits are gathered (`logits_fp32` replicated) for sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

from telechat_ms.config import TeleChatConfig
from telechat_ms.parallel.layout import ParallelDims


@dataclass(frozen=True)
class Shard:
    """in_strategy (one tuple per tensor input) and optional out_strategy of one primitive."""

    inputs: tuple
    outputs: tuple | None = None


NORM_OPS_SELF_DEFINED = ("square", "mean", "rsqrt", "add", "mul", "mul2")


def _norm(prefix: str, s_in: tuple, fused: bool) -> dict[str, Shard]:
    """Strategies of a LlamaRMSNorm's primitives for an input split `s_in`."""
    if fused:
        return {f"{prefix}.norm": Shard((s_in, (1,)))}
    return {f"{prefix}.square": Shard((s_in,)), f"{prefix}.mean": Shard((s_in,)),
            f"{prefix}.rsqrt": Shard((s_in,)), f"{prefix}.add": Shard((s_in, ())),
            f"{prefix}.mul": Shard((s_in, s_in)), f"{prefix}.mul2": Shard((s_in, (1,)))}


def hidden_split(dims: ParallelDims) -> tuple[int, int, int]:
    """Split of the [B, S, H] residual stream: batch by dp, sequence by cp (x mp with sequence parallel)."""
    return (dims.dp, dims.cp * (dims.mp if dims.sp else 1), 1)


def layer_strategies(cfg: TeleChatConfig, dims: ParallelDims, fused_norm: bool | None = None,
                     batched_inputs: bool = True) -> dict[str, Shard]:
    """Strategies of one decoder layer, keyed by primitive path relative to the layer."""
    dp, mp, cp = dims.dp, dims.mp, dims.cp
    hs, cr = dims.head_split, dims.cp_ring
    fused = cfg.fused_rms_norm if fused_norm is None else fused_norm
    rows = dp * cp                                   # rows of the 2-D [B*S, H] matmul inputs
    s_in = hidden_split(dims)
    out_rows = (rows * mp, 1) if dims.sp else (rows, 1)
    reduce_out = ((rows * mp, 1),) if dims.sp else None  # reduce-scatter along the sequence with sp
    bshd = (dp, cp, mp, 1)                          # [B, S, heads, d] right after the projections
    inner = (dp, hs, cr, 1)                         # [B, N, S, d] inside attention
    table = (dp, 1, cr, 1) if batched_inputs else (cr, 1)        # rope cos/sin: rows of the global positions
    mask_b = dp if batched_inputs else 1                          # attention mask [B or 1, 1, S, S]
    t: dict[str, Shard] = {}
    t.update(_norm("attention_norm", s_in, fused))
    t.update(_norm("ffn_norm", s_in, fused))
    t.update({
        "attention.wq.matmul": Shard(((rows, 1), (mp, 1))),
        "attention.wk_v.matmul": Shard(((rows, 1), (mp, 1))),   # whole [k_h; v_h] row pairs per rank
        "attention.split_kv": Shard((bshd,)),
        "attention.transpose_q": Shard((bshd,)),
        "attention.transpose_k": Shard((bshd,)),
        "attention.transpose_v": Shard((bshd,)),
        "attention.rotary.split": Shard((inner,)),
        "attention.rotary.neg": Shard((inner,)),
        "attention.rotary.concat": Shard((inner, inner)),
        "attention.rotary.mul_cos": Shard((inner, table)),
        "attention.rotary.mul_sin": Shard((inner, table)),
        "attention.rotary.add": Shard((inner, inner)),
        "attention.transpose_out": Shard(((dp, mp, cp, 1),)),
        "attention.wo.matmul": Shard(((rows, mp), (1, mp)), reduce_out),
        "attention.wo.bias_add": Shard((out_rows, (1,))),
        "feed_forward.w1.matmul": Shard(((rows, 1), (mp, 1))),
        "feed_forward.w3.matmul": Shard(((rows, 1), (mp, 1))),
        "feed_forward.silu.silu": Shard(((dp, cp, mp),)),
        "feed_forward.mul": Shard(((dp, cp, mp), (dp, cp, mp))),
        "feed_forward.w2.matmul": Shard(((rows, mp), (1, mp)), reduce_out),
        "feed_forward.w2.bias_add": Shard((out_rows, (1,))),
        "add_attn": Shard((s_in, s_in)),
        "add_ffn": Shard((s_in, s_in)),
    })
    if cfg.is_moe:
        t = {k: v for k, v in t.items() if not k.startswith("feed_forward.")}
        t.update(moe_strategies(cfg, dims))
    if cfg.use_flash_attention:
        kv = (dp, hs, cr, 1)                        # ring attention passes kv chunks around the cp ring
        t["attention.flash_attention.flash_attention"] = Shard((inner, kv, kv, (mask_b, 1, cr, 1)))
    else:  # plain attention: cp == 1 (checked); q [B, K, n_rep*S, d], scores [B, K, n_rep, S, S]: kv heads split by mp
        kv, grouped = (dp, mp, 1, 1), (dp, mp, 1, 1, 1)
        t.update({
            "attention.qk_matmul": Shard((kv, kv)),
            "attention.mul_scale": Shard((kv, ())),
            "attention.mask_mul": Shard(((mask_b, 1, 1, 1, 1), ())),
            "attention.mask_add": Shard((grouped, (mask_b, 1, 1, 1, 1))),
            "attention.softmax": Shard((grouped,)),
            "attention.pv_matmul": Shard((kv, kv)),
        })
    return t


def moe_strategies(cfg: TeleChatConfig, dims: ParallelDims) -> dict[str, Shard]:
    """The MoE FFN (model/moe.py), keyed relative to the layer, as MindFormers lays it out. Tokens are routed in
    T groups (T = dp x cp, x mp with sequence parallel: the residual stream's shards; the layer's `groups`), each
    with its own capacity, so routing, dispatch gather and combine stay local to a rank; the expert buffer
    [E, T * cap, H] is split by ep on experts and by the dp x cp / ep remaining data shards on slots, the expert
    FFN by mp (w2 reduces over mp). Between the group-split [T, E, cap, H] dispatch and the expert-split buffer
    (and back for the combine) MindSpore inserts the AllToAll of expert parallelism. Only the scatter building
    the slot -> token table sees every group's int32 indices (replicated)."""
    ep, mp = dims.ep, dims.mp
    tr = dims.dp * dims.cp * (mp if dims.sp else 1)     # routing groups = token shards
    dm = dims.dp * dims.cp // ep                         # data shards left per expert-parallel rank
    tok, g2, g3, g4 = (tr, 1), (tr, 1), (tr, 1, 1), (tr, 1, 1, 1)
    f = "feed_forward."
    return {
        f + "router.dense.matmul": Shard((tok, (1, 1))),
        f + "softmax": Shard((tok,)), f + "topk": Shard((tok,)),
        f + "gate_sum": Shard((tok,)), f + "gate_div": Shard((tok, tok)),
        f + "transpose_idx": Shard((g3,)),
        f + "onehot": Shard((g3, (), ())),
        f + "cumsum": Shard((g3,)), f + "pos_mul": Shard((g3, g3)), f + "pos_sum": Shard((g3,)),
        f + "less_equal": Shard((g2, ())), f + "slot_mul": Shard((g2, ())), f + "slot_add": Shard((g2, g2)),
        f + "keep_select": Shard((g2, g2, g2)), f + "slot_off": Shard((g2, g2)),
        f + "scatter": Shard(((1, 1), (1,))),
        f + "concat_x": Shard((g3, g3)),
        f + "gather_in": Shard((g3, g2)),                              # dispatch inside each group
        f + "transpose_in": Shard((g4,)),                              # -> [E, T, cap, H]: the AllToAll
        f + "ffn.w1.matmul": Shard(((ep, dm, 1), (ep, mp, 1))),
        f + "ffn.w3.matmul": Shard(((ep, dm, 1), (ep, mp, 1))),
        f + "ffn.silu.silu": Shard(((ep, dm, mp),)),
        f + "ffn.mul": Shard(((ep, dm, mp), (ep, dm, mp))),
        f + "ffn.w2.matmul": Shard(((ep, dm, mp), (ep, 1, mp))),       # reduces over mp
        f + "ffn.w2.bias_add": Shard(((1, ep, dm, 1), (1, ep, 1, 1))),
        f + "transpose_back": Shard(((ep, dm, 1, 1),)),                # back to [T, E, cap, H]: the AllToAll
        f + "concat_out": Shard((g3, g3)),
        f + "transpose_slot": Shard((g3,)),
        f + "gather_out": Shard((g3, g2)),                             # combine inside each group
        f + "coeff_mul": Shard((g4, g4)),
        f + "combine_sum": Shard((g4,)),
        f + "mean_probs": Shard((g3,)), f + "mean_load": Shard((g3,)),
        f + "aux_mul": Shard((g2, g2)), f + "aux_sum": Shard((g2,)), f + "aux_scale": Shard(((), ())),
        f + "count_sum": Shard((g3,)), f + "kept_sum": Shard((g2,)),
    }


def moe_groups(dims: ParallelDims) -> int:
    """Routing groups of a sharded MoE layer: one per shard of the tokens (the residual stream's split)."""
    return dims.dp * dims.cp * (dims.mp if dims.sp else 1)


def model_strategies(cfg: TeleChatConfig, dims: ParallelDims, fused_norm: bool | None = None) -> dict[str, Shard]:
    """Strategies outside the decoder layers: embedding, final norm, lm_head and loss."""
    dp, mp, cp = dims.dp, dims.mp, dims.cp
    fused = cfg.fused_rms_norm if fused_norm is None else fused_norm
    t: dict[str, Shard] = {}
    if dims.vocab_emb_dp or cfg.vocab_size % (mp * cp):
        t["model.tok_embeddings.gather"] = Shard(((1, 1), (dp, cp)))
    else:
        t["model.tok_embeddings.gather"] = Shard(((mp * cp, 1), (dp, 1)))
    if cfg.embed_layernorm:
        t.update(_norm("model.word_embeddings_layernorm", hidden_split(dims), fused))
    t.update(_norm("model.norm_out", hidden_split(dims), fused))
    vocab = 1 if dims.vocab_emb_dp or cfg.vocab_size % mp else mp
    t["lm_head.matmul"] = Shard(((dp * cp, 1), (vocab, 1)))
    loss_rows = (dp * cp * mp, 1)
    t["log_softmax"] = Shard((loss_rows,))
    t["gather_d"] = Shard((loss_rows, loss_rows))
    return t


def strategy_table(cfg: TeleChatConfig, dims: ParallelDims, fused_norm: bool | None = None,
                   batched_inputs: bool = True) -> dict[str, Shard]:
    """The full table: primitive path in TeleChatForCausalLM -> Shard, every layer expanded."""
    table = model_strategies(cfg, dims, fused_norm)
    per_layer = layer_strategies(cfg, dims, fused_norm, batched_inputs)
    for i in range(cfg.n_layer):
        table.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return table


# Primitives of the training graph's plain attention that the cached path does not run (it has its own, *_c).
_TRAINING_ATTENTION = ("attention.tile_kv", "attention.qk_matmul", "attention.mul_scale", "attention.mask_mul",
                       "attention.mask_add", "attention.softmax", "attention.pv_matmul",
                       "attention.flash_attention.flash_attention")


def predict_dims(dims: ParallelDims) -> ParallelDims:
    """The degrees a predict step uses: data / model parallel and vocab_emb_dp only."""
    return ParallelDims(dp=dims.dp, mp=dims.mp, vocab_emb_dp=dims.vocab_emb_dp)


def predict_layer_strategies(cfg: TeleChatConfig, dims: ParallelDims,
                             fused_norm: bool | None = None) -> dict[str, Shard]:
    """Strategies of one decoder layer in the cached step (construct_with_cache), keyed relative to the layer.

    Projections, rotary, MLP and norms are the training layer's (cp 1, no sequence parallel: the rotary tables of
    the cache are per row, [B, 1, n, d]). The cache write and the grouped attention over the cache split the kv
    heads by mp; query heads follow (rank r holds query heads r*N/mp.. = the n_rep groups of its kv heads).
    """
    dims = predict_dims(dims)
    dp, mp = dims.dp, dims.mp
    t = {k: v for k, v in layer_strategies(cfg, dims, fused_norm, batched_inputs=True).items()
         if k not in _TRAINING_ATTENTION}
    kv = (dp, mp, 1, 1)                             # caches [B, K, L, d]; q, scores, probs [B, K, n_rep*n, *]
    t.update({
        "attention.cache_add": Shard((kv, (1, 1, 1, 1), (1, 1, 1, 1))),
        # scratch-slot writes zeroed before the add (the index and the updates reach the write whole)
        "attention.write_slot": Shard(((1, 1, 1, 1),)),
        "attention.not_scratch": Shard(((1, 1, 1, 1), ())),
        "attention.write_cast": Shard(((1, 1, 1, 1),)),
        "attention.write_mul_k": Shard(((1, 1, 1, 1), (1, 1, 1, 1))),
        "attention.write_mul_v": Shard(((1, 1, 1, 1), (1, 1, 1, 1))),
        "attention.cache_qk": Shard((kv, kv)),
        "attention.mul_scale_c": Shard((kv, ())),
        "attention.mask_mul_c": Shard(((dp, 1, 1, 1, 1), ())),
        "attention.mask_add_c": Shard(((dp, mp, 1, 1, 1), (dp, 1, 1, 1, 1))),
        "attention.softmax_c": Shard(((dp, mp, 1, 1, 1),)),
        "attention.cache_pv": Shard((kv, kv)),
    })
    if cfg.use_flash_attention:                     # Ascend prefill: the fused kernel over the repeated cache
        t["attention.flash_attention.flash_attention"] = Shard((kv, kv, kv, (dp, 1, 1, 1)))
        if cfg.n_rep > 1:
            t["attention.tile_kv"] = Shard(((dp, mp, 1, 1, 1),))
    return t


def predict_model_strategies(cfg: TeleChatConfig, dims: ParallelDims,
                             fused_norm: bool | None = None) -> dict[str, Shard]:
    """Embedding, final norm, the last-token gather, the vocab-parallel lm_head and the gather of its logits."""
    dims = predict_dims(dims)
    dp, mp = dims.dp, dims.mp
    t = {k: v for k, v in model_strategies(cfg, dims, fused_norm).items()
         if k not in ("lm_head.matmul", "log_softmax", "gather_d")}
    vocab = 1 if dims.vocab_emb_dp or cfg.vocab_size % mp else mp
    t["gather_last"] = Shard(((dp, 1, 1), (1,)))
    t["lm_head.matmul"] = Shard(((dp, 1), (vocab, 1)))
    t["logits_fp32"] = Shard(((dp, 1, 1),))        # replicated: every rank gets the whole [B, 1, V]
    return t


def predict_strategy_table(cfg: TeleChatConfig, dims: ParallelDims,
                           fused_norm: bool | None = None) -> dict[str, Shard]:
    """The cached prefill / decode table: primitive path in TeleChatForCausalLM -> Shard, every layer expanded."""
    table = predict_model_strategies(cfg, dims, fused_norm)
    per_layer = predict_layer_strategies(cfg, dims, fused_norm)
    for i in range(cfg.n_layer):
        table.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return table


# What the cached step runs and the paged one does not: the static cache's write, the k / v head transposes (the
# paged step writes [R * n, K, d] rows), flash attention over the repeated cache (the paged step attends over the
# gathered blocks with the grouped attention, prefill too).
_STATIC_ONLY = ("attention.cache_add", "attention.write_slot", "attention.not_scratch", "attention.write_cast",
                "attention.write_mul_k", "attention.write_mul_v", "attention.transpose_k", "attention.transpose_v",
                "attention.flash_attention.flash_attention", "attention.tile_kv")


def paged_predict_layer_strategies(cfg: TeleChatConfig, dims: ParallelDims, fused_norm: bool | None = None,
                                   kernels: bool = False) -> dict[str, Shard]:
    """Strategies of one decoder layer in the paged step (construct_paged), keyed relative to the layer.

    The paged caches [num_blocks * block_size, K, d] are split by whole kv heads (dimension 1), as the static ones:
    the write is a ScatterUpdate of whole slots (MindSpore splits its input and updates on the dimensions the
    indices do not address; indices and the slot dimension stay whole), the read a Gather of each row's slots
    ([R, C, K, d], the kv heads still split), transposed to [R, K, C, d] for the grouped attention the cached step
    uses. Rotary runs on [R, n, heads, d] here (before the head transpose): heads split by mp, its tables [R, n, 1,
    d] whole. kernels (Ascend): caches [num_blocks, block_size, K, d] split on K, ReshapeAndCache and PagedAttention
    with MindFormers' PagedAttentionMgr strategies ([R, n, K*d] / [R, 1, H] inputs split on their last axis), the
    prefill chunks' Gather by block.
    """
    dims = predict_dims(dims)
    dp, mp = dims.dp, dims.mp
    t = {k: v for k, v in predict_layer_strategies(cfg, dims, fused_norm).items()
         if k not in _STATIC_ONLY and not k.startswith("attention.rotary.")}
    rows, table = (dp, 1, mp, 1), (dp, 1, 1, 1)     # [R, n, heads, d], cos / sin [R, n, 1, d]
    t.update({
        "attention.rotary.split": Shard((rows,)),
        "attention.rotary.neg": Shard((rows,)),
        "attention.rotary.concat": Shard((rows, rows)),
        "attention.rotary.mul_cos": Shard((rows, table)),
        "attention.rotary.mul_sin": Shard((rows, table)),
        "attention.rotary.add": Shard((rows, rows)),
        "attention.paged_write_k": Shard(((1, mp, 1), (1,), (1, mp, 1))),
        "attention.paged_write_v": Shard(((1, mp, 1), (1,), (1, mp, 1))),
        "attention.paged_gather_k": Shard(((1, mp, 1), (1, 1))),
        "attention.paged_gather_v": Shard(((1, mp, 1), (1, 1))),
        "attention.paged_transpose_k": Shard(((dp, 1, mp, 1),)),
        "attention.paged_transpose_v": Shard(((dp, 1, mp, 1),)),
    })
    if kernels:
        cache = (1, 1, mp, 1)
        del t["attention.paged_write_k"], t["attention.paged_write_v"]
        t.update({
            "attention.reshape_and_cache": Shard(((dp, 1, mp), (dp, 1, mp), cache, cache, (1,))),
            "attention.paged_attention": Shard(((dp, 1, mp), cache, cache, (dp, 1), (dp,))),
            "attention.paged_visible": Shard(((dp, 1),)),
            "attention.paged_lens": Shard(((), (dp,))),
            "attention.paged_gather_k": Shard((cache, (1, 1))),
            "attention.paged_gather_v": Shard((cache, (1, 1))),
        })
    return t


def paged_predict_strategy_table(cfg: TeleChatConfig, dims: ParallelDims, fused_norm: bool | None = None,
                                 kernels: bool = False) -> dict[str, Shard]:
    """The paged step's table (serving over the paged kv cache): primitive path -> Shard, every layer expanded."""
    table = predict_model_strategies(cfg, dims, fused_norm)
    per_layer = paged_predict_layer_strategies(cfg, dims, fused_norm, kernels)
    for i in range(cfg.n_layer):
        table.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return table


def cache_clear_strategies(dims: ParallelDims) -> dict[str, Shard]:
    """The stepper's slot-clearing step: cache [B, K, L, d] times keep [B, 1, L, 1], assigned back in place."""
    kv = (dims.dp, dims.mp, 1, 1)
    return {"keep_mul": Shard((kv, (dims.dp, 1, 1, 1))), "assign": Shard((kv, kv))}


# Where a parameter's layout comes from: the primitive of its cell that consumes it, and which input it is.
_CONSUMERS = {"weight": (("matmul", 1), ("norm", 1), ("mul2", 1)), "bias": (("bias_add", 1),),
              "embedding_weight": (("gather", 0),)}


def parameter_splits(names, table: dict[str, Shard]) -> dict[str, tuple]:
    """Split of every parameter (e.g. 'model.layers.0.attention.wk_v.weight' -> (mp, 1)) implied by the table:
    the strategy of the primitive that consumes it. A parameter no declared primitive consumes is an error."""
    out = {}
    for name in names:
        cell, _, attr = name.rpartition(".")
        for prim, index in _CONSUMERS.get(attr, ()):
            shard = table.get(f"{cell}.{prim}")
            if shard is not None:
                out[name] = tuple(shard.inputs[index])
                break
        else:
            raise KeyError(f"no strategy in the table consumes parameter {name!r}")
    return out


def resolve(root, path: str):
    """The attribute at a dotted path ('model.layers.3.attention.wq.matmul'); digits index a CellList."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def apply_strategies(model, table: dict[str, Shard]) -> None:
    """Call `.shard()` on every primitive named in the table (KeyError-free: a missing path is a bug)."""
    for path, shard in table.items():
        try:
            prim = resolve(model, path)
        except (AttributeError, IndexError) as exc:
            raise AttributeError(f"strategy table names {path!r}, which the model does not have ({exc})") from None
        prim.shard(shard.inputs, shard.outputs)


def recorded_strategies(model) -> dict[str, Shard]:
    """Every primitive of the model that carries a strategy, read back from its attributes (for tests/plans)."""
    out: dict[str, Shard] = {}
    for name, cell in model.cells_and_names():
        for attr, prim in getattr(cell, "_primitives", {}).items():
            if prim is None:
                continue
            inputs = prim.attrs.get("in_strategy")
            if inputs is not None:
                path = f"{name}.{attr}" if name else attr
                out[path] = Shard(tuple(map(tuple, inputs)), prim.attrs.get("out_strategy"))
    return out
