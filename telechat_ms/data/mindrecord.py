"""MindRecord shards: the compact-row writer process-data's workers use and the readers (MindSpore imported lazily).

Rows are compact: variable-length int32 columns (shape [-1]) hold only the real tokens, so the bytes written per
token are those of the columns (8 for input_ids + labels, 12 with position_ids); readers pad to the manifest's
max_seq_len. FileWriter drops rows that do not match the schema with only a warning, so every file's row count is
checked after commit.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import numpy as np

from telechat_ms.data.pack import PackedRow, pad_row
from telechat_ms.errors import DataError
from telechat_ms.io import read_json_object

SCHEMA_DESC = "telechat_ms"
MANIFEST = "manifest.json"
_WRITE_BATCH = 256


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def columns_for(with_positions: bool) -> list[str]:
    """Column names of process-data rows."""
    return ["input_ids", "labels"] + (["position_ids"] if with_positions else [])


def shard_sizes(max_seq_len: int, with_positions: bool, file_bytes: int) -> tuple[int, int]:
    """Page and header sizes for files of at most about `file_bytes`. MindDataset reads a set of files only if they
    all share them, so a job uses one pair; MindRecord pads the header and the last page to their full size, and
    its 32 MB page / 16 MB header defaults would dwarf small files. A page holds a few of the longest rows, up to
    1 MB, but is never much bigger than a file."""
    n_columns = len(columns_for(with_positions))
    max_row = max_seq_len * 4 * n_columns + 1024
    page = max(_pow2_at_least(max_row), min(max(_pow2_at_least(4 * max_row), 1 << 20), _pow2_at_least(file_bytes)))
    page = min(max(page, 1 << 15), 1 << 28)
    pages = file_bytes // page + 8
    header = min(max(_pow2_at_least(pages * 512 + (32 << 10)), 1 << 14), 1 << 27)
    return page, header


class ShardWriter:
    """Writes compact rows into `{prefix}_{k:03d}.mindrecord` files of at most records_per_shard rows each, with the
    job's page and header sizes (`shard_sizes`)."""

    def __init__(self, directory: str, prefix: str, with_positions: bool, records_per_shard: int,
                 sizes: tuple[int, int]):
        from mindspore.mindrecord import FileWriter  # slow import, only in the processes that write
        self._file_writer = FileWriter
        self.directory, self.prefix = directory, prefix
        self.columns = columns_for(with_positions)
        self.schema = {name: {"type": "int32", "shape": [-1]} for name in self.columns}
        self.page, self.header = sizes
        self.records_per_shard = records_per_shard
        self.shards: list[dict[str, Any]] = []
        self._writer = None
        self._batch: list[dict[str, np.ndarray]] = []

    def _flush(self) -> None:
        if self._batch:
            self._writer.write_raw_data(self._batch)  # parallel_writer stays off: it busy-polls a core
            self._batch = []

    def _commit(self) -> None:
        from mindspore.mindrecord import FileReader
        self._flush()
        self._writer.commit()
        self._writer = None
        shard = self.shards[-1]
        path = os.path.join(self.directory, shard["name"])
        reader = FileReader(path, num_consumer=1)
        try:
            stored = reader.len()
        finally:
            reader.close()
        if stored != shard["records"]:
            raise DataError(f"{path}: MindRecord kept {stored} of {shard['records']} rows (rows not matching the "
                            f"schema are dropped)")
        shard["bytes"] = os.path.getsize(path) + os.path.getsize(path + ".db")

    def write(self, row: PackedRow) -> None:
        """Append one row (a new file is started every records_per_shard rows)."""
        if self._writer is None or self.shards[-1]["records"] == self.records_per_shard:
            if self._writer is not None:
                self._commit()
            name = f"{self.prefix}_{len(self.shards):03d}.mindrecord"
            self._writer = self._file_writer(os.path.join(self.directory, name), shard_num=1, overwrite=False)
            self._writer.set_page_size(self.page)
            self._writer.set_header_size(self.header)
            self._writer.add_schema(self.schema, SCHEMA_DESC)
            self.shards.append({"name": name, "records": 0})
        record = {"input_ids": row.input_ids.astype(np.int32, copy=False),
                  "labels": row.labels.astype(np.int32, copy=False)}
        if "position_ids" in self.columns:
            record["position_ids"] = row.position_ids.astype(np.int32, copy=False)
        self._batch.append(record)
        self.shards[-1]["records"] += 1
        if len(self._batch) >= _WRITE_BATCH:
            self._flush()

    def close(self) -> list[dict[str, Any]]:
        """Commit the open file; returns [{name, records, bytes}] per file written."""
        if self._writer is not None:
            self._commit()
        return self.shards


def read_manifest(directory: str) -> dict:
    """The manifest of a process-data output ({} for a directory of bare shards)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return {}
    return read_json_object(path, DataError)


def list_shards(directory: str) -> list[str]:
    """The shard files of a process-data output directory, in the manifest's order (else sorted by name)."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: not a directory of MindRecord shards")
    manifest = read_manifest(directory)
    if manifest.get("shards"):
        files = [os.path.join(directory, s["name"]) for s in manifest["shards"]]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise DataError(f"{missing[0]}: listed in {MANIFEST} but missing ({len(missing)} files missing)")
        return files
    files = sorted(glob.glob(os.path.join(directory, "*.mindrecord")))
    if not files:
        raise DataError(f"{directory}: no *.mindrecord files (run `telechat-ms process-data` first)")
    return files


def row_layout(directory: str) -> tuple[int | None, str]:
    """(max_seq_len to pad compact rows to, pad side) from the manifest; (None, 'right') without one."""
    manifest = read_manifest(directory)
    length = manifest.get("max_seq_len")
    side = manifest.get("options", {}).get("pad_side", "right")
    return (int(length) if length else None), side


def iter_mindrecord(directory: str) -> Iterator[dict[str, np.ndarray]]:
    """Rows of every shard in written order, as dicts of numpy arrays (compact: real tokens only)."""
    from mindspore.mindrecord import FileReader

    for path in list_shards(directory):
        reader = FileReader(path, num_consumer=1)
        try:
            for row in reader.get_next():
                yield row
        finally:
            reader.close()


def read_mindrecord(directory: str, pad: bool = True) -> dict[str, np.ndarray]:
    """All rows stacked per column: {"input_ids": int32[n, L], "labels": int32[n, L], ...}, padded to the
    manifest's max_seq_len as the trainer's loader pads them (pad=False: a list of compact rows per column)."""
    rows = list(iter_mindrecord(directory))
    if not rows:
        return {}
    if not pad:
        return {key: [np.asarray(r[key]) for r in rows] for key in rows[0]}
    length, side = row_layout(directory)
    length = length or max(int(np.asarray(r["input_ids"]).shape[0]) for r in rows)
    out: dict[str, list[np.ndarray]] = {key: [] for key in rows[0]}
    for r in rows:
        ids, labels, pos = pad_row(np.asarray(r["input_ids"]), np.asarray(r["labels"]),
                                   np.asarray(r["position_ids"]) if "position_ids" in r else None, length, side)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        if pos is not None:
            out["position_ids"].append(pos)
    return {key: np.stack(col) for key, col in out.items()}
