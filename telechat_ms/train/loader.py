"""A deterministic, exactly resumable batch loader over `process-data` MindRecord output.

Epoch e visits the records in the permutation of default_rng(seed + e); a global batch is
batch_size x world_size x accumulation rows, and data-parallel rank r takes its contiguous slice of it, so any
number of workers sees the same global batches. The records left over after the last full global batch are
dropped (drop_remainder, the default) or make one more batch completed with the epoch's first records, so that no
record is skipped and every batch keeps its static shape. The position (epoch, batch index) is saved in
checkpoints.
Rows are read on demand from the shards (MindDataset with a SubsetSampler of this rank's rows), so memory does
not grow with the dataset; each rank reads only its own rows. process-data writes compact rows (real tokens only):
they are padded here to the manifest's max_seq_len, on its pad side, as `telechat_ms.data.pack.pad_row` says.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from telechat_ms.errors import DataError
from telechat_ms.io import read_json_object
from telechat_ms.special_tokens import IGNORE_INDEX


@dataclass
class LoaderState:
    epoch: int = 0
    batch: int = 0          # global batches already consumed in this epoch


class BatchLoader:
    """Yields dicts of int32 arrays [micro_batch, S] for one rank, micro step by micro step."""

    def __init__(self, data_dir: str, batch_size: int, accumulation: int = 1, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_remainder: bool = True):
        import mindspore.dataset as ds
        from telechat_ms.data.mindrecord import list_shards, row_layout
        if not os.path.isdir(data_dir) or not list_shards(data_dir):
            raise DataError(f"{data_dir}: no MindRecord shards found (run `telechat-ms process-data` first)")
        self.files = list_shards(data_dir)
        manifest = os.path.join(data_dir, "manifest.json")
        self.manifest = read_json_object(manifest, DataError) if os.path.isfile(manifest) else {}
        first = next(ds.MindDataset(self.files, shuffle=False, num_parallel_workers=1)
                     .create_dict_iterator(num_epochs=1, output_numpy=True))
        if "input_ids" not in first or "labels" not in first:
            raise DataError(f"{data_dir}: shards lack the input_ids/labels columns")
        self.column_names = [c for c in ("input_ids", "labels", "position_ids") if c in first]
        self.num_records = ds.MindDataset(self.files, shuffle=False).get_dataset_size()
        length, self.pad_side = row_layout(data_dir)
        self.seq_length = length or int(first["input_ids"].shape[-1])  # bare fixed-length shards: their length
        # samples per row (+1 for the pads' own segment): the fixed size of flash attention's actual_seq_len
        most = self.manifest.get("counts", {}).get("max_samples_per_row")
        self.max_segments = int(most) + 1 if most else None
        self.micro = batch_size
        self.accumulation = accumulation
        self.rank, self.world = rank, world_size
        self.global_batch = batch_size * accumulation * world_size
        if self.num_records < self.global_batch:
            raise DataError(f"{data_dir}: {self.num_records} sequences are fewer than one global batch "
                            f"({batch_size} x {accumulation} accumulation x {world_size} workers)")
        self.seed, self.shuffle, self.drop_remainder = seed, shuffle, drop_remainder
        self.state = LoaderState()

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch, plus one completed batch for the remainder unless it is dropped."""
        full, rest = divmod(self.num_records, self.global_batch)
        return full + (1 if rest and not self.drop_remainder else 0)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_records)
        return np.random.default_rng(self.seed + epoch).permutation(self.num_records)

    def next_global_batch(self) -> tuple[list[dict[str, np.ndarray]], int]:
        """This rank's micro batches of the next global batch (length = accumulation), and the number of
        supervised targets in them (the runner sums it over ranks to normalise the loss)."""
        if self.state.batch >= self.batches_per_epoch:
            self.state = LoaderState(epoch=self.state.epoch + 1, batch=0)
        order = self._order(self.state.epoch)
        start = self.state.batch * self.global_batch
        rows = order[start:start + self.global_batch]
        if len(rows) < self.global_batch:  # the remainder batch (drop_remainder false): complete it from the start
            rows = np.concatenate([rows, order[:self.global_batch - len(rows)]])
        per_rank = len(rows) // self.world
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        self.state.batch += 1
        rows_of = self._read(mine)
        micro = [{name: col[k * self.micro:(k + 1) * self.micro] for name, col in rows_of.items()}
                 for k in range(self.accumulation)]
        return micro, int((rows_of["labels"][:, 1:] != IGNORE_INDEX).sum())

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The given records, in the given order, padded to seq_length: int32 arrays [len(indices), S] (the held-out
        evaluator reads its rows through this too)."""
        return self._read(indices)

    def _read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The given records, in the given order, padded to seq_length: int32 arrays [len(indices), S]."""
        import mindspore.dataset as ds
        from telechat_ms.data.pack import pad_row
        data = ds.MindDataset(self.files, columns_list=self.column_names, num_parallel_workers=1,
                              sampler=ds.SubsetSampler([int(i) for i in indices]))
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.column_names}
        for row in data.create_tuple_iterator(num_epochs=1, output_numpy=True):
            cols = dict(zip(self.column_names, row))
            if cols["input_ids"].shape[0] > self.seq_length:
                raise DataError(f"{self.files[0]}: a row of {cols['input_ids'].shape[0]} tokens is longer than "
                                f"max_seq_len {self.seq_length}")
            ids, labels, pos = pad_row(cols["input_ids"].astype(np.int32), cols["labels"].astype(np.int32),
                                       cols["position_ids"].astype(np.int32) if "position_ids" in cols else None,
                                       self.seq_length, self.pad_side)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            if pos is not None:
                out["position_ids"].append(pos)
        return {name: np.stack(col) for name, col in out.items()}

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "batch": self.state.batch, "seed": self.seed,
                "num_records": self.num_records, "global_batch": self.global_batch,
                "drop_remainder": self.drop_remainder}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_records") != self.num_records or state.get("global_batch") != self.global_batch \
                or state.get("drop_remainder", True) != self.drop_remainder:
            raise DataError(f"cannot resume the data position: the checkpoint saw {state.get('num_records')} "
                            f"records in global batches of {state.get('global_batch')} (drop_remainder "
                            f"{state.get('drop_remainder', True)}), this run has {self.num_records} in batches of "
                            f"{self.global_batch} (drop_remainder {self.drop_remainder})")
        self.state = LoaderState(epoch=int(state["epoch"]), batch=int(state["batch"]))
