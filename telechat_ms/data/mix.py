"""Data-mix files {"path.jsonl": weight}: paths relative to the mix file, weights as seeded repeat/subset counts."""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np

from telechat_ms.errors import DataError
from telechat_ms.io import read_json_object


@dataclass(frozen=True)
class MixEntry:
    """One file of a data mix: the key as written, its resolved path and its weight."""

    key: str
    path: str
    weight: float


def load_mix(mix_path: str) -> list[MixEntry]:
    """Read and check a mix file; a bare .jsonl path stands for a mix of that one file with weight 1."""
    mix_path = os.fspath(mix_path)
    if mix_path.endswith(".jsonl"):
        if not os.path.isfile(mix_path):
            raise DataError(f"{mix_path}: data file not found")
        return [MixEntry(os.path.basename(mix_path), os.path.abspath(mix_path), 1.0)]
    if not os.path.isfile(mix_path):
        raise DataError(f"{mix_path}: data-mix file not found")
    mix = read_json_object(mix_path, DataError)
    if not mix:
        raise DataError(f"{mix_path}: expected a non-empty JSON object {{\"file.jsonl\": weight, ...}}")
    base = os.path.dirname(os.path.abspath(mix_path))
    entries = []
    for key, weight in mix.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise DataError(f"{mix_path}: {key!r}: weight must be a number, got {weight!r}")
        if weight <= 0:
            raise DataError(f"{mix_path}: {key!r}: weight must be positive, got {weight!r}")
        path = os.path.normpath(os.path.join(base, key))
        if not os.path.isfile(path):
            raise DataError(f"{mix_path}: {key!r}: data file not found ({path})")
        entries.append(MixEntry(key, path, float(weight)))
    return entries


def _file_seed(seed: int, key: str) -> list[int]:
    """A per-file seed: adding or reordering other files never changes this file's subset."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return [seed, int.from_bytes(digest[:8], "little")]


def _split_weight(n: int, weight: float) -> tuple[int, int]:
    """(full passes, records of the seeded subset) for n records at weight w: floor(w), round(frac(w) * n)."""
    whole = int(math.floor(weight))
    return whole, int(math.floor((weight - whole) * n + 0.5))  # half rounds up, not to even


def select_indices(n: int, weight: float, seed: int, key: str) -> list[int]:
    """floor(w) full passes over n records, then round(frac(w) * n) distinct records chosen with the seed."""
    whole, extra = _split_weight(n, weight)
    indices = list(range(n)) * whole
    if extra:
        rng = np.random.default_rng(_file_seed(seed, key))
        indices += sorted(int(i) for i in rng.choice(n, size=extra, replace=False))
    return indices


@dataclass(frozen=True)
class PartQuota:
    """A part's share of its file's mix weight: every record `whole` times, plus `extra` distinct records."""

    whole: int
    extra: int
    seed: tuple[int, ...]  # seeds the choice of the `extra` records inside the part


def part_quotas(part_records: list[int], weight: float, seed: int, key: str) -> list[PartQuota]:
    """Split one file's selection over its parts, from the pre-pass counts alone (never the worker count).

    floor(w) full passes, then round(frac(w) x N) distinct records: how many of them fall in each part is one
    seeded multivariate hypergeometric draw, and which ones is a seeded choice inside the part, so the subset is a
    uniformly random one without replacement, as if drawn from the whole file at once.
    """
    n = int(sum(part_records))
    whole, extra = _split_weight(n, weight)
    base = _file_seed(seed, key)
    counts = [0] * len(part_records)
    if extra:
        rng = np.random.default_rng(base)
        counts = [int(c) for c in rng.multivariate_hypergeometric(np.asarray(part_records, dtype=np.int64), extra)]
    return [PartQuota(whole, c, (*base, i)) for i, c in enumerate(counts)]


def extra_in_part(records: int, quota: PartQuota) -> np.ndarray:
    """Sorted indices (within the part) of the records its quota adds once more."""
    if not quota.extra:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(list(quota.seed))
    return np.sort(rng.choice(records, size=quota.extra, replace=False))
