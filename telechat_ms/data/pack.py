"""Packing encoded examples into fixed-length sequences (spec 6): plan first, materialise while writing."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from telechat_ms import special_tokens as st
from telechat_ms.data.render import Encoded

OVERLONG = ("truncate", "drop")
PAD_SIDES = ("right", "left")


@dataclass
class PackOptions:
    """How sequences are built; `cross_attention=False` adds per-sample position_ids and repeats the system prefix."""

    max_seq_len: int
    overlong: str = "truncate"
    pad_side: str = "right"
    cross_attention: bool = True
    pack: bool = True
    sep_ids: tuple[int, ...] = ()  # ids of the "\n" between two packed dialogs (as in a multi-turn rendering)
    max_open_bins: int = 16  # first-fit window per system prompt: bounds time, keeps order roughly intact

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {self.overlong!r}")
        if self.pad_side not in PAD_SIDES:
            raise ValueError(f"pad_side must be one of {PAD_SIDES}, got {self.pad_side!r}")


@dataclass
class PackStats:
    """What packing did to the examples: nothing is dropped or cut without being counted here."""

    examples_in: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    packed_examples: int = 0  # examples that share their sequence with at least one other
    sequences: int = 0


@dataclass
class _Bin:
    items: list[int] = field(default_factory=list)
    length: int = 0


def _added_cost(item: Encoded, opts: PackOptions) -> int:
    """Tokens an example adds to a non-empty bin: it shares the system prefix unless attention is blocked."""
    if not item.is_chat or not opts.cross_attention:
        return len(item)
    return len(opts.sep_ids) + len(item) - item.prefix_len


def plan_sequences(items: Sequence[Encoded], order: Sequence[int],
                   opts: PackOptions) -> tuple[list[list[int]], PackStats]:
    """Group example indices (in `order`, repeats allowed) into sequences; returns the plans and the counts."""
    stats = PackStats()
    plans: list[list[int]] = []
    open_bins: dict[tuple[bool, bytes], list[_Bin]] = {}
    limit = opts.max_seq_len
    for idx in order:
        item = items[idx]
        stats.examples_in += 1
        if len(item) > limit:
            if opts.overlong == "drop":
                stats.dropped_overlong += 1
                continue
            if not item.mask[:limit].any():
                stats.dropped_no_target += 1
                continue
            stats.truncated += 1
            plans.append([idx])
            continue
        if not item.mask.any():
            stats.dropped_no_target += 1
            continue
        if not (opts.pack and item.packable):
            plans.append([idx])
            continue
        key = (item.is_chat, item.ids[:item.prefix_len].tobytes())
        bins = open_bins.setdefault(key, [])
        extra = _added_cost(item, opts)
        for b in bins:
            if b.length + extra <= limit:
                b.items.append(idx)
                b.length += extra
                break
        else:
            bins.append(_Bin([idx], len(item)))
            if len(bins) > opts.max_open_bins:
                plans.append(bins.pop(0).items)
    for bins in open_bins.values():
        plans.extend(b.items for b in bins)
    stats.packed_examples = sum(len(p) for p in plans if len(p) > 1)
    stats.sequences = len(plans)
    return plans, stats


@dataclass
class PackedRow:
    """One output row: input_ids, labels (-100 = not supervised) and optional per-sample position_ids."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray | None
    n_tokens: int
    n_supervised: int


def materialize(plan: Sequence[int], items: Sequence[Encoded], opts: PackOptions) -> PackedRow:
    """Concatenate a plan's examples (sharing or repeating the system prefix), truncate, pad, label."""
    limit = opts.max_seq_len
    first = items[plan[0]]
    id_parts, mask_parts, lengths = [first.ids], [first.mask], [len(first)]
    sep = np.asarray(opts.sep_ids, dtype=np.int32)
    for idx in plan[1:]:
        item = items[idx]
        if item.is_chat and opts.cross_attention:
            body_ids, body_mask = item.ids[item.prefix_len:], item.mask[item.prefix_len:]
            id_parts += [sep, body_ids]
            mask_parts += [np.zeros(sep.shape[0], dtype=bool), body_mask]
            lengths.append(sep.shape[0] + body_ids.shape[0])
        else:
            id_parts.append(item.ids)
            mask_parts.append(item.mask)
            lengths.append(len(item))
    ids = np.concatenate(id_parts).astype(np.int32)[:limit]
    mask = np.concatenate(mask_parts)[:limit]
    n = ids.shape[0]
    pad = limit - n
    labels = np.where(mask, ids, st.IGNORE_INDEX).astype(np.int32)
    pad_ids = np.full(pad, st.PAD_ID, dtype=np.int32)
    pad_labels = np.full(pad, st.IGNORE_INDEX, dtype=np.int32)
    positions = None
    if not opts.cross_attention:
        lengths[-1] -= sum(lengths) - n  # truncation shortens the last sample only
        positions = np.concatenate([np.arange(k, dtype=np.int32) for k in lengths if k > 0])
    if opts.pad_side == "right":
        ids, labels = np.concatenate([ids, pad_ids]), np.concatenate([labels, pad_labels])
        if positions is not None:
            positions = np.concatenate([positions, np.arange(pad, dtype=np.int32)])
    else:
        ids, labels = np.concatenate([pad_ids, ids]), np.concatenate([pad_labels, labels])
        if positions is not None:
            positions = np.concatenate([np.arange(pad, dtype=np.int32), positions])
    return PackedRow(ids, labels, positions, n, int(mask.sum()))


def sample_boundaries(position_ids: np.ndarray) -> np.ndarray:
    """Cumulative end offsets of the samples in one row (where position_ids restart at 0), e.g. for actual_seq_len."""
    position_ids = np.asarray(position_ids)
    starts = np.flatnonzero(position_ids == 0)
    return np.append(starts[1:], position_ids.shape[0]).astype(np.int32)
