"""The jitted pieces of one optimizer step: accumulate gradients of the NLL sum, reduce + normalise + measure
them, then clip and apply AdamW. Token-mean loss over the GLOBAL batch: grads of sum(nll) are summed over
micro batches and workers, then divided by the global number of supervised tokens (known on the host).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P

_add_into = C.MultitypeFuncGraph("add_into")
_scale_into = C.MultitypeFuncGraph("scale_into")
_zero = C.MultitypeFuncGraph("zero")
_square_sum = C.MultitypeFuncGraph("square_sum")


@_add_into.register("Tensor", "Tensor")
def _add_into_impl(accu, grad):
    return F.assign_add(accu, F.cast(grad, F.dtype(accu)))


@_scale_into.register("Tensor", "Tensor", "Tensor")
def _scale_into_impl(scale, accu, grad):
    return F.assign(accu, grad * scale)


@_zero.register("Tensor")
def _zero_impl(accu):
    return F.assign(accu, F.zeros_like(accu))


@_square_sum.register("Tensor")
def _square_sum_impl(x):
    return F.reduce_sum(F.square(F.cast(x, ms.float32)))


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


class ReduceScaleNorm(nn.Cell):
    """Sum gradients over data-parallel workers, scale them into the buffers; return their global norm."""

    def __init__(self, accu: ParameterTuple, world_size: int):
        super().__init__(auto_prefix=False)
        self.accu = accu
        self.hyper_map = C.HyperMap()
        self.reducer = nn.DistributedGradReducer(accu, mean=False, degree=world_size) if world_size > 1 else None
        self.sqrt = P.Sqrt()
        self.addn = P.AddN()

    def construct(self, grads, scale):
        if self.reducer is not None:
            grads = self.reducer(grads)
        done = self.hyper_map(F.partial(_scale_into, scale), self.accu, grads)
        squares = self.hyper_map(_square_sum, self.accu)
        return F.depend(self.sqrt(self.addn(squares)), done)


class AccumulateStep(nn.Cell):
    """One micro batch: grads of the (scaled) NLL sum added into the accumulation buffers; returns the sum."""

    def __init__(self, loss_and_grads: LossAndGrads, accu: ParameterTuple):
        super().__init__(auto_prefix=False)
        self.loss_and_grads = loss_and_grads
        self.accu = accu
        self.hyper_map = C.HyperMap()

    def construct(self, input_ids, labels, cos, sin, attn_mask, loss_scale):
        loss, grads = self.loss_and_grads(input_ids, labels, cos, sin, attn_mask, loss_scale)
        return F.depend(loss, self.hyper_map(_add_into, self.accu, grads))


class FinalizeGrads(nn.Cell):
    """After accumulation: reduce + scale the buffers by 1/(tokens*loss_scale); return the global norm."""

    def __init__(self, accu: ParameterTuple, world_size: int):
        super().__init__(auto_prefix=False)
        self.accu = accu
        self.reduce_scale_norm = ReduceScaleNorm(accu, world_size)

    def construct(self, scale):
        return self.reduce_scale_norm(self.accu, scale)


class GradAndFinalize(nn.Cell):
    """Without accumulation: one graph does AccumulateStep + FinalizeGrads (same values, one launch fewer)."""

    def __init__(self, loss_and_grads: LossAndGrads, accu: ParameterTuple, world_size: int):
        super().__init__(auto_prefix=False)
        self.loss_and_grads = loss_and_grads
        self.reduce_scale_norm = ReduceScaleNorm(accu, world_size)
        self.loss_reduce = P.AllReduce() if world_size > 1 else None

    def construct(self, input_ids, labels, cos, sin, attn_mask, loss_scale, scale):
        loss, grads = self.loss_and_grads(input_ids, labels, cos, sin, attn_mask, loss_scale)
        norm = self.reduce_scale_norm(grads, scale)
        if self.loss_reduce is not None:
            loss = self.loss_reduce(loss)
        return loss, norm


class ApplyGrads(nn.Cell):
    """Clip (the host passes the factor) and apply the optimizer to the buffers, then zero them."""

    def __init__(self, optimizer, accu: ParameterTuple):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.accu = accu
        self.hyper_map = C.HyperMap()

    def construct(self, clip_coef):
        grads = self.hyper_map(F.partial(ops.mul, clip_coef), self.accu)
        applied = self.optimizer(grads)
        return F.depend(clip_coef, self.hyper_map(_zero, F.depend(self.accu, applied)))


class AllReduceSum(nn.Cell):
    """Sum a scalar over workers (for logging the global loss)."""

    def __init__(self):
        super().__init__()
        self.op = P.AllReduce()

    def construct(self, x):
        return self.op(x)


def make_buffers(params: list[Parameter]) -> ParameterTuple:
    """fp32 gradient accumulation buffers, one per trainable parameter."""
    return ParameterTuple([Parameter(Tensor(ops.zeros(p.shape, ms.float32)), name=f"accu_grads.{p.name}",
                                     requires_grad=False) for p in params])


class ZeroGrads(nn.Cell):
    """Drop the accumulated gradients without touching weights or optimizer state (skipped fp16 step)."""

    def __init__(self, accu: ParameterTuple):
        super().__init__(auto_prefix=False)
        self.accu = accu
        self.hyper_map = C.HyperMap()

    def construct(self):
        return self.hyper_map(_zero, self.accu)
