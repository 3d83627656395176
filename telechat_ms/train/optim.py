"""torch.optim.AdamW on MindSpore's fused kernels (bias correction, decoupled decay, no-decay groups).

CPU (and GPU): the fused `AdamWeightDecay` kernel (one pass per parameter, what `nn.AdamWeightDecay` runs) has no
bias correction; given per-step corrected arguments it is torch's AdamW exactly (same formula, fp32 rounding):

    lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t),  eps_t = eps * sqrt(1 - b2^t),  decay_t = wd * (1 - b1^t) / sqrt(1 - b2^t)

    kernel: m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); p -= lr_t * (m / (sqrt(v) + eps_t) + decay_t * p)
          = p - lr * wd * p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)            (torch's update)

(decay_t = wd * lr / lr_t with lr cancelled, so lr = 0 stays finite).

The step's gradient factor c (token mean x clipping) goes into the same kernel's scalar arguments instead of a
multiply pass over every gradient: the moments are stored as m = s M, v = r V with per-step scalars s, r, and

    s' = b1 s + (1 - b1) c,  r' = b2 r + (1 - b2) c^2,  B1 = b1 s / s',  B2 = b2 r / r'
    kernel(M, V, raw g; B1, B2, lr_t s' / sqrt(r'), eps_t / sqrt(r'), decay_t sqrt(r') / s')

gives m' = b1 m + (1 - b1) c g, v' = b2 v + (1 - b2) c^2 g^2 and torch's update, with no branch in the graph.
The kernel forms 1 - B itself, which loses fp32 digits when B is near 1, i.e. when c falls far below s (c^2 far
below r; the other way round is harmless): the scales must start near the factor. `adopt(p)` stores the moments at
scale p (a power of two near the expected factor, so the division is exact) on a resume and after a checkpoint;
before a checkpoint `normalize_state` folds s and r back in (s = r = 1): checkpoints hold torch's m and v, and a
resumed run, which loads them and adopts the same p, continues bit for bit. A clip factor that falls 100x for
4 steps moved the weights 2e-7 further from torch's in the tests (1.8e-6 without it, 2.0e-6 with, at lr 1e-3);
under a sustained fall s catches up in ~1 / (1 - b1) steps and r in ~1 / (1 - b2).
With c = 1 and s = r = 1 every argument is bit-identical to the plain mapping. Ascend: the fused `AdamW` primitive
(`mint.optim.AdamW`'s kernel, with its own bias correction; no CPU kernel). The state keeps MindFormers' AdamW
names and shapes (adam_m.*, adam_v.*, global_step): checkpoints written before this optimizer load as they are.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import initializer
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P

_fused_wd = C.MultitypeFuncGraph("fused_adam_weight_decay")
_fused_adamw = C.MultitypeFuncGraph("fused_adamw")
_times = C.MultitypeFuncGraph("times")

KERNEL_ADAM_WEIGHT_DECAY = "AdamWeightDecay"   # CPU / GPU
KERNEL_ADAMW = "AdamW"                         # Ascend


@_fused_wd.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                    "Tensor", "Tensor", "Bool")
def _fused_wd_impl(opt, beta1, beta2, lr_t, eps_t, decay_scale, wd, param, m, v, grad, optim_filter):
    """One parameter through the AdamWeightDecay kernel with the bias-corrected arguments."""
    if optim_filter:
        opt(param, m, v, lr_t, beta1, beta2, eps_t, wd * decay_scale, F.cast(grad, F.dtype(param)))
    return True


@_fused_wd.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                    "Tensor", "Bool")
def _fused_wd_shared_impl(opt, beta1, beta2, lr_t, eps_t, decay_t, param, m, v, grad, optim_filter):
    """The same with the decay argument computed once for every parameter of its group."""
    if optim_filter:
        opt(param, m, v, lr_t, beta1, beta2, eps_t, decay_t, F.cast(grad, F.dtype(param)))
    return True


@_fused_adamw.register("Function", "Float", "Float", "Float", "Tensor", "Tensor", "Float", "Tensor", "Tensor",
                       "Tensor", "Tensor", "Bool")
def _fused_adamw_impl(opt, beta1, beta2, eps, step, lr, wd, param, m, v, grad, optim_filter):
    """One parameter through Ascend's fused AdamW kernel (bias correction inside the kernel)."""
    if optim_filter:
        opt(param, m, v, v, F.cast(grad, F.dtype(param)), step, F.reshape(lr, ()), beta1, beta2, wd, eps, False,
            False)
    return True


@_times.register("Tensor", "Tensor")
def _times_impl(factor, grad):
    return F.cast(grad, ms.float32) * factor


def default_kernel(device_target: str | None = None) -> str:
    """The fused kernel for a device: the AdamW primitive exists on Ascend only."""
    target = device_target or ms.get_context("device_target")
    return KERNEL_ADAMW if target == "Ascend" else KERNEL_ADAM_WEIGHT_DECAY


class FusedAdamW(nn.Optimizer):
    """torch.optim.AdamW on one fused kernel launch per parameter.

    `optimizer(grads)` (MindFormers' / MindSpore's step cells) uses the `learning_rate` parameter the trainer sets;
    `optimizer.update(grads, lr, keep)` takes the rate as a graph input and skips the step exactly (weights,
    moments and step count unchanged) where keep is 0, for the fused step's in-graph overflow handling.
    """

    _support_parallel_optimizer = True

    def __init__(self, params, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 kernel: str | None = None):
        super().__init__(learning_rate, params, weight_decay)
        self.kernel = kernel or default_kernel()
        if self.kernel not in (KERNEL_ADAM_WEIGHT_DECAY, KERNEL_ADAMW):
            raise ValueError(f"unknown AdamW kernel {self.kernel!r}")
        b1, b2 = float(betas[0]), float(betas[1])
        self.b1, self.b2, self.eps_value = b1, b2, float(eps)
        self.beta1 = Tensor(np.float32(b1))
        self.beta2 = Tensor(np.float32(b2))
        self.eps = Tensor(np.float32(eps))
        self.one = Tensor(np.float32(1.0))
        decays = self.group_weight_decay if self.is_group else [float(weight_decay)] * len(self._parameters)
        self.decays = tuple(Tensor(np.float32(d)) for d in decays)
        self.decay_floats = tuple(float(d) for d in decays)
        nonzero = sorted({d for d in self.decay_floats if d != 0.0})
        # one decay value (plus 0 for norms and biases): its kernel argument is computed once per step, not per tensor
        self.shared_decay = len(nonzero) <= 1
        self.decay_main = Tensor(np.float32(nonzero[0] if nonzero else 0.0))
        self.decay_is_main = tuple(d != 0.0 for d in self.decay_floats)
        self.zero = Tensor(np.float32(0.0))
        self.exp_avg = self._clone("adam_m")
        self.exp_avg_sq = self._clone("adam_v")
        # the moments' scales (m = scale_m * exp_avg, v = scale_v * exp_avg_sq); 1 in every saved checkpoint,
        # set near the step's gradient factor by adopt()
        self.scale_m = Parameter(Tensor(np.float32(1.0)), name="adam_scale.m", requires_grad=False)
        self.scale_v = Parameter(Tensor(np.float32(1.0)), name="adam_scale.v", requires_grad=False)
        if self.kernel == KERNEL_ADAMW:
            from mindspore.ops import auto_generate as gen
            self.fused = gen.AdamW()
        else:
            self.fused = P.AdamWeightDecay()
        self.pow = P.Pow()
        self.sqrt = P.Sqrt()
        self.maximum = P.Maximum()
        self.select = P.Select()

    def _clone(self, prefix: str):
        """fp32 zeros like every parameter, named prefix.<param> (MindFormers' AdamW state names)."""
        state = self._parameters.clone(prefix=prefix, init="zeros")
        for s, p in zip(state, self._parameters):
            if s.dtype != ms.float32:
                s.set_dtype(ms.float32)
                s.set_data(initializer("zeros", p.shape, ms.float32))
        return state

    def construct(self, gradients):
        return self.update(gradients, self.get_lr(), self.one)

    def update(self, gradients, lr, keep):
        """Apply one AdamW step with rate `lr` where `keep` is 1; leave everything unchanged where it is 0."""
        return self._step(gradients, self.one, lr, keep)

    def update_scaled(self, gradients, grad_scale, lr):
        """One AdamW step on `grad_scale * gradients` (a scalar tensor > 0), the factor applied inside the fused
        kernel's arguments on CPU / GPU (no pass over the gradients), by a multiply on Ascend."""
        return self._step(gradients, grad_scale, lr, self.one)

    def _step(self, gradients, coef, lr, keep):
        keep_i = F.cast(keep, ms.int32)
        self.assignadd(self.global_step, self.global_step_increase_tensor * keep_i)
        if self.kernel == KERNEL_ADAMW:  # Ascend: the skip is control flow (the kernel would decay the moments)
            if keep > 0.5:
                step = F.cast(self.global_step, ms.int64)
                grads = self.hyper_map(F.partial(_times, F.reshape(coef, ())), gradients)
                return self.hyper_map(F.partial(_fused_adamw, self.fused, self.b1, self.b2, self.eps_value, step,
                                                lr), self.decay_floats, self._parameters, grads, self.exp_avg,
                                      self.exp_avg_sq, self.optim_filter)
            return True
        t = F.cast(self.maximum(self.global_step, 1), ms.float32)
        bc1 = self.one - self.pow(self.beta1, t)
        root_bc2 = self.sqrt(self.one - self.pow(self.beta2, t))
        keep_f = F.cast(keep, ms.float32)
        coef = F.reshape(coef, ())
        coef2 = coef * coef
        # the first step (the moments are zero): scales c, c^2, so B = b (any scale represents m = 0)
        first = F.reshape(self.global_step, ()) == 1
        s = self.select(first, coef, self.scale_m * self.one)
        r = self.select(first, coef2, self.scale_v * self.one)
        new_s = self.beta1 * s + (self.one - self.beta1) * coef
        new_r = self.beta2 * r + (self.one - self.beta2) * coef2
        root_r = self.sqrt(new_r)
        # keep = 0: beta = 1 leaves m and v as they are (the gradients are zeroed by the caller), lr_t = 0 the weights
        keeping = keep_f > 0.5
        beta1 = F.reshape(self.select(keeping, self.beta1 * s / new_s, self.one), ())
        beta2 = F.reshape(self.select(keeping, self.beta2 * r / new_r, self.one), ())
        lr_t = F.reshape(lr * root_bc2 / bc1 * keep_f * (new_s / root_r), ())
        eps_t = F.reshape(self.eps * root_bc2 / root_r, ())
        decay_scale = F.reshape(bc1 / root_bc2 * (root_r / new_s), ())
        moved = F.depend(F.assign(self.scale_m, self.select(keeping, new_s, s)),
                         F.assign(self.scale_v, self.select(keeping, new_r, r)))
        beta1 = F.depend(beta1, moved)
        if self.shared_decay:
            decay_t = F.reshape(self.decay_main * decay_scale, ())
            decays = tuple(decay_t if main else self.zero for main in self.decay_is_main)
            return self.hyper_map(F.partial(_fused_wd, self.fused, beta1, beta2, lr_t, eps_t), decays,
                                  self._parameters, self.exp_avg, self.exp_avg_sq, gradients, self.optim_filter)
        return self.hyper_map(F.partial(_fused_wd, self.fused, beta1, beta2, lr_t, eps_t, decay_scale),
                              self.decays, self._parameters, self.exp_avg, self.exp_avg_sq, gradients,
                              self.optim_filter)

    def normalize_state(self) -> None:
        """Fold the moments' scales into the stored moments (m = s M, v = r V, then s = r = 1), on the host: before a
        checkpoint, so the file holds torch's m and v and a resumed run continues from exactly this state."""
        s, r = float(self.scale_m.asnumpy()), float(self.scale_v.asnumpy())
        if s == 1.0 and r == 1.0:
            return
        self._rescale(np.float32(s), np.float32(r), np.float32(1.0), np.float32(1.0))

    def adopt(self, scale: float) -> None:
        """Store torch's m and v (what a fresh start or a checkpoint holds: s = r = 1) at scale m = p M, v = p^2 V,
        p = `scale` rounded to a power of two (the division is exact, so a resumed run equals a continuing one bit
        for bit): the first steps' scales then sit near the factor c (token mean x clipping) the kernel folds in.
        On the Ascend kernel, and with the scales not at 1, nothing happens. (A fresh start needs none: the first step
        sets the scales to its factor.)"""
        if self.kernel == KERNEL_ADAMW or scale <= 0:
            return
        if float(self.scale_m.asnumpy()) != 1.0 or float(self.scale_v.asnumpy()) != 1.0:
            return
        p = np.float32(2.0 ** round(float(np.log2(scale))))
        if p == 1.0:
            return
        self._rescale(np.float32(1.0) / p, np.float32(1.0) / (p * p), p, np.float32(p * p))

    def _rescale(self, factor_m, factor_v, scale_m, scale_v) -> None:
        """On the host: stored moments times the factors, the scales set to the values that keep m and v."""
        for moments, factor in ((self.exp_avg, factor_m), (self.exp_avg_sq, factor_v)):
            for moment in moments:
                moment.set_data(Tensor(moment.asnumpy() * factor))
        self.scale_m.set_data(Tensor(scale_m))
        self.scale_v.set_data(Tensor(scale_v))

    def moments(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """torch's m and v (the stored moments times their scales), as numpy arrays: for tests and inspection."""
        s, r = np.float32(self.scale_m.asnumpy()), np.float32(self.scale_v.asnumpy())
        return [m.asnumpy() * s for m in self.exp_avg], [v.asnumpy() * r for v in self.exp_avg_sq]


def describe(optimizer) -> dict:
    """What an optimizer runs (for tests and the benchmark): class, kernel primitive, state names."""
    return {"class": type(optimizer).__name__, "kernel": getattr(optimizer, "kernel", None),
            "primitive": type(getattr(optimizer, "fused", None)).__name__,
            "state": [p.name for p in (*optimizer.exp_avg, *optimizer.exp_avg_sq)] + [optimizer.global_step.name]}


__all__ = ["FusedAdamW", "KERNEL_ADAMW", "KERNEL_ADAM_WEIGHT_DECAY", "default_kernel", "describe"]
