"""The pre-pass of process-data: inputs cut into parts (line-aligned byte ranges of a target size) and counted.

Parts depend only on the input bytes and the options (part size, records per file), never on the number of
workers or nodes, so every part's output is the same wherever it is processed. A part knows its file, its byte
range, the line number of its first line and how many records (non-blank lines) it holds; that is all the mix
selection needs, so no record is parsed before the workers do it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

from telechat_ms.data.mix import MixEntry, PartQuota, part_quotas

DEFAULT_PART_MB = 32.0


@dataclass(frozen=True)
class Part:
    """One unit of work: records of file `file` in bytes [start, end), first line `first_line` (1-based)."""

    id: int
    file: int
    start: int
    end: int
    first_line: int
    first_record: int   # index, within the file, of the part's first record
    records: int        # non-blank lines in the range


@dataclass(frozen=True)
class Plan:
    """Parts of every input file with their mix quotas, and the fingerprint nodes and resumed runs compare."""

    parts: list[Part]
    quotas: list[PartQuota]
    records_per_file: list[int]
    fingerprint: str


def _file_parts(path: str, file_idx: int, first_id: int, part_bytes: int,
                limit: int | None) -> tuple[list[Part], int]:
    """Cut one file at line ends once a part reaches part_bytes; stop after `limit` records."""
    parts: list[Part] = []
    offset = records = line_no = 0
    start, first_line, first_record = 0, 1, 0

    def emit(end: int) -> None:
        if records > first_record:
            parts.append(Part(first_id + len(parts), file_idx, start, end, first_line, first_record,
                              records - first_record))

    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                if limit is not None and records >= limit:
                    break
                records += 1
            line_no += 1
            offset += len(raw)
            if offset - start >= part_bytes:
                emit(offset)
                start, first_line, first_record = offset, line_no + 1, records
    emit(offset)
    return parts, records


def iter_lines(path: str, part: Part) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of the part's non-blank lines, reading only its byte range."""
    with open(path, "rb") as fh:
        fh.seek(part.start)
        data = fh.read(part.end - part.start)
    for i, raw in enumerate(data.split(b"\n")):
        if raw.strip():
            yield part.first_line + i, raw


def _input_identity(path: str) -> dict:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def plan_parts(mix: Sequence[MixEntry], part_mb: float, limit: int | None, seed: int,
               settings: dict) -> Plan:
    """The pre-pass: parts of every file of the mix and each part's share of the mix weights.

    `settings` (every option that changes the output bytes) goes into the fingerprint with the parts and the
    inputs' sizes and modification times, so a resumed run or another node refuses a different job.
    """
    part_bytes = max(1, int(part_mb * (1 << 20)))
    parts: list[Part] = []
    quotas: list[PartQuota] = []
    per_file: list[int] = []
    for file_idx, entry in enumerate(mix):
        file_parts, n = _file_parts(entry.path, file_idx, len(parts), part_bytes, limit)
        parts.extend(file_parts)
        per_file.append(n)
        quotas.extend(part_quotas([p.records for p in file_parts], entry.weight, seed, entry.key))
    ident = {"settings": settings, "seed": seed, "part_bytes": part_bytes,
             "inputs": [_input_identity(e.path) for e in mix],
             "mix": [[e.key, e.weight] for e in mix], "parts": [asdict(p) for p in parts],
             "quotas": [[q.whole, q.extra] for q in quotas]}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return Plan(parts, quotas, per_file, digest)
