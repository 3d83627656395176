"""Data-parallel eval replicas under msrun: every worker holds the whole model and scores the samples whose doc_id
% workers == its rank (runner.EvalOptions.rank / world); each task's finished records are then gathered over the
workers' communication (AllGather, so no shared filesystem is needed), and rank 0 aggregates them in doc order and
writes the one report a single process writes."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from telechat_ms.errors import ConfigError


def init_replicas() -> tuple[int, int]:
    """(rank, world) after initialising MindSpore communication (call it after the device is set)."""
    if not (os.environ.get("MS_ROLE") or os.environ.get("RANK_TABLE_FILE")):     # msrun / a rank-table launch
        raise ConfigError("--data-parallel runs under msrun, one replica per worker: "
                          "run_scripts/msrun_eval.sh WORKERS MODEL_DIR --tasks ... (without it, drop the flag)")
    from mindspore.communication import get_group_size, get_rank, init
    init()
    return get_rank(), get_group_size()


def _all_gather(x: np.ndarray) -> np.ndarray:
    import mindspore as ms
    from mindspore import ops
    return ops.AllGather()(ms.Tensor(x)).asnumpy()


def gather_records(records: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Every worker's records, on every worker: JSON bytes packed into int32 words (the collectives' dtype on every
    backend), lengths first, then one AllGather of the words padded to the longest."""
    data = json.dumps(records, ensure_ascii=False, default=str).encode("utf-8")
    lengths = _all_gather(np.array([len(data)], np.int32)).reshape(world)
    words = -(-int(lengths.max()) // 4)
    buf = np.zeros(words * 4, np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    gathered = _all_gather(buf.view(np.int32)).reshape(world, words)
    out: list[dict[str, Any]] = []
    for r in range(world):
        out += json.loads(gathered[r].view(np.uint8)[:int(lengths[r])].tobytes().decode("utf-8"))
    return out
