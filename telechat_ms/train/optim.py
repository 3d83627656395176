"""torch.optim.AdamW on MindSpore's fused kernels (bias correction, decoupled decay, no-decay groups).

CPU (and GPU): the fused `AdamWeightDecay` kernel (one pass per parameter, what `nn.AdamWeightDecay` runs) has no
bias correction; given per-step corrected arguments it is torch's AdamW exactly (same formula, fp32 rounding):

    lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t),  eps_t = eps * sqrt(1 - b2^t),  decay_t = wd * (1 - b1^t) / sqrt(1 - b2^t)

    kernel: m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); p -= lr_t * (m / (sqrt(v) + eps_t) + decay_t * p)
          = p - lr * wd * p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)            (torch's update)

(decay_t = wd * lr / lr_t with lr cancelled, so lr = 0 stays finite). Ascend: the fused `AdamW` primitive
(`mint.optim.AdamW`'s kernel, with its own bias correction; no CPU kernel). The state keeps MindFormers' AdamW
names and shapes (adam_m.*, adam_v.*, global_step): checkpoints written before this optimizer load as they are.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from mindspore.common.initializer import initializer
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P

_fused_wd = C.MultitypeFuncGraph("fused_adam_weight_decay")
_fused_adamw = C.MultitypeFuncGraph("fused_adamw")

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
        keep_i = F.cast(keep, ms.int32)
        self.assignadd(self.global_step, self.global_step_increase_tensor * keep_i)
        if self.kernel == KERNEL_ADAMW:  # Ascend: the skip is control flow (the kernel would decay the moments)
            if keep > 0.5:
                step = F.cast(self.global_step, ms.int64)
                return self.hyper_map(F.partial(_fused_adamw, self.fused, self.b1, self.b2, self.eps_value, step,
                                                lr), self.decay_floats, self._parameters, gradients, self.exp_avg,
                                      self.exp_avg_sq, self.optim_filter)
            return True
        t = F.cast(self.maximum(self.global_step, 1), ms.float32)
        bc1 = self.one - self.pow(self.beta1, t)
        root_bc2 = self.sqrt(self.one - self.pow(self.beta2, t))
        keep_f = F.cast(keep, ms.float32)
        lr_t = F.reshape(lr * root_bc2 / bc1 * keep_f, ())
        eps_t = F.reshape(self.eps * root_bc2, ())
        decay_scale = F.reshape(bc1 / root_bc2, ())
        # keep = 0: beta = 1 leaves m and v as they are (the gradients are zeroed by the caller), lr_t = 0 the weights
        beta1 = F.reshape(self.select(keep_f > 0.5, self.beta1, self.one), ())
        beta2 = F.reshape(self.select(keep_f > 0.5, self.beta2, self.one), ())
        if self.shared_decay:
            decay_t = F.reshape(self.decay_main * decay_scale, ())
            decays = tuple(decay_t if main else self.zero for main in self.decay_is_main)
            return self.hyper_map(F.partial(_fused_wd, self.fused, beta1, beta2, lr_t, eps_t), decays,
                                  self._parameters, self.exp_avg, self.exp_avg_sq, gradients, self.optim_filter)
        return self.hyper_map(F.partial(_fused_wd, self.fused, beta1, beta2, lr_t, eps_t, decay_scale),
                              self.decays, self._parameters, self.exp_avg, self.exp_avg_sq, gradients,
                              self.optim_filter)


def describe(optimizer) -> dict:
    """What an optimizer runs (for tests and the benchmark): class, kernel primitive, state names."""
    return {"class": type(optimizer).__name__, "kernel": getattr(optimizer, "kernel", None),
            "primitive": type(getattr(optimizer, "fused", None)).__name__,
            "state": [p.name for p in (*optimizer.exp_avg, *optimizer.exp_avg_sq)] + [optimizer.global_step.name]}


__all__ = ["FusedAdamW", "KERNEL_ADAMW", "KERNEL_ADAM_WEIGHT_DECAY", "default_kernel", "describe"]
