"""A deterministic, exactly resumable batch loader over `process-data` MindRecord output.

Epoch e visits the records in the permutation of default_rng(seed + e); a global batch is
batch_size x world_size x accumulation rows, and data-parallel rank r takes its contiguous slice of it, so any
number of workers sees the same global batches. The position (epoch, batch index) is saved in checkpoints.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from telechat_ms.errors import DataError


@dataclass
class LoaderState:
    epoch: int = 0
    batch: int = 0          # global batches already consumed in this epoch


class BatchLoader:
    """Yields dicts of int32 arrays [micro_batch, S] for one rank, micro step by micro step."""

    def __init__(self, data_dir: str, batch_size: int, accumulation: int = 1, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        from telechat_ms.data.mindrecord import list_shards, read_mindrecord
        if not os.path.isdir(data_dir) or not list_shards(data_dir):
            raise DataError(f"{data_dir}: no MindRecord shards found (run `telechat-ms process-data` first)")
        self.columns = read_mindrecord(data_dir)
        if "input_ids" not in self.columns or "labels" not in self.columns:
            raise DataError(f"{data_dir}: shards lack the input_ids/labels columns")
        manifest = os.path.join(data_dir, "manifest.json")
        self.manifest = json.load(open(manifest, encoding="utf-8")) if os.path.isfile(manifest) else {}
        self.num_records, self.seq_length = self.columns["input_ids"].shape
        self.micro = batch_size
        self.accumulation = accumulation
        self.rank, self.world = rank, world_size
        self.global_batch = batch_size * accumulation * world_size
        if self.num_records < self.global_batch:
            raise DataError(f"{data_dir}: {self.num_records} sequences are fewer than one global batch "
                            f"({batch_size} x {accumulation} accumulation x {world_size} workers)")
        self.seed, self.shuffle = seed, shuffle
        self.state = LoaderState()

    @property
    def batches_per_epoch(self) -> int:
        return self.num_records // self.global_batch  # the remainder is dropped, the same way every epoch

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_records)
        return np.random.default_rng(self.seed + epoch).permutation(self.num_records)

    def next_global_batch(self) -> tuple[list[dict[str, np.ndarray]], int]:
        """This rank's micro batches of the next global batch (length = accumulation), and the number of
        supervised targets in the whole global batch (every rank's rows), which normalises the loss."""
        if self.state.batch >= self.batches_per_epoch:
            self.state = LoaderState(epoch=self.state.epoch + 1, batch=0)
        order = self._order(self.state.epoch)
        start = self.state.batch * self.global_batch
        rows = order[start:start + self.global_batch]
        per_rank = len(rows) // self.world
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        self.state.batch += 1
        micro = []
        for k in range(self.accumulation):
            idx = mine[k * self.micro:(k + 1) * self.micro]
            micro.append({name: col[idx].astype(np.int32) for name, col in self.columns.items()})
        labels = self.columns["labels"][rows]
        return micro, int((labels[:, 1:] != -100).sum())

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "batch": self.state.batch, "seed": self.seed,
                "num_records": self.num_records, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_records") != self.num_records or state.get("global_batch") != self.global_batch:
            raise DataError(f"cannot resume the data position: the checkpoint saw {state.get('num_records')} "
                            f"records in global batches of {state.get('global_batch')}, this run has "
                            f"{self.num_records} in batches of {self.global_batch}")
        self.state = LoaderState(epoch=int(state["epoch"]), batch=int(state["batch"]))
