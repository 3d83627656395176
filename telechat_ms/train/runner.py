"""How one optimizer step runs, per parallel mode, behind one interface the training loop calls.

- `AccumulatingRunner` (stand_alone and data_parallel, CPU or Ascend): the step cells of step.py; loss = token
  mean over the global batch, gradients summed over micro batches and workers, clipped on the host's factor.
- `SemiAutoRunner` (semi_auto_parallel, Ascend only): the model sharded by telechat_ms.parallel and trained by
  MindFormers' one-step cell or its pipeline cell (micro batches inside the graph); full_batch input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from telechat_ms.job_config import ModelSection, ParallelConfig, ParallelContext, RecomputeConfig, RunnerWrapper


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    finite: bool


class AccumulatingRunner:
    """Micro-batch gradient accumulation + data-parallel reduction + clipping + AdamW, as three graphs."""

    def __init__(self, model, trainable, optimizer, world_size: int, wrapper: RunnerWrapper, jit_config=None):
        from telechat_ms.train.step import (AccumulateStep, AllReduceSum, ApplyGrads, FinalizeGrads,
                                            GradAndFinalize, LossAndGrads, LossSum, ZeroGrads, make_buffers)
        accu = make_buffers(trainable)
        loss_and_grads = LossAndGrads(LossSum(model), trainable)
        self.accumulate = AccumulateStep(loss_and_grads, accu)
        self.single = GradAndFinalize(loss_and_grads, accu, world_size)
        self.finalize = FinalizeGrads(accu, world_size)
        self.apply = ApplyGrads(optimizer, accu)
        self.zero = ZeroGrads(accu)
        self.all_reduce = AllReduceSum() if world_size > 1 else None
        self.wrapper = wrapper
        self.after_micro = None  # called after each micro batch's forward/backward (MoE router statistics)
        if jit_config is not None:  # context.jit_level on Ascend
            for cell in (self.accumulate, self.single, self.finalize, self.apply, self.zero):
                cell.set_jit_config(jit_config)

    def run(self, micro: list[dict], tokens: int, positions, loss_scale: float) -> StepOutcome:
        from mindspore import Tensor
        scale = Tensor(np.float32(loss_scale))
        if self.all_reduce is not None:  # every rank's supervised targets: the loss is a global token mean
            # CPU AllReduce takes floats only: sum (high, low) 12-bit halves so the count stays exact to 2^36
            high, low = self.all_reduce(Tensor(np.array([tokens >> 12, tokens & 4095], dtype=np.float32))).asnumpy()
            tokens = int(high) * 4096 + int(low)
        tokens = max(tokens, 1)
        if len(micro) == 1:  # no accumulation: gradients, reduction, scaling and norm in one graph
            batch = micro[0]
            cos, sin, mask = positions(batch)
            loss_t, norm_t = self.single(Tensor(batch["input_ids"]), Tensor(batch["labels"]), cos, sin, mask, scale,
                                         Tensor(np.float32(1.0 / (tokens * loss_scale))))
            if self.after_micro is not None:
                self.after_micro()
            return self._apply(float(loss_t.asnumpy()) / loss_scale / tokens, float(norm_t.asnumpy()))
        loss_sum = 0.0
        for batch in micro:
            cos, sin, mask = positions(batch)
            out = self.accumulate(Tensor(batch["input_ids"]), Tensor(batch["labels"]), cos, sin, mask, scale)
            loss_sum += float(out.asnumpy())
            if self.after_micro is not None:
                self.after_micro()
        if self.all_reduce is not None:
            loss_sum = float(self.all_reduce(Tensor(np.float32(loss_sum))).asnumpy())
        loss = loss_sum / loss_scale / tokens
        norm = float(self.finalize(Tensor(np.float32(1.0 / (tokens * loss_scale)))).asnumpy())
        return self._apply(loss, norm)

    def _apply(self, loss: float, norm: float) -> StepOutcome:
        """Clip and apply the finalized gradients, or drop them when the step overflowed."""
        from mindspore import Tensor
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.zero()  # nothing is applied: weights and optimizer state stay as they were
            return StepOutcome(loss, norm, False)
        clip = min(1.0, self.wrapper.max_grad_norm / (norm + 1e-6)) if self.wrapper.use_clip_grad else 1.0
        self.apply(Tensor(np.float32(clip)))
        return StepOutcome(loss, norm, True)


class SemiAutoRunner:
    """Ascend semi_auto_parallel: strategies from telechat_ms.parallel, MindFormers' step cells.

    Not runnable on CPU (MindSpore refuses semi_auto_parallel there): no CPU test exercises this class.
    """

    def __init__(self, model, optimizer, pc: ParallelConfig, rc: RecomputeConfig, par: ParallelContext,
                 section: ModelSection, wrapper: RunnerWrapper, seq_length: int, batched_inputs: bool,
                 jit_config=None, source: str = ""):
        from telechat_ms.parallel.ascend import wrap_train_step
        from telechat_ms.parallel.parallelize import parallelize
        parallelize(model, pc, rc, par, section, seq_length, batched_inputs=batched_inputs, source=source)
        self.step = wrap_train_step(model, optimizer, pc, wrapper)  # model(ids, labels, cos, sin, mask) -> loss
        if jit_config is not None:
            self.step.set_jit_config(jit_config)

    def run(self, micro: list[dict], tokens: int, positions, loss_scale: float) -> StepOutcome:
        from mindspore import Tensor
        losses, finite = [], True
        for batch in micro:  # full_batch: every rank feeds the same global batch; the compiler splits it
            cos, sin, mask = positions(batch)
            out = self.step(Tensor(batch["input_ids"]), Tensor(batch["labels"]), cos, sin, mask)
            loss, overflow = (out[0], out[1]) if isinstance(out, tuple) else (out, False)
            losses.append(float(loss.asnumpy()))
            finite = finite and not bool(np.asarray(overflow.asnumpy() if hasattr(overflow, "asnumpy") else overflow))
        return StepOutcome(float(np.mean(losses)), float("nan"), finite and all(map(math.isfinite, losses)))
