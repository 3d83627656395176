"""Held-out loss: the token-mean NLL (and its exp, the perplexity) of a model over a `process-data` MindRecord
directory, forward only, in one compiled graph. The trainer calls it at `eval_step_interval` (do_eval) and
`telechat-ms eval --tasks perplexity` calls it on a model directory, so both report the same number.

    heldout_loss(model, "data/eval", batch_size=8)  ->  {"loss": 2.31, "perplexity": 10.07, "tokens": 51234, ...}

Rows are read and padded exactly as the trainer's loader reads them (`BatchLoader.read`), in record order. A batch
holds batch_size rows per data-parallel rank; the last one is completed with copies of a real row whose labels are
all ignored, so every record counts once, no target counts twice, and the graph keeps one static shape. Under data
parallel, rank r takes rows r*batch_size.. of every global batch and the NLL sum and target count are summed over
the ranks (one AllReduce): the loss is the global token mean, the same for any number of ranks.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from telechat_ms.errors import DataError
from telechat_ms.io import atomic_output_dir, atomic_write_text
from telechat_ms.positions import BATCHED, SHARED, VARLEN, training_inputs
from telechat_ms.special_tokens import IGNORE_INDEX


_CELL_CLASS: list = []   # one class per process (built on first use: MindSpore is imported lazily)


def _nll_cell(model):
    """The compiled forward: (sum of the shifted target NLL, number of targets) of one batch, in float32."""
    if not _CELL_CLASS:
        _CELL_CLASS.append(_define_cell())
    return _CELL_CLASS[0](model)


def _define_cell():
    import mindspore as ms
    from mindspore import nn

    class NllSum(nn.Cell):
        def __init__(self, net):
            super().__init__(auto_prefix=False)
            self.net = net

        @ms.jit
        def construct(self, input_ids, labels, cos, sin, attn_mask):
            hidden = self.net.model(input_ids, cos, sin, attn_mask)
            logits = self.net.cast(self.net.lm_head(hidden), ms.float32)
            return self.net.loss_terms(logits, labels)

    return NllSum


class _Positions:
    """Rotary tables and masks of a batch in the layout the trainer feeds for the same data (telechat_ms.positions):
    shared causal tables for one sample per row; per-row tables and masks (or, under flash attention, the samples'
    boundaries) for packed rows. Shared tables are built once per shape."""

    def __init__(self, cfg, has_position_ids: bool, max_segments: int | None):
        self.cfg, self.max_segments = cfg, max_segments
        self.layout = SHARED if not has_position_ids else (VARLEN if cfg.use_flash_attention else BATCHED)
        self.cache: dict[tuple, tuple] = {}

    def __call__(self, batch: dict[str, np.ndarray]):
        import mindspore as ms
        rows, seq = batch["input_ids"].shape
        pos = batch.get("position_ids")
        if pos is None and (rows, seq) in self.cache:
            return self.cache[(rows, seq)]
        out = tuple(ms.Tensor(x) for x in training_inputs(self.cfg, seq, rows, pos, self.layout, self.max_segments))
        if pos is None:
            self.cache[(rows, seq)] = out
        return out


class _AllReduceSum:
    """Sum of a float vector over the data-parallel ranks (CPU AllReduce takes floats only)."""

    def __init__(self):
        from mindspore import nn
        from mindspore.ops import operations as P

        class Reduce(nn.Cell):
            def __init__(self):
                super().__init__()
                self.op = P.AllReduce()

            def construct(self, x):
                return self.op(x)

        self.cell = Reduce()

    def __call__(self, values: np.ndarray) -> np.ndarray:
        from mindspore import Tensor
        return self.cell(Tensor(values.astype(np.float32))).asnumpy().astype(np.float64)


class HeldoutEvaluator:
    """heldout_loss with its state kept between calls: the data, the compiled forward and the position tables are
    built once, so the trainer's evaluations at every interval reuse them."""

    def __init__(self, model, dataset_dir: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 positions=None):
        from telechat_ms.train.loader import BatchLoader
        if batch_size < 1:
            raise DataError(f"{dataset_dir}: eval batch size must be >= 1, got {batch_size}")
        self.reader = BatchLoader(dataset_dir, 1, shuffle=False)   # reads rows exactly as the trainer does
        self.dataset_dir = dataset_dir
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.global_batch = batch_size * world_size
        self.steps_per_pass = math.ceil(self.reader.num_records / self.global_batch)
        self.model = model
        self.cell = _nll_cell(model)
        self.positions = positions or _Positions(model.config, "position_ids" in self.reader.column_names,
                                                 self.reader.max_segments)
        self.reduce = _AllReduceSum() if world_size > 1 else None

    @property
    def seq_length(self) -> int:
        return self.reader.seq_length

    def _batch(self, step: int) -> dict[str, np.ndarray]:
        """This rank's rows of global batch `step`; rows past the end are copies of a real row, labels ignored."""
        start = step * self.global_batch + self.rank * self.batch_size
        want = np.arange(start, start + self.batch_size)
        real = want[want < self.reader.num_records]
        if len(real) == len(want):
            return self.reader.read(real)
        fill = real[:1] if len(real) else np.array([0])           # a rank whose rows are all past the end
        rows = self.reader.read(np.concatenate([real, np.repeat(fill, len(want) - len(real))]))
        rows["labels"][len(real):] = IGNORE_INDEX
        return rows

    def steps(self, max_steps: int | None = None) -> int:
        """Global batches an evaluation reads: all of them, or the first max_steps (None or <= 0: all)."""
        return self.steps_per_pass if max_steps is None or max_steps <= 0 else min(max_steps, self.steps_per_pass)

    def local_sums(self, max_steps: int | None = None) -> tuple[float, float]:
        """(NLL sum, target count) of this rank's rows of the evaluated batches, before any reduction."""
        from mindspore import Tensor
        nll, count = 0.0, 0.0
        training = self.model.training
        self.cell.set_train(False)  # no dropout in the held-out forward; the training graphs keep theirs
        try:
            for step in range(self.steps(max_steps)):
                batch = self._batch(step)
                cos, sin, mask = self.positions(batch)
                s, n = self.cell(Tensor(batch["input_ids"]), Tensor(batch["labels"]), cos, sin, mask)
                nll += float(s.asnumpy())
                count += float(n.asnumpy())
        finally:
            self.model.set_train(training)
        return nll, count

    def __call__(self, max_steps: int | None = None) -> dict:
        """{loss, perplexity, tokens, rows, steps}: the token-mean NLL over the first max_steps global batches
        (None or <= 0: the whole directory), summed over the data-parallel ranks."""
        steps = self.steps(max_steps)
        nll, count = self.local_sums(max_steps)
        if self.reduce is not None:  # the count as (high, low) 12-bit halves: exact in float32 up to 2^36
            whole = int(count)
            nll, high, low = self.reduce(np.array([nll, whole >> 12, whole & 4095]))
            count = float(int(high) * 4096 + int(low))
        if count == 0:
            raise DataError(f"{self.dataset_dir}: no supervised tokens in the {steps} evaluated batches")
        loss = nll / count
        rows = min(steps * self.global_batch, self.reader.num_records)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count), "rows": rows,
                "steps": steps}


def heldout_loss(model, dataset_dir: str, batch_size: int, max_steps: int | None = None, *, rank: int = 0,
                 world_size: int = 1) -> dict:
    """Token-mean NLL of `model` over a process-data MindRecord directory: {loss, perplexity, tokens, rows, steps}.

    Forward only, compiled; max_steps limits the global batches read (None: all of them). Under data parallel pass
    this process's rank and the world size: the result is the global mean, the same on every rank.
    """
    return HeldoutEvaluator(model, dataset_dir, batch_size, rank=rank, world_size=world_size)(max_steps)


BEST_DIR = "best"
BEST_STATE = "eval_state.json"


class TrainingEval:
    """do_eval inside the training loop (MindFormers' EvalCallBack schedule): evaluate after optimizer step s when
    s % eval_step_interval == 0 or when s ends an epoch whose number is a multiple of eval_epoch_interval; keep the
    model with the lowest eval loss in checkpoints/best/ (written atomically; keep_checkpoint_max never removes it).
    Its state (the best loss and step) travels in the training checkpoints, so a resumed run continues the schedule
    and the best value exactly."""

    def __init__(self, job, model, batches_per_epoch: int, rank: int, world_size: int, best_root: str,
                 save_model, is_main: bool, positions=None):
        ds = job.eval_dataset
        self.step_interval, self.epoch_interval = job.eval_step_interval, job.eval_epoch_interval
        self.max_steps = job.eval_max_steps if job.eval_max_steps > 0 else None
        self.batches_per_epoch = max(batches_per_epoch, 1)
        self.evaluator = HeldoutEvaluator(model, ds.data_dir, ds.batch_size or job.runner_config.batch_size,
                                          rank=rank, world_size=world_size, positions=positions)
        self.best_dir = os.path.join(best_root, BEST_DIR)
        self.save_model, self.is_main = save_model, is_main
        self.best_loss: float | None = None
        self.best_step = 0

    def due(self, step: int) -> bool:
        """Whether to evaluate after optimizer step `step` (1-based)."""
        if self.step_interval > 0 and step % self.step_interval == 0:
            return True
        if self.epoch_interval > 0 and step % self.batches_per_epoch == 0:
            return (step // self.batches_per_epoch) % self.epoch_interval == 0
        return False

    def __call__(self, step: int) -> dict:
        """Evaluate now; save checkpoints/best/ when the loss improved. Returns the metrics record's eval fields."""
        t0 = time.perf_counter()
        result = self.evaluator(self.max_steps)
        improved = self.best_loss is None or result["loss"] < self.best_loss
        if improved:
            self.best_loss, self.best_step = result["loss"], step
            if self.is_main:
                self._save_best(step, result)
        return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"],
                "eval_tokens": result["tokens"], "eval_best_loss": self.best_loss, "eval_best_step": self.best_step,
                "eval_s": time.perf_counter() - t0}

    def _save_best(self, step: int, result: dict) -> None:
        with atomic_output_dir(self.best_dir, overwrite=True) as tmp:
            self.save_model(tmp)
            atomic_write_text(os.path.join(tmp, BEST_STATE), json.dumps({"step": step, **result}, indent=2) + "\n")

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.best_loss, self.best_step = state.get("best_loss"), int(state.get("best_step", 0))
