"""Position inputs of TeleChat2, built on the host with numpy and fed to the graphs as tensors: rotary cos/sin
tables with the released NTK-aware base and attention scaling (mscale), causal and per-sample (packed) masks, for a
full forward (training, scoring) and for the kv cache (prefill and decode). The model, the trainer and the kv cache
all build their inputs here, so the graphs stay free of data-dependent shapes and the kv cache can follow the
released incremental rule (tables for each row's new total length, applied to the new tokens only).

Layouts (the contract with `telechat_ms.parallel.parallelize(..., batched_inputs=...)`, which shards them):
  shared   cos/sin [S, d],        mask [1, 1, S, S]   one causal table for every row
  batched  cos/sin [B, 1, S, d],  mask [B, 1, S, S]   per-row tables (packed samples restart their positions)
  varlen   cos/sin [B, 1, S, d],  actual_seq_len int32 [B * K]   packed rows for the Ascend flash-attention
           kernel in TND layout: every sample's cumulative end over the flattened batch, K per row (the place of
           the mask argument; `varlen_mask` is the explicit mask it stands for)
  cached   cos/sin [B, 1, n, d],  mask [B, 1, n, L],  index [B, K, n, 3]   n new tokens per row, cache of L slots
Masks are uint8 with 1 = may not attend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

ROPE_BASE = 10000.0  # hard-coded in the released code (no rope_theta key)


def ntk_params(total_len: int, head_dim: int, training_seqlen: int, base_seqlen: int) -> tuple[float, float, float]:
    """(ntk_alpha, rotary base, mscale) for a sequence of `total_len` tokens (spec section 1)."""
    length = max(int(total_len), int(training_seqlen))
    context_value = math.log(length / base_seqlen, 2) + 1
    ntk_alpha = max(2 ** math.ceil(context_value) - 1, 1)
    base = ROPE_BASE * ntk_alpha ** (head_dim / (head_dim - 2))
    ratio = length / training_seqlen
    mscale = 1.0 if ratio <= 1 else 0.1 * math.log(ratio) + 1.0
    return float(ntk_alpha), float(base), float(mscale)


def rope_tables(positions: np.ndarray | range | int, total_len: int, head_dim: int, training_seqlen: int,
                base_seqlen: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [len(positions), head_dim] (float32, mscale folded in) for the given total length.

    Arithmetic follows the released torch code in float32: inv_freq = 1 / base ** (arange(0, d, 2) / d),
    angles = t x inv_freq, emb = cat(angles, angles).
    """
    if isinstance(positions, int):
        positions = np.arange(positions)
    pos = np.asarray(positions, dtype=np.float32)
    _, base, mscale = ntk_params(total_len, head_dim, training_seqlen, base_seqlen)
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponent, dtype=np.float32)).astype(np.float32)
    freqs = np.outer(pos, inv_freq).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos = (np.cos(emb) * np.float32(mscale)).astype(np.float32)
    sin = (np.sin(emb) * np.float32(mscale)).astype(np.float32)
    return cos, sin


class RotaryConfig(Protocol):
    """What the tables need from a TeleChatConfig."""

    head_dim: int
    training_seqlen: int
    base_seqlen: int
    num_key_value_heads: int


SHARED, BATCHED, VARLEN = "shared", "batched", "varlen"
LAYOUTS = (SHARED, BATCHED, VARLEN)
COMPRESSED_MASK_SIZE = 2048  # the flash-attention kernel's compressed causal mask (sparse_mode 2/3)


def tables_for(cfg: RotaryConfig, positions, total_len: int) -> tuple[np.ndarray, np.ndarray]:
    """rope_tables with the model's head_dim / training_seqlen / base_seqlen."""
    return rope_tables(positions, total_len, cfg.head_dim, cfg.training_seqlen, cfg.base_seqlen)


def causal_mask(q_len: int, kv_len: int | None = None, offset: int = 0) -> np.ndarray:
    """uint8 [1, 1, q_len, kv_len]: 1 where query (at offset + i) may not see key j (j > offset + i)."""
    kv_len = q_len + offset if kv_len is None else kv_len
    q_pos = np.arange(q_len)[:, None] + offset
    k_pos = np.arange(kv_len)[None, :]
    return (k_pos > q_pos).astype(np.uint8)[None, None]


def segment_ids(position_ids: np.ndarray) -> np.ndarray:
    """[B, S] index of the packed sample every token belongs to (a sample starts where its position is 0)."""
    return np.cumsum(np.asarray(position_ids) == 0, axis=1)


def packed_mask(position_ids: np.ndarray) -> np.ndarray:
    """uint8 [B, 1, S, S]: causal within each packed sample, nothing across samples."""
    seg = segment_ids(position_ids)
    seq = seg.shape[1]
    same = seg[:, :, None] == seg[:, None, :]
    causal = np.tril(np.ones((seq, seq), dtype=bool))[None]
    return (~(same & causal)).astype(np.uint8)[:, None]


def actual_seq_lengths(position_ids: np.ndarray, max_segments: int | None = None) -> np.ndarray:
    """int32 [B * K]: the cumulative end offset of every packed sample over the flattened batch (the TND layout's
    actual_seq_qlen / actual_seq_kvlen), each row's list padded to K entries with the row's end (zero-length samples,
    as MindFormers pads it). K = max_segments, or the batch's most samples per row rounded up to a power of two
    (a fixed K keeps one compiled graph)."""
    pos = np.asarray(position_ids)
    batch, seq = pos.shape
    ends = []
    for r in range(batch):
        starts = np.flatnonzero(pos[r] == 0)
        if starts.size == 0 or starts[0] != 0:
            raise ValueError(f"row {r}: position_ids must start at 0 (every sample restarts at 0)")
        ends.append(np.append(starts[1:], seq))
    need = max(e.size for e in ends)
    k = max_segments if max_segments is not None else 1 << (need - 1).bit_length()
    if need > k:
        raise ValueError(f"a row holds {need} samples, more than the {k} entries per row of actual_seq_len "
                         f"(the manifest's max_samples_per_row + 1)")
    out = np.empty((batch, k), dtype=np.int32)
    for r, e in enumerate(ends):
        out[r, :e.size] = e + r * seq
        out[r, e.size:] = (r + 1) * seq
    return out.reshape(-1)


def varlen_mask(actual_seq_len: np.ndarray, batch: int, seq_len: int) -> np.ndarray:
    """uint8 [B, 1, S, S]: the explicit mask that actual_seq_len describes (causal within each sample)."""
    ends = np.unique(np.asarray(actual_seq_len, dtype=np.int64))
    token = np.arange(batch * seq_len)
    seg = np.searchsorted(ends, token, side="right").reshape(batch, seq_len)
    same = seg[:, :, None] == seg[:, None, :]
    causal = np.tril(np.ones((seq_len, seq_len), dtype=bool))[None]
    return (~(same & causal)).astype(np.uint8)[:, None]


def compressed_causal_mask() -> np.ndarray:
    """uint8 [2048, 2048], 1 above the diagonal: the causal mask the flash-attention kernel takes in TND layout."""
    return np.triu(np.ones((COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE), dtype=np.uint8), k=1)


def training_inputs(cfg: RotaryConfig, seq_len: int, batch_size: int = 1, position_ids: np.ndarray | None = None,
                    layout: str = SHARED, max_segments: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cos, sin, mask) of a full forward over rows of seq_len tokens, in the shared, batched or varlen layout.

    Without position_ids every row holds one sequence at positions 0..S-1. With position_ids (packed rows; batched
    or varlen layout) each token takes the row of its own position in the tables of the row length S, the same
    tables an unpacked row padded to S gets, so a packed sample computes exactly what it would alone. In the varlen
    layout the third input is actual_seq_len (K = max_segments per row) instead of the mask.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    cos, sin = tables_for(cfg, seq_len, seq_len)
    if layout == VARLEN:
        pos = np.zeros((batch_size, seq_len), np.int64) + np.arange(seq_len) if position_ids is None else \
            np.asarray(position_ids, dtype=np.int64)
        if pos.shape != (batch_size, seq_len):
            raise ValueError(f"position_ids has shape {list(pos.shape)}, expected {[batch_size, seq_len]}")
        return cos[pos][:, None], sin[pos][:, None], actual_seq_lengths(pos, max_segments)
    if position_ids is None:
        mask = causal_mask(seq_len)
        if layout == SHARED:
            return cos, sin, mask
        shape = (batch_size, 1, seq_len, cfg.head_dim)
        return (np.broadcast_to(cos, shape).copy(), np.broadcast_to(sin, shape).copy(),
                np.broadcast_to(mask, (batch_size, 1, seq_len, seq_len)).copy())
    if layout != BATCHED:
        raise ValueError("packed rows (position_ids) need the batched or varlen layout: their masks differ per row")
    pos = np.asarray(position_ids, dtype=np.int64)
    if pos.shape != (batch_size, seq_len):
        raise ValueError(f"position_ids has shape {list(pos.shape)}, expected {[batch_size, seq_len]}")
    return cos[pos][:, None], sin[pos][:, None], packed_mask(pos)


@dataclass
class CacheInputs:
    """Host inputs of one kv-cache step: per-row rotary tables, the mask over the cache, the write index."""

    cos: np.ndarray     # [B, 1, n, d]
    sin: np.ndarray     # [B, 1, n, d]
    mask: np.ndarray    # uint8 [B, 1, n, L]
    index: np.ndarray   # int32 [B, K, n, 3]: (row, kv head, slot) of every new key / value


def cache_inputs(cfg: RotaryConfig, positions: np.ndarray, totals: np.ndarray, slots: np.ndarray,
                 first_slot: np.ndarray, max_len: int) -> CacheInputs:
    """Inputs for writing n new tokens per row into a cache of max_len slots and attending over it.

    positions [B, n]: rotary position of every new token; totals [B]: each row's total length after this step (its
    NTK base and mscale, the released incremental rule); slots [B, n]: the cache slot each new token is written to;
    first_slot [B]: the row's first valid slot (slots before it, e.g. left pads, are never attended). A query sees
    the keys in [first_slot, its own slot].
    """
    positions = np.asarray(positions, dtype=np.int64)
    slots = np.asarray(slots, dtype=np.int64)
    batch, n = positions.shape
    cos = np.empty((batch, 1, n, cfg.head_dim), np.float32)
    sin = np.empty_like(cos)
    for b in range(batch):
        cos[b, 0], sin[b, 0] = tables_for(cfg, positions[b], int(totals[b]))
    keys = np.arange(max_len)[None, None, :]
    first = np.asarray(first_slot, dtype=np.int64)[:, None, None]
    hide = (keys > slots[:, :, None]) | (keys < first)
    rows = np.broadcast_to(np.arange(batch)[:, None, None], (batch, cfg.num_key_value_heads, n))
    heads = np.broadcast_to(np.arange(cfg.num_key_value_heads)[None, :, None], rows.shape)
    index = np.stack([rows, heads, np.broadcast_to(slots[:, None, :], rows.shape)], axis=-1).astype(np.int32)
    return CacheInputs(cos, sin, hide[:, None].astype(np.uint8), index)


@dataclass
class PagedInputs:
    """Host inputs of one paged kv-cache step: per-token rotary tables and the mask over the gathered context."""

    cos: np.ndarray     # [R, n, 1, d]
    sin: np.ndarray     # [R, n, 1, d]
    mask: np.ndarray    # uint8 [R, 1, n, C]


def paged_inputs(cfg: RotaryConfig, positions: np.ndarray, totals: np.ndarray, ctx_len: int) -> PagedInputs:
    """Inputs for n new tokens per row over a context gathered from the row's blocks, C = ctx_len slots long.

    positions [R, n]: rotary position of every new token, which is also its slot in the gathered context (a
    sequence's token p sits at context index p); totals [R, n]: the total length whose NTK base and mscale each
    token takes (a prompt's tokens: the prompt's length, whatever chunk they are prefilled in; a decoded token: the
    length it makes), so chunked prefill and batching compute the tables one-sequence `generate` computes. A query
    sees the context indices <= its position.
    """
    positions = np.asarray(positions, dtype=np.int64)
    totals = np.asarray(totals, dtype=np.int64)
    rows, n = positions.shape
    cos = np.empty((rows, n, 1, cfg.head_dim), np.float32)
    sin = np.empty_like(cos)
    groups: dict[tuple[float, float, float], list[int]] = {}
    for total in np.unique(totals):
        key = ntk_params(int(total), cfg.head_dim, cfg.training_seqlen, cfg.base_seqlen)
        groups.setdefault(key, []).append(int(total))
    for members in groups.values():
        where = np.isin(totals, members)
        c, s = tables_for(cfg, positions[where], members[0])
        cos[where, 0], sin[where, 0] = c, s
    hide = np.arange(ctx_len)[None, None, :] > positions[:, :, None]
    return PagedInputs(cos, sin, hide[:, None].astype(np.uint8))
