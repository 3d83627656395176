"""MindRecord shards: the writer process-data uses and the readers the trainer uses (MindSpore imported lazily)."""
from __future__ import annotations

import glob
import os
from typing import Any, Iterable, Iterator

import numpy as np

from telechat_ms.data.pack import PackedRow
from telechat_ms.errors import DataError

SHARD_PATTERN = "data_{:05d}.mindrecord"
SCHEMA_DESC = "telechat_ms"
_WRITE_BATCH = 256


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _sizes(max_seq_len: int, n_columns: int, records_per_shard: int) -> tuple[int, int]:
    """Page and header sizes that fit one shard (MindRecord's 32 MB page / 16 MB header defaults waste space)."""
    row_bytes = max_seq_len * 4 * n_columns + 1024
    page = min(max(_pow2_at_least(4 * row_bytes), 1 << 20), 1 << 28)
    pages = records_per_shard * row_bytes // page + 8
    header = min(max(_pow2_at_least(pages * 512 + (64 << 10)), 1 << 16), 1 << 27)
    return page, header


def write_shards(directory: str, rows: Iterable[PackedRow], max_seq_len: int, with_positions: bool,
                 records_per_shard: int = 4096) -> list[dict[str, Any]]:
    """Write rows into data_00000.mindrecord, data_00001.mindrecord, ...; returns [{name, records}] per shard."""
    from mindspore.mindrecord import FileWriter  # slow import, only when writing

    columns = ["input_ids", "labels"] + (["position_ids"] if with_positions else [])
    schema = {name: {"type": "int32", "shape": [max_seq_len]} for name in columns}
    page, header = _sizes(max_seq_len, len(columns), records_per_shard)
    shards: list[dict[str, Any]] = []
    writer, batch = None, []

    def flush() -> None:
        if batch:
            writer.write_raw_data(batch)
            batch.clear()

    for row in rows:
        if writer is None or shards[-1]["records"] == records_per_shard:
            if writer is not None:
                flush()
                writer.commit()
            name = SHARD_PATTERN.format(len(shards))
            writer = FileWriter(os.path.join(directory, name), shard_num=1, overwrite=False)
            writer.set_page_size(page)
            writer.set_header_size(header)
            writer.add_schema(schema, SCHEMA_DESC)
            shards.append({"name": name, "records": 0})
        record = {"input_ids": row.input_ids, "labels": row.labels}
        if with_positions:
            record["position_ids"] = row.position_ids
        batch.append(record)
        shards[-1]["records"] += 1
        if len(batch) >= _WRITE_BATCH:
            flush()
    if writer is not None:
        flush()
        writer.commit()
    return shards


def list_shards(directory: str) -> list[str]:
    """The shard files of a process-data output directory, in order."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: not a directory of MindRecord shards")
    files = sorted(f for f in glob.glob(os.path.join(directory, "*.mindrecord")))
    if not files:
        raise DataError(f"{directory}: no *.mindrecord files (run `telechat-ms process-data` first)")
    return files


def iter_mindrecord(directory: str) -> Iterator[dict[str, np.ndarray]]:
    """Rows of every shard in written order, as dicts of numpy arrays."""
    from mindspore.mindrecord import FileReader

    for path in list_shards(directory):
        reader = FileReader(path)
        try:
            for row in reader.get_next():
                yield row
        finally:
            reader.close()


def read_mindrecord(directory: str) -> dict[str, np.ndarray]:
    """All rows stacked per column: {"input_ids": int32[n, L], "labels": int32[n, L], ...}."""
    rows = list(iter_mindrecord(directory))
    if not rows:
        return {}
    return {key: np.stack([np.asarray(r[key]) for r in rows]) for key in rows[0]}
