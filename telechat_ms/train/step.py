"""The compiled graphs of one optimizer step. Token-mean loss over the GLOBAL batch: gradients of sum(nll) are
summed over micro batches and workers, then divided by the global number of supervised tokens.

Without accumulation one graph (`FusedStep`) runs the whole step: forward, backward, data-parallel reduce (with
the token count), scaling by 1 / (tokens x loss scale), global norm, clipping (min(1, max_norm / (norm + 1e-6))),
the fp16 overflow check and dynamic loss-scale update, and the AdamW update. It keeps no gradient buffers and
returns [loss, norm, finite, loss scale] as one device tensor the host reads when it likes. With accumulation,
`AccumulateStep` adds each micro batch's gradients into fp32 buffers and `FinishFromBuffers` runs the same
finishing math (`Finish`) on them, then zeroes them.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P

_add_into = C.MultitypeFuncGraph("add_into")
_zero = C.MultitypeFuncGraph("zero")
_square_sum = C.MultitypeFuncGraph("square_sum")
_scale = C.MultitypeFuncGraph("scale")
_scale_or_zero = C.MultitypeFuncGraph("scale_or_zero")

CLIP_EPS = 1e-6
COUNT_BASE = 4096.0  # token counts travel as (high, low) 12-bit halves: CPU AllReduce sums floats only


@_add_into.register("Tensor", "Tensor")
def _add_into_impl(accu, grad):
    return F.assign_add(accu, F.cast(grad, F.dtype(accu)))


@_zero.register("Tensor")
def _zero_impl(accu):
    return F.assign(accu, F.zeros_like(accu))


@_square_sum.register("Tensor")
def _square_sum_impl(x):
    """sum(x * x) in two stages, the rows' sums then their sum: measured on CPU 3x faster than a [1, n] x [n, 1]
    MatMul and 5x faster than a whole-tensor ReduceSum, and exact where those drift (at 45M elements of a 7B FFN
    weight, relative error 1e-8 against 7e-3 for the MatMul and 1e-1 for L2Loss's serial sum). x * x, not Square:
    CPU's Mul kernel is the faster of the two (Finish 3.0 -> 2.2 ms of a hidden-256 step)."""
    x = F.cast(x, ms.float32)
    sq = x * x
    if len(sq.shape) > 1:
        sq = F.reduce_sum(sq, -1)
    return F.reduce_sum(sq)


@_scale.register("Tensor", "Tensor")
def _scale_impl(coef, grad):
    return F.cast(grad, ms.float32) * coef


@_scale_or_zero.register("Tensor", "Tensor", "Tensor")
def _scale_or_zero_impl(coef, finite, grad):
    scaled = F.cast(grad, ms.float32) * coef
    return ops.where(finite, scaled, ops.zeros_like(scaled))


def token_count_tensor(tokens: int) -> Tensor:
    """The host's supervised-token count as the graph input (high, low halves, exact to 2^36 when summed)."""
    return Tensor(np.array([tokens // int(COUNT_BASE), tokens % int(COUNT_BASE)], dtype=np.float32))


def unscales_first(wrapper) -> bool:
    """With a loss scale, `Finish` brings the gradients to the token mean before the norm (scaled fp16-range
    gradients' squares overflow fp32); without one the token mean goes into the clipping factor."""
    return wrapper.loss_scale != "none"


def expected_gradient_factor(wrapper, tokens: int) -> float:
    """What `Finish` multiplies a step's gradients by before clipping: 1 / tokens without a loss scale (the
    gradients are of the NLL sum), 1 with one (they were unscaled to the token mean first)."""
    return 1.0 if unscales_first(wrapper) else 1.0 / max(int(tokens), 1)


class LossSum(nn.Cell):
    """Forward returning sum(nll) * loss_scale (the count is computed on the host from the labels); an MoE model
    adds its load-balancing loss times this micro batch's targets, so the step's loss is the token mean of
    nll + aux."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, labels, cos, sin, attn_mask, loss_scale):
        if self.model.config.is_moe:  # MoE: training capacity + the load-balancing loss, weighted by the targets
            hidden, aux = self.model.model.construct_aux(input_ids, cos, sin, attn_mask)
            logits = self.model.cast(self.model.lm_head(hidden), ms.float32)
            nll_sum, count = self.model.loss_terms(logits, labels)
            return (nll_sum + aux * count) * loss_scale
        hidden = self.model.model(input_ids, cos, sin, attn_mask)
        logits = self.model.cast(self.model.lm_head(hidden), ms.float32)
        nll_sum, _ = self.model.loss_terms(logits, labels)
        return nll_sum * loss_scale


class LossAndGrads(nn.Cell):
    """(scaled NLL sum, its gradients w.r.t. the trainable parameters) for one micro batch."""

    def __init__(self, loss_sum: LossSum, params: list[Parameter]):
        super().__init__(auto_prefix=False)
        self.network = loss_sum
        self.weights = ParameterTuple(params)
        self.grad = C.GradOperation(get_by_list=True)

    def construct(self, input_ids, labels, cos, sin, attn_mask, loss_scale):
        loss = self.network(input_ids, labels, cos, sin, attn_mask, loss_scale)
        grads = self.grad(self.network, self.weights)(input_ids, labels, cos, sin, attn_mask, loss_scale)
        return loss, grads


class LossScale(nn.Cell):
    """The loss scale: a constant (none / static), or, for `dynamic`, a parameter updated in the graph.

    Dynamic: an overflowing step divides it by scale_factor (not below 1); every scale_window-th finite step
    (counted over the run, as the trainer did) multiplies it by scale_factor.
    """

    def __init__(self, mode: str, value: float, factor: float, window: int):
        super().__init__(auto_prefix=False)
        self.dynamic = mode == "dynamic"
        start = float(value) if mode != "none" else 1.0
        self.scale = Parameter(Tensor(np.float32(start)), name="loss_scale.value", requires_grad=False)
        self.good_steps = Parameter(Tensor(np.float32(0.0)), name="loss_scale.good_steps", requires_grad=False)
        self.factor = Tensor(np.float32(factor))
        self.window = Tensor(np.float32(max(int(window), 1)))
        self.one = Tensor(np.float32(1.0))

    def construct(self):
        return self.scale

    def update(self, finite):
        """The scale after a step (finite: bool tensor); returns the new scale."""
        if not self.dynamic:
            return self.scale
        good = self.good_steps + F.cast(finite, ms.float32)
        grow = ops.logical_and(finite, ops.equal(ops.floor_mod(good, self.window), 0.0))
        grown = ops.where(grow, self.scale * self.factor, self.scale)
        new = ops.where(finite, grown, ops.maximum(self.scale / self.factor, self.one))
        F.assign(self.good_steps, good)
        F.assign(self.scale, new)
        return new


class Finish(nn.Cell):
    """Reduce, normalise, measure, clip and apply one step's gradients (shared by both step layouts)."""

    def __init__(self, optimizer, params, world_size: int, wrapper, loss_scale: LossScale):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.loss_scale = loss_scale
        self.hyper_map = C.HyperMap()
        self.reducer = nn.DistributedGradReducer(ParameterTuple(params), mean=False, degree=world_size) \
            if world_size > 1 else None
        self.all_reduce = P.AllReduce() if world_size > 1 else None
        self.clip = bool(wrapper.use_clip_grad)
        self.prescale = unscales_first(wrapper)
        self.max_norm = Tensor(np.float32(wrapper.max_grad_norm))
        self.clip_eps = Tensor(np.float32(CLIP_EPS))
        self.count_base = Tensor(np.array([COUNT_BASE, 1.0], dtype=np.float32))
        self.one = Tensor(np.float32(1.0))
        self.sqrt = P.Sqrt()
        self.addn = P.AddN()
        self.stack = P.Stack()

    def construct(self, loss, grads, tokens, lr):
        if self.reducer is not None:  # sum over the data-parallel workers: gradients, loss and token counts
            grads = self.reducer(grads)
            loss = self.all_reduce(loss)
            tokens = self.all_reduce(tokens)
        count = ops.maximum(F.reduce_sum(tokens * self.count_base), self.one)
        scale = self.one / count / self.loss_scale()   # in this order: count x a huge scale would overflow
        if self.prescale:  # a loss scale: unscale first, the squares of scaled fp16-range gradients overflow fp32
            grads = self.hyper_map(F.partial(_scale, scale), grads)
            scale = self.one
        norm = self.sqrt(self.addn(self.hyper_map(_square_sum, grads))) * scale
        mean_loss = loss / self.loss_scale() / count
        finite = ops.logical_and(ops.isfinite(norm), ops.isfinite(mean_loss))
        coef = scale
        if self.clip:
            coef = scale * ops.minimum(self.one, self.max_norm / (norm + self.clip_eps))
        if self.loss_scale.dynamic:  # overflow: zero gradients + keep 0 leave weights and moments untouched
            grads = self.hyper_map(F.partial(_scale_or_zero, ops.where(finite, coef, ops.zeros_like(coef)), finite),
                                   grads)
            done = self.optimizer.update(grads, lr, F.cast(finite, ms.float32))
        else:  # the factor goes into the fused kernel's arguments: no pass over the gradients
            done = self.optimizer.update_scaled(grads, coef, lr)
        new_scale = self.loss_scale.update(F.depend(finite, done))
        out = self.stack((F.cast(mean_loss, ms.float32), norm, F.cast(finite, ms.float32), new_scale))
        return F.depend(out, done)


class FusedStep(nn.Cell):
    """The whole optimizer step in one graph (no accumulation): returns [loss, norm, finite, loss scale]."""

    def __init__(self, loss_sum: LossSum, params: list[Parameter], finish: Finish):
        super().__init__(auto_prefix=False)
        self.network = loss_sum
        self.weights = ParameterTuple(params)
        self.grad = C.GradOperation(get_by_list=True)
        self.finish = finish

    def construct(self, input_ids, labels, cos, sin, attn_mask, tokens, lr):
        scale = self.finish.loss_scale()
        loss = self.network(input_ids, labels, cos, sin, attn_mask, scale)
        grads = self.grad(self.network, self.weights)(input_ids, labels, cos, sin, attn_mask, scale)
        return self.finish(loss, grads, tokens, lr)


class AccumulateStep(nn.Cell):
    """One micro batch: gradients and loss of the (scaled) NLL sum added into the accumulation buffers."""

    def __init__(self, loss_and_grads: LossAndGrads, accu: ParameterTuple, loss_accu: Parameter,
                 loss_scale: LossScale):
        super().__init__(auto_prefix=False)
        self.loss_and_grads = loss_and_grads
        self.accu = accu
        self.loss_accu = loss_accu
        self.loss_scale = loss_scale
        self.hyper_map = C.HyperMap()

    def construct(self, input_ids, labels, cos, sin, attn_mask):
        loss, grads = self.loss_and_grads(input_ids, labels, cos, sin, attn_mask, self.loss_scale())
        added = self.hyper_map(_add_into, self.accu, grads)
        return F.depend(F.assign_add(self.loss_accu, F.cast(loss, ms.float32)), added)


class FinishFromBuffers(nn.Cell):
    """After the micro batches: the finishing math on the buffers, then the buffers zeroed."""

    def __init__(self, accu: ParameterTuple, loss_accu: Parameter, finish: Finish):
        super().__init__(auto_prefix=False)
        self.accu = accu
        self.loss_accu = loss_accu
        self.finish = finish
        self.hyper_map = C.HyperMap()

    def construct(self, tokens, lr):
        out = self.finish(self.loss_accu * 1.0, self.accu, tokens, lr)
        zeroed = self.hyper_map(_zero, F.depend(self.accu, out))
        zeroed_loss = F.assign(self.loss_accu, F.zeros_like(F.depend(self.loss_accu, out)))
        return F.depend(F.depend(out, zeroed), zeroed_loss)


def make_buffers(params: list[Parameter]) -> tuple[ParameterTuple, Parameter]:
    """fp32 gradient accumulation buffers, one per trainable parameter, and the loss sum (accumulation only)."""
    accu = ParameterTuple([Parameter(Tensor(ops.zeros(p.shape, ms.float32)), name=f"accu_grads.{p.name}",
                                     requires_grad=False) for p in params])
    return accu, Parameter(Tensor(np.float32(0.0)), name="accu_loss", requires_grad=False)
