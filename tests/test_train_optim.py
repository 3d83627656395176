"""The fused AdamW: torch.optim.AdamW's trajectory on MindSpore's fused kernel; the Ascend kernel's selection."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

SHAPES = {"w1.weight": (64, 32), "w1.bias": (64,), "norm.weight": (64,), "w2.weight": (8, 64)}


def _init() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: (rng.standard_normal(s) * 0.3 + (1.0 if n.startswith("norm") else 0.0)).astype(np.float32)
            for n, s in SHAPES.items()}


_RNG = np.random.default_rng(1)
X, Y = _RNG.standard_normal((16, 32)), _RNG.standard_normal((16, 8))


def _grads(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tiny model's gradients (tanh MLP, mean squared error) in float64 numpy, the same for both frameworks,
    so the comparison measures the optimizers and not two frameworks' matmul rounding."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    h = np.tanh(X @ w["w1.weight"].T + w["w1.bias"])
    hg = h * w["norm.weight"]
    d = 2 * (hg @ w["w2.weight"].T - Y) / Y.size
    dhg = d @ w["w2.weight"]
    da = dhg * w["norm.weight"] * (1 - h * h)
    g = {"w1.weight": da.T @ X, "w1.bias": da.sum(0), "norm.weight": (dhg * h).sum(0), "w2.weight": d.T @ hg}
    return {k: v.astype(np.float32) for k, v in g.items()}


def _torch_run(init, steps, lrs, wd, keywords):
    p = {n: torch.nn.Parameter(torch.from_numpy(v.copy())) for n, v in init.items()}
    decay = [t for n, t in p.items() if not any(k in n for k in keywords)]
    rest = [t for n, t in p.items() if any(k in n for k in keywords)]
    groups = [g for g in ({"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lrs[step]
        grads = _grads({n: t.detach().numpy() for n, t in p.items()})
        for n, t in p.items():
            t.grad = torch.from_numpy(grads[n])
        opt.step()
    return {n: t.detach().numpy() for n, t in p.items()}


def _mindspore_run(init, steps, lrs, wd, keywords, through_update: bool):
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops
    from telechat_ms.job_config import OptimizerConfig
    from telechat_ms.train.optim import FusedAdamW
    from telechat_ms.train.trainer import build_optimizer

    ms.set_context(mode=ms.GRAPH_MODE)
    params = [Parameter(Tensor(v.copy()), name=n) for n, v in init.items()]
    opt = build_optimizer(OptimizerConfig(weight_decay=wd, no_decay_keywords=list(keywords)), 1e-3, params)
    assert isinstance(opt, FusedAdamW) and opt.kernel == "AdamWeightDecay"

    class Apply(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.opt = opt

        def construct(self, lr, *grads):
            if through_update:
                return self.opt.update(grads, lr, ops.ones((), ms.float32))
            return self.opt(grads)

    apply = Apply()
    for s in range(steps):
        opt.learning_rate.set_data(Tensor(np.float32(lrs[s])))
        grads = _grads({p.name: p.asnumpy() for p in params})
        apply(Tensor(np.float32(lrs[s])), *(Tensor(grads[p.name]) for p in params))
    assert int(opt.global_step.asnumpy()[0]) == steps
    return {p.name: p.asnumpy() for p in params}, opt


@pytest.mark.parametrize("wd,keywords,through_update", [(0.1, ("norm", "bias"), False), (0.0, (), True),
                                                        (0.1, (), True)])
def test_fused_adamw_equals_torch_adamw(wd, keywords, through_update, pynative_after):
    """50 steps on a tiny model (lr 1e-3 fp32, a warmup to it): weights within 1e-5 of torch.optim.AdamW, with and
    without weight decay, with no-decay groups, through optimizer(grads) and through update(grads, lr, keep)."""
    init = _init()
    lrs = [1e-3 * min(1.0, (s + 1) / 10) for s in range(50)]
    ref = _torch_run(init, 50, lrs, wd, keywords)
    got, opt = _mindspore_run(init, 50, lrs, wd, keywords, through_update)
    moved = max(np.abs(ref[n] - init[n]).max() for n in init)
    assert moved > 1e-2  # the weights really moved (so 1e-5 is a real bound)
    for n in init:
        np.testing.assert_allclose(got[n], ref[n], atol=1e-5, rtol=0, err_msg=n)
    names = [p.name for p in opt.exp_avg] + [p.name for p in opt.exp_avg_sq]
    assert names == [f"adam_m.{n}" for n in init] + [f"adam_v.{n}" for n in init]  # MindFormers' AdamW names


def test_skipped_update_changes_nothing(pynative_after):
    """keep = 0 (an fp16 overflow, gradients zeroed by the step): weights, moments and the step count stay."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops
    from telechat_ms.train.optim import FusedAdamW
    ms.set_context(mode=ms.GRAPH_MODE)
    p = Parameter(Tensor(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)), name="w")
    opt = FusedAdamW([p], learning_rate=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    class Apply(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.opt = opt

        def construct(self, g, keep):
            return self.opt.update((g,), ops.ones((), ms.float32) * 1e-2, keep)

    apply = Apply()
    g = Tensor(np.full((3, 4), 0.5, np.float32))
    apply(g, Tensor(np.float32(1.0)))
    before = [x.asnumpy().copy() for x in (p, opt.exp_avg[0], opt.exp_avg_sq[0], opt.global_step)]
    apply(Tensor(np.zeros((3, 4), np.float32)), Tensor(np.float32(0.0)))
    after = [x.asnumpy() for x in (p, opt.exp_avg[0], opt.exp_avg_sq[0], opt.global_step)]
    for b, a in zip(before, after):
        assert np.array_equal(a, b)
    apply(g, Tensor(np.float32(1.0)))
    assert int(opt.global_step.asnumpy()[0]) == 2 and not np.array_equal(p.asnumpy(), before[0])


def test_ascend_selects_the_fused_adamw_primitive():
    """On Ascend the optimizer runs MindSpore's fused AdamW primitive (mint.optim.AdamW's kernel; it has no CPU
    kernel, so this is introspected, not run), with the same state names as on CPU."""
    from mindspore import Parameter, Tensor
    from mindspore.ops import auto_generate as gen
    from telechat_ms.train.optim import FusedAdamW, default_kernel, describe
    assert default_kernel("Ascend") == "AdamW" and default_kernel("CPU") == "AdamWeightDecay"
    p = Parameter(Tensor(np.zeros((4, 2), np.float32)), name="layer.w")
    ascend = FusedAdamW([p], learning_rate=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, kernel="AdamW")
    assert isinstance(ascend.fused, gen.AdamW)
    cpu = FusedAdamW([p], learning_rate=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert describe(cpu)["primitive"] == "AdamWeightDecay"
    assert describe(ascend)["state"] == describe(cpu)["state"] == ["adam_m.layer.w", "adam_v.layer.w", "global_step"]


def test_state_is_mindformers_adamw_state():
    """Checkpoints written with MindFormers' AdamW (the optimizer before this one) hold the same state names, shapes
    and dtypes: they load into FusedAdamW as they are."""
    from mindspore import Parameter, Tensor
    from telechat_ms import backend
    from telechat_ms.train.optim import FusedAdamW
    params = [Parameter(Tensor(np.zeros(s, np.float32)), name=n) for n, s in SHAPES.items()]
    groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0},
              {"order_params": params}]
    old = backend.AdamW(groups, learning_rate=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    new = FusedAdamW(groups, learning_rate=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def state(opt):
        return [(p.name, tuple(p.shape), str(p.dtype)) for p in (*opt.exp_avg, *opt.exp_avg_sq, opt.global_step)]
    assert state(new) == state(old)


def test_gradient_factor_in_the_kernel_equals_torch_adamw(pynative_after):
    """update_scaled(raw grads, c): the step's factor (token mean x clipping) folded into the fused kernel's
    arguments equals torch.optim.AdamW on c * grads over 50 steps, with c drifting slowly, dropping 100x (a loss
    spike) and jumping back, and a checkpoint's normalize_state + adopt half way: weights within 1e-5 (the largest
    difference is printed), torch's m and v within 1e-5 relative."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn
    from telechat_ms.job_config import OptimizerConfig
    from telechat_ms.train.trainer import build_optimizer

    init, steps, lr = _init(), 50, 1e-3
    coefs = [np.float32(3e-4 * (1 + 0.4 * np.sin(s / 3))) for s in range(steps)]
    coefs[20:24] = [np.float32(c / 100) for c in coefs[20:24]]  # spike: the clip factor falls 100x for 4 steps

    p = {n: torch.nn.Parameter(torch.from_numpy(v.copy())) for n, v in init.items()}
    ref = torch.optim.AdamW(list(p.values()), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for s in range(steps):
        grads = _grads({n: t.detach().numpy() for n, t in p.items()})
        for n, t in p.items():
            t.grad = torch.from_numpy(grads[n] * coefs[s])
        ref.step()

    ms.set_context(mode=ms.GRAPH_MODE)
    params = [Parameter(Tensor(v.copy()), name=n) for n, v in init.items()]
    opt = build_optimizer(OptimizerConfig(weight_decay=0.1, no_decay_keywords=[]), lr, params)

    class Apply(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.opt = opt

        def construct(self, coef, *grads):
            return self.opt.update_scaled(grads, coef, Tensor(np.float32(lr)))

    apply = Apply()
    for s in range(steps):
        grads = _grads({q.name: q.asnumpy() for q in params})
        apply(Tensor(coefs[s]), *(Tensor(grads[q.name]) for q in params))
        if s == 0:  # the first step starts the scales at its factor
            assert abs(float(opt.scale_m.asnumpy()) / float(coefs[0]) - 1) < 1e-6
            assert abs(float(opt.scale_v.asnumpy()) / float(coefs[0]) ** 2 - 1) < 1e-6
        if s == 34:
            m_before, v_before = opt.moments()
            opt.normalize_state()
            assert float(opt.scale_m.asnumpy()) == float(opt.scale_v.asnumpy()) == 1.0
            m_after, v_after = opt.moments()
            for a, b in zip(m_before + v_before, m_after + v_after):
                np.testing.assert_allclose(a, b, rtol=1e-7, atol=0)
            opt.adopt(3e-4)  # a power of two: torch's m and v unchanged to the bit
            assert float(opt.scale_m.asnumpy()) == 2.0 ** -12 and float(opt.scale_v.asnumpy()) == 2.0 ** -24
            m_adopted, v_adopted = opt.moments()
            for a, b in zip(m_after + v_after, m_adopted + v_adopted):
                np.testing.assert_array_equal(a, b)
    print("largest weight difference from torch:",
          max(float(np.abs(q.asnumpy() - p[q.name].detach().numpy()).max()) for q in params))
    for q in params:
        np.testing.assert_allclose(q.asnumpy(), p[q.name].detach().numpy(), atol=1e-5, rtol=0, err_msg=q.name)
    m, v = opt.moments()
    for q, mq, vq in zip(params, m, v):
        state = ref.state[p[q.name]]
        for got, want in ((mq, state["exp_avg"].numpy()), (vq, state["exp_avg_sq"].numpy())):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=q.name)


def test_plain_update_leaves_moment_scales_at_one(pynative_after):
    """update(grads, lr, keep) is the factor-1 case: the scales stay exactly 1 (the kernel sees the same
    arguments as the plain mapping) and normalize_state has nothing to do."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops
    from telechat_ms.train.optim import FusedAdamW
    ms.set_context(mode=ms.GRAPH_MODE)
    p = Parameter(Tensor(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)), name="w")
    opt = FusedAdamW([p], learning_rate=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    class Apply(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.opt = opt

        def construct(self, g):
            return self.opt.update((g,), ops.ones((), ms.float32) * 1e-2, ops.ones((), ms.float32))

    for k in range(3):
        Apply()(Tensor(np.full((3, 4), 0.5 + k, np.float32)))
    assert float(opt.scale_m.asnumpy()) == float(opt.scale_v.asnumpy()) == 1.0
    m = opt.exp_avg[0].asnumpy()
    assert abs(float(m[0, 0]) - (0.1 * 0.9 * 0.9 * 0.5 + 0.1 * 0.9 * 1.5 + 0.1 * 2.5)) < 1e-6
