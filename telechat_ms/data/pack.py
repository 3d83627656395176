"""Packing encoded examples into rows of at most max_seq_len tokens (spec 6, 10): plan first, then materialise.

Three rules, one per kind of data:
- released SFT packing (cross attention, the default): single-turn, non-tool records that share a system prompt
  share a row (system prefix once); multi-turn and tool records stay one per row.
- isolated SFT packing (`cross_attention=False`): every record, multi-turn and tool included, is placed first-fit
  into rows; each keeps its system prompt and its positions restart, so the trainer blocks attention between them.
- pretrain chunking: every document + <_end> concatenated and cut into full rows; nothing is truncated.
Rows are compact (real tokens only); `pad_row` pads them to max_seq_len where a fixed shape is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from telechat_ms import special_tokens as st
from telechat_ms.data.render import Encoded

OVERLONG = ("truncate", "drop")
PAD_SIDES = ("right", "left")


@dataclass
class PackOptions:
    """How rows are built; `cross_attention=False` adds per-sample position_ids and packs every record."""

    max_seq_len: int
    overlong: str = "truncate"
    pad_side: str = "right"
    cross_attention: bool = True
    pack: bool = True
    sep_ids: tuple[int, ...] = ()  # ids of the "\n" between two packed dialogs (as in a multi-turn rendering)
    max_open_bins: int = 16  # released rule: first-fit window per system prompt (bounds time, keeps order)

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
    packed_examples: int = 0  # examples that share their row with at least one other
    sequences: int = 0


@dataclass
class _Bin:
    items: list[int] = field(default_factory=list)
    length: int = 0


def _added_cost(item: Encoded, opts: PackOptions) -> int:
    """Tokens an example adds to a non-empty row: it shares the system prefix unless attention is blocked."""
    if not item.is_chat or not opts.cross_attention:
        return len(item)
    return len(opts.sep_ids) + len(item) - item.prefix_len


def _admit(item: Encoded, opts: PackOptions, stats: PackStats) -> str:
    """'skip' (dropped, counted), 'alone' (a row of its own: over-long and truncated, or unpackable) or 'pack'."""
    limit = opts.max_seq_len
    stats.examples_in += 1
    if len(item) > limit:
        if opts.overlong == "drop":
            stats.dropped_overlong += 1
            return "skip"
        if not item.mask[:limit].any():
            stats.dropped_no_target += 1
            return "skip"
        stats.truncated += 1
        return "alone"
    if not item.mask.any():
        stats.dropped_no_target += 1
        return "skip"
    return "pack" if opts.pack else "alone"


class FirstFit:
    """First-fit bin packing in O(log bins) per item: a max-tree over the bins' free space finds the first bin
    (in creation order) that still has room."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 1
        self.tree = [0, 0]  # tree[size + i] = free space of bin i; inner nodes hold the max of their children
        self.count = 0

    def _set(self, i: int, free: int) -> None:
        i += self.size
        self.tree[i] = free
        i >>= 1
        while i:
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])
            i >>= 1

    def _grow(self) -> None:
        leaves = self.tree[self.size:] + [0] * self.size
        self.size *= 2
        self.tree = [0] * self.size + leaves
        for i in range(self.size - 1, 0, -1):
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])

    def place(self, need: int) -> int:
        """Index of the bin that takes `need` tokens (a new bin when none has room)."""
        if self.tree[1] >= need:
            i = 1
            while i < self.size:
                i = 2 * i if self.tree[2 * i] >= need else 2 * i + 1
            b = i - self.size
            self._set(b, self.tree[i] - need)
            return b
        if self.count == self.size:
            self._grow()
        b = self.count
        self.count += 1
        self._set(b, self.capacity - need)
        return b

    def close(self, b: int) -> None:
        """Take a bin out of consideration (a row of its own)."""
        self._set(b, 0)


def _plan_isolated(items: Sequence[Encoded], order: Sequence[int], opts: PackOptions,
                   stats: PackStats) -> list[list[int]]:
    """Every admitted record first-fit into rows of max_seq_len (rows in creation order)."""
    fit = FirstFit(opts.max_seq_len)
    plans: list[list[int]] = []
    for idx in order:
        verdict = _admit(items[idx], opts, stats)
        if verdict == "skip":
            continue
        if verdict == "alone":
            b = fit.place(opts.max_seq_len)
            fit.close(b)
        else:
            b = fit.place(len(items[idx]))
        if b == len(plans):
            plans.append([])
        plans[b].append(idx)
    return plans


def _plan_released(items: Sequence[Encoded], order: Sequence[int], opts: PackOptions,
                   stats: PackStats) -> list[list[int]]:
    """Single-turn non-tool records sharing a system prompt share rows (a window of open rows per prompt)."""
    plans: list[list[int]] = []
    open_bins: dict[tuple[bool, bytes], list[_Bin]] = {}
    limit = opts.max_seq_len
    for idx in order:
        item = items[idx]
        verdict = _admit(item, opts, stats)
        if verdict == "skip":
            continue
        if verdict == "alone" or not item.packable:
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
    return plans


def plan_sequences(items: Sequence[Encoded], order: Sequence[int],
                   opts: PackOptions) -> tuple[list[list[int]], PackStats]:
    """Group example indices (in `order`, repeats allowed) into rows; returns the plans and the counts."""
    stats = PackStats()
    plan = _plan_released if opts.cross_attention else _plan_isolated
    plans = plan(items, order, opts, stats)
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
    n_samples: int = 1


def materialize_compact(plan: Sequence[int], items: Sequence[Encoded], opts: PackOptions) -> PackedRow:
    """A plan's examples concatenated (sharing or repeating the system prefix) and truncated: real tokens only."""
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
    labels = np.where(mask, ids, st.IGNORE_INDEX).astype(np.int32)
    positions = None
    if not opts.cross_attention:
        lengths[-1] -= sum(lengths) - n  # truncation shortens the last sample only
        positions = np.concatenate([np.arange(k, dtype=np.int32) for k in lengths if k > 0])
        labels[positions == 0] = st.IGNORE_INDEX  # (already so: a chat starts with its unsupervised <_system>)
    return PackedRow(ids, labels, positions, n, int((labels != st.IGNORE_INDEX).sum()), len(plan))


def pad_row(input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray | None, length: int,
            pad_side: str = "right") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pad a compact row to `length` with <_pad> / -100; position_ids of the pads count 0, 1, ... (a segment of
    their own, never attended by the samples)."""
    n = int(input_ids.shape[0])
    pad = length - n
    if pad < 0:
        raise ValueError(f"row of {n} tokens is longer than {length}")
    if pad == 0:
        return input_ids, labels, position_ids
    pad_ids = np.full(pad, st.PAD_ID, dtype=np.int32)
    pad_labels = np.full(pad, st.IGNORE_INDEX, dtype=np.int32)
    pad_pos = np.arange(pad, dtype=np.int32)
    if pad_side == "right":
        return (np.concatenate([input_ids, pad_ids]), np.concatenate([labels, pad_labels]),
                None if position_ids is None else np.concatenate([position_ids, pad_pos]))
    return (np.concatenate([pad_ids, input_ids]), np.concatenate([pad_labels, labels]),
            None if position_ids is None else np.concatenate([pad_pos, position_ids]))


def materialize(plan: Sequence[int], items: Sequence[Encoded], opts: PackOptions) -> PackedRow:
    """materialize_compact, padded to max_seq_len on opts.pad_side."""
    row = materialize_compact(plan, items, opts)
    ids, labels, pos = pad_row(row.input_ids, row.labels, row.position_ids, opts.max_seq_len, opts.pad_side)
    return PackedRow(ids, labels, pos, row.n_tokens, row.n_supervised, row.n_samples)


def chunk_documents(items: Sequence[Encoded], order: Sequence[int], max_seq_len: int,
                    with_positions: bool) -> Iterator[PackedRow]:
    """Pretrain rows: the documents (each already ending in <_end>) concatenated in `order` and cut into rows of
    max_seq_len; only the last row may be shorter. Every token is supervised, except, with positions, the first
    token of each segment: there each document's piece in a row restarts at 0 (a document continued from the
    previous row starts a new segment) and, isolated, nothing before it in the row may predict it."""
    if not order:
        return
    lengths = np.fromiter((len(items[i]) for i in order), dtype=np.int64, count=len(order))
    stream = np.concatenate([items[i].ids for i in order]).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # where each document begins in the stream
    total = int(stream.shape[0])
    for lo in range(0, total, max_seq_len):
        hi = min(lo + max_seq_len, total)
        ids = stream[lo:hi]
        cuts = starts[(starts > lo) & (starts < hi)] - lo
        bounds = np.concatenate([[0], cuts, [hi - lo]])
        positions, labels = None, ids.copy()
        if with_positions:
            positions = np.concatenate([np.arange(b - a, dtype=np.int32) for a, b in zip(bounds[:-1], bounds[1:])])
            labels[bounds[:-1]] = st.IGNORE_INDEX
        yield PackedRow(ids, labels, positions, hi - lo, int((labels != st.IGNORE_INDEX).sum()), len(bounds) - 1)


def sample_boundaries(position_ids: np.ndarray) -> np.ndarray:
    """Cumulative end offsets of the samples in one row (where position_ids restart at 0), e.g. for actual_seq_len."""
    position_ids = np.asarray(position_ids)
    starts = np.flatnonzero(position_ids == 0)
    return np.append(starts[1:], position_ids.shape[0]).astype(np.int32)
