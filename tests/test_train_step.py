"""The training step's shape: compiled graphs launched per optimizer step, no host reads inside a step,
buffers only with accumulation, the in-graph overflow skip (an injected inf) and the dynamic loss scale."""
from __future__ import annotations

import numpy as np
import pytest

from telechat_ms.job_config import RunnerWrapper

HOST_READS = ("asnumpy", "__float__", "__int__", "__bool__", "__index__", "item", "tolist")


def _setup(accumulation: int = 1, wrapper: RunnerWrapper | None = None):
    import mindspore as ms
    from telechat_ms.config import TeleChatConfig
    from telechat_ms.job_config import OptimizerConfig
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.train.runner import AccumulatingRunner
    from telechat_ms.train.trainer import PositionCache, build_optimizer
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    model = TeleChatForCausalLM(TeleChatConfig.preset("tiny", n_layer=1, hidden_size=32, n_head=4,
                                                      num_key_value_heads=2, ffn_hidden_size=48, vocab_size=64,
                                                      training_seqlen=16, base_seqlen=16))
    params = list(model.trainable_params())
    optimizer = build_optimizer(OptimizerConfig(), 1e-3, params)
    runner = AccumulatingRunner(model, params, optimizer, 1, wrapper or RunnerWrapper(max_grad_norm=0.1), None,
                                accumulation=accumulation)
    return model, params, optimizer, runner, PositionCache(model.config)


def _micro(n: int, seed: int = 0) -> tuple[list[dict], int]:
    rng = np.random.default_rng(seed)
    micro = [{"input_ids": (ids := rng.integers(0, 64, (2, 16)).astype(np.int32)), "labels": ids}
             for _ in range(n)]
    return micro, sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)


class _Probe:
    """Counts graph launches (by cell class) and host reads of tensors while active."""

    def __init__(self, monkeypatch):
        import mindspore as ms
        from mindspore.graph.api import _CellGraphExecutor
        self.graphs: list[str] = []
        self.reads: list[str] = []
        self.active = False
        run = _CellGraphExecutor.run

        def counted_run(executor, obj, *args, **kwargs):
            if self.active:
                self.graphs.append(type(obj).__name__)
            return run(executor, obj, *args, **kwargs)
        monkeypatch.setattr(_CellGraphExecutor, "run", counted_run)
        for name in HOST_READS:
            original = getattr(ms.Tensor, name)

            def read(tensor, *a, _original=original, _name=name, **kw):
                if self.active:
                    self.reads.append(_name)
                return _original(tensor, *a, **kw)
            monkeypatch.setattr(ms.Tensor, name, read)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_graphs_per_step_and_no_host_sync(accumulation, monkeypatch, pynative_after):
    """One compiled graph per optimizer step without accumulation (n + 1 with n micro batches), and no tensor is
    read back to the host inside a step: the loss and norm stay on the device until the trainer asks."""
    model, params, optimizer, runner, positions = _setup(accumulation)
    assert (runner.buffers is None) == (accumulation == 1)  # no gradient buffers without accumulation
    micro, tokens = _micro(accumulation)
    runner.run(micro, tokens, positions, 1e-3).outcome()  # compile
    probe = _Probe(monkeypatch)
    probe.active = True
    pending = [runner.run(*_micro(accumulation, seed=s), positions, 1e-3) for s in range(1, 4)]
    probe.active = False
    per_step = 1 if accumulation == 1 else accumulation + 1
    assert len(probe.graphs) == 3 * per_step, probe.graphs
    assert probe.graphs[:per_step] == (["FusedStep"] if accumulation == 1 else
                                       ["AccumulateStep"] * accumulation + ["FinishFromBuffers"])
    assert probe.reads == []
    outcomes = [p.outcome() for p in pending]
    assert all(o.finite and o.grad_norm > 0.1 and 3.0 < o.loss < 6.0 for o in outcomes)  # clipping was active
    assert int(optimizer.global_step.asnumpy()[0]) == 4


def test_fused_step_equals_the_step_written_out(pynative_after):
    """One fused step = token-mean gradients (value_and_grad), global norm, clip factor and torch's AdamW, written
    out here in numpy from the same gradients."""
    from mindspore import Tensor
    from telechat_ms.train.step import LossAndGrads, LossSum
    model, params, optimizer, runner, positions = _setup(1)
    micro, tokens = _micro(1)
    before = [p.asnumpy().copy() for p in params]
    cos, sin, mask = positions(micro[0])
    loss_sum, grads = LossAndGrads(LossSum(model), params)(Tensor(micro[0]["input_ids"]),
                                                           Tensor(micro[0]["labels"]), cos, sin, mask,
                                                           Tensor(np.float32(1.0)))
    g = [x.asnumpy().astype(np.float64) / tokens for x in grads]
    norm = np.sqrt(sum((x ** 2).sum() for x in g))
    clip = min(1.0, 0.1 / (norm + 1e-6))
    out = runner.run(micro, tokens, positions, 2e-3).outcome()
    assert abs(out.loss - float(loss_sum.asnumpy()) / tokens) <= 1e-6 * out.loss
    assert abs(out.grad_norm - norm) <= 1e-5 * norm and clip < 1.0
    b2c = 1 - 0.95
    for p, w, x in zip(params, before, g):
        gc = x * clip
        m, v = 0.1 * gc, b2c * gc * gc
        wd = 0.0 if any(k in p.name for k in ("norm", "bias")) else 0.1
        expect = w * (1 - 2e-3 * wd) - 2e-3 / 0.1 * m / (np.sqrt(v / b2c) + 1e-8)
        np.testing.assert_allclose(p.asnumpy(), expect, atol=2e-6, err_msg=p.name)


def test_injected_inf_skips_the_update_and_lowers_the_scale(pynative_after):
    """Dynamic loss scale: an inf injected into a batch's rotary table makes the step overflow; the graph leaves
    weights, moments and step count bit-identical, divides the scale by scale_factor; the next step trains and
    every scale_window-th finite step doubles it."""
    from mindspore import Tensor
    wrapper = RunnerWrapper(max_grad_norm=1.0, loss_scale="dynamic", loss_scale_value=1024.0, scale_factor=2.0,
                            scale_window=2)
    model, params, optimizer, runner, positions = _setup(1, wrapper)
    micro, tokens = _micro(1)
    first = runner.run(micro, tokens, positions, 1e-3).outcome()
    assert first.finite and first.loss_scale == 1024.0 and runner.loss_scale_state() == (1024.0, 1)
    state = [x.asnumpy().copy() for x in (*params, *optimizer.exp_avg, *optimizer.exp_avg_sq,
                                           optimizer.global_step)]

    def poisoned(batch):
        cos, sin, mask = positions(batch)
        bad = cos.asnumpy().copy()
        bad[3, 0] = np.inf
        return Tensor(bad), sin, mask
    out = runner.run(*_micro(1, seed=1), poisoned, 1e-3).outcome()
    assert not out.finite and out.loss_scale == 512.0
    after = [x.asnumpy() for x in (*params, *optimizer.exp_avg, *optimizer.exp_avg_sq, optimizer.global_step)]
    assert all(np.array_equal(a, b) for a, b in zip(after, state))
    assert runner.loss_scale_state() == (512.0, 1)
    nxt = runner.run(*_micro(1, seed=2), positions, 1e-3).outcome()
    assert nxt.finite and nxt.loss_scale == 1024.0  # the 2nd finite step of the window: grown again
    assert int(optimizer.global_step.asnumpy()[0]) == 2
    assert any(not np.array_equal(p.asnumpy(), s) for p, s in zip(params, state))
    # the same scaled loss without the scale: the loss and norm the graph reports are the unscaled ones
    plain_model, plain_params, _, plain, _ = _setup(1)
    ref = plain.run(micro, tokens, positions, 1e-3).outcome()
    assert abs(ref.loss - first.loss) <= 1e-5 * ref.loss and abs(ref.grad_norm - first.grad_norm) <= 1e-4 * ref.grad_norm


@pytest.mark.parametrize("flag", ["nll", "softmax", "norm", "rope"])
def test_hand_written_backward_equals_autodiff(pynative_after, flag):
    """The loss's hand-written backward ((softmax - onehot) * mask), the attention softmax's (row sums by a
    MatMul) and the RMSNorms' (outer products by MatMuls) give autodiff's gradients up to rounding, and their
    forwards the same bits (ignored targets included); so do the rope tables broadcast once to full shape."""
    from mindspore import Tensor
    from telechat_ms.train.step import LossAndGrads, LossSum
    model, params, _, _, positions = _setup(1)
    model.set_train(True)  # as the trainer runs it (the attention's full-shape mask is a training-mode path)
    micro, _ = _micro(1)
    labels = micro[0]["labels"].copy()
    labels[0, 3:7] = -100
    cos, sin, mask = positions(micro[0])
    args = (Tensor(micro[0]["input_ids"]), Tensor(labels), cos, sin, mask, Tensor(np.float32(1.0)))
    rng = np.random.default_rng(5)
    for _, cell in model.cells_and_names():  # norm weights other than their initial ones, so w's terms count
        if hasattr(cell, "hand_bprop"):
            cell.weight.set_data(Tensor(rng.uniform(0.5, 1.5, cell.weight.shape).astype(np.float32)))

    def set_flag(on: bool) -> None:
        if flag == "nll":
            model.nll_bprop = on
        for layer in model.model.layers:
            layer.attention.softmax_bprop = on if flag == "softmax" else True
            layer.attention.rotary.full_tables = on if flag == "rope" else True
        for _, cell in model.cells_and_names():
            if hasattr(cell, "hand_bprop"):
                cell.hand_bprop = on if flag == "norm" else True

    set_flag(True)
    loss_new, grads_new = LossAndGrads(LossSum(model), params)(*args)
    set_flag(False)
    loss_old, grads_old = LossAndGrads(LossSum(model), params)(*args)
    assert loss_new.asnumpy().tobytes() == loss_old.asnumpy().tobytes()
    for p, a, b in zip(params, grads_new, grads_old):
        scale = float(np.abs(b.asnumpy()).max())  # fp32 sums of per-token terms: rounding scales with the largest
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-5 * scale, err_msg=p.name)
    assert max(float(np.abs(g.asnumpy()).max()) for g in grads_new) > 1e-2


def test_global_norm_is_exact_at_a_7b_weight_size(pynative_after):
    """The norm's sum of squares over one 7B FFN weight (4096 x 11008, 45M elements) stays within 1e-6 of the
    float64 sum: a whole-tensor fp32 sum drifts by up to 12% there (L2Loss's serial sum, measured), which would
    misreport the norm and clip by the wrong factor."""
    import mindspore as ms
    from mindspore import Tensor, nn
    from telechat_ms.train.step import _square_sum

    class SquareSum(nn.Cell):
        def construct(self, x):
            return _square_sum(x)

    ms.set_context(mode=ms.GRAPH_MODE)
    x = (np.random.default_rng(0).standard_normal((4096, 11008)) * 1e-3).astype(np.float32)
    exact = float((x.astype(np.float64) ** 2).sum())
    got = float(SquareSum()(Tensor(x)).asnumpy())
    assert abs(got - exact) <= 1e-6 * exact
