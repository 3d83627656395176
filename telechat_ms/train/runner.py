"""How one optimizer step runs, per parallel mode, behind one interface the training loop calls.

- `AccumulatingRunner` (stand_alone and data_parallel, CPU or Ascend): the step graphs of step.py; loss = token
  mean over the global batch, gradients summed over micro batches and workers, clipped in the graph; one graph
  per optimizer step without accumulation, no host round trip inside a step.
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
    loss_scale: float = 1.0   # the loss scale after this step (dynamic: lowered on overflow)


class PendingStep:
    """A launched step whose [loss, norm, finite, loss scale] stay on the device until `outcome()` reads them
    (the trainer reads them after launching the next step, so logging never stalls the device)."""

    def __init__(self, out=None, resolved: StepOutcome | None = None):
        self._out, self._resolved = out, resolved

    def outcome(self) -> StepOutcome:
        if self._resolved is None:
            loss, norm, finite, scale = (float(x) for x in self._out.asnumpy())
            ok = finite > 0.5 and math.isfinite(loss) and math.isfinite(norm)
            self._resolved = StepOutcome(loss, norm, ok, scale)
            self._out = None
        return self._resolved


class AccumulatingRunner:
    """stand_alone / data_parallel: one graph per optimizer step (step.FusedStep) without accumulation; with it,
    one graph per micro batch adding into fp32 buffers (created only then) and one finishing graph."""

    def __init__(self, model, trainable, optimizer, world_size: int, wrapper: RunnerWrapper, jit_config=None,
                 accumulation: int = 1):
        from telechat_ms.train.step import Finish, FusedStep, LossScale, LossSum
        self.trainable, self.jit_config = list(trainable), jit_config
        self.loss_scale = LossScale(wrapper.loss_scale, wrapper.loss_scale_value, wrapper.scale_factor,
                                    wrapper.scale_window)
        self.loss_sum = LossSum(model)
        self.finish = Finish(optimizer, self.trainable, world_size, wrapper, self.loss_scale)
        self.fused = FusedStep(self.loss_sum, self.trainable, self.finish)
        self.buffers = None                     # (grads, loss) accumulation buffers, only when accumulating
        self.after_micro = None  # called after each micro batch's launch (MoE router statistics; reads the device)
        self.accumulate = self.finish_buffers = None
        self._configure(self.fused)
        if accumulation > 1:
            self._make_accumulation()

    def _configure(self, cell) -> None:
        if self.jit_config is not None:  # context.jit_level on Ascend
            cell.set_jit_config(self.jit_config)

    def _make_accumulation(self) -> None:
        from telechat_ms.train.step import AccumulateStep, FinishFromBuffers, LossAndGrads, make_buffers
        accu, loss_accu = make_buffers(self.trainable)
        self.buffers = (accu, loss_accu)
        self.accumulate = AccumulateStep(LossAndGrads(self.loss_sum, self.trainable), accu, loss_accu,
                                         self.loss_scale)
        self.finish_buffers = FinishFromBuffers(accu, loss_accu, self.finish)
        self._configure(self.accumulate)
        self._configure(self.finish_buffers)

    def run(self, micro: list[dict], tokens: int, positions, lr: float) -> PendingStep:
        """Launch one optimizer step over `micro` (this rank's micro batches, `tokens` supervised targets in
        them; the graph sums the counts over workers); nothing is read back to the host."""
        from mindspore import Tensor
        from telechat_ms.train.step import token_count_tensor
        count, lr_t = token_count_tensor(tokens), Tensor(np.float32(lr))
        if len(micro) == 1:
            batch = micro[0]
            cos, sin, mask = positions(batch)
            pending = PendingStep(self.fused(Tensor(batch["input_ids"]), Tensor(batch["labels"]), cos, sin, mask,
                                             count, lr_t))
            if self.after_micro is not None:
                self.after_micro()
            return pending
        if self.accumulate is None:
            self._make_accumulation()
        for batch in micro:
            cos, sin, mask = positions(batch)
            self.accumulate(Tensor(batch["input_ids"]), Tensor(batch["labels"]), cos, sin, mask)
            if self.after_micro is not None:
                self.after_micro()
        return PendingStep(self.finish_buffers(count, lr_t))

    def loss_scale_state(self) -> tuple[float, int]:
        """(loss scale, finite steps counted toward the next growth), read from the device (for checkpoints)."""
        return float(self.loss_scale.scale.asnumpy()), int(self.loss_scale.good_steps.asnumpy())

    def set_loss_scale_state(self, scale: float, good_steps: int) -> None:
        from mindspore import Tensor
        self.loss_scale.scale.set_data(Tensor(np.float32(scale)))
        self.loss_scale.good_steps.set_data(Tensor(np.float32(good_steps)))


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
        self.scale = wrapper.loss_scale_value if wrapper.loss_scale != "none" else 1.0
        if jit_config is not None:
            self.step.set_jit_config(jit_config)

    def run(self, micro: list[dict], tokens: int, positions, lr: float) -> PendingStep:
        """One step of MindFormers' cells (the rate is the optimizer's learning_rate the trainer set)."""
        from mindspore import Tensor
        losses, finite = [], True
        for batch in micro:  # full_batch: every rank feeds the same global batch; the compiler splits it
            cos, sin, mask = positions(batch)
            out = self.step(Tensor(batch["input_ids"]), Tensor(batch["labels"]), cos, sin, mask)
            loss, overflow = (out[0], out[1]) if isinstance(out, tuple) else (out, False)
            losses.append(float(loss.asnumpy()))
            finite = finite and not bool(np.asarray(overflow.asnumpy() if hasattr(overflow, "asnumpy") else overflow))
        return PendingStep(resolved=StepOutcome(float(np.mean(losses)), float("nan"),
                                                finite and all(map(math.isfinite, losses)), self.scale))

    def loss_scale_state(self) -> tuple[float, int]:
        return self.scale, 0

    def set_loss_scale_state(self, scale: float, good_steps: int) -> None:
        self.scale = scale
