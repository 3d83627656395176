"""Expert parallelism for TeleChat2-39B-A12B, proven on CPU: every MoE primitive gets a strategy under semi-auto with
expert_parallel 2 and 4 (read back from the primitives), the parameter splits follow, and a single-process emulation
of the expert shards (dispatch, expert compute with experts split by ep and the FFN by mp, combine) equals the
unsharded layer. (semi_auto_parallel itself needs Ascend: MindSpore refuses it on CPU.)"""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from telechat_ms.config import TeleChatConfig  # noqa: E402
from telechat_ms.model.moe import TeleChatMoE  # noqa: E402
from telechat_ms.parallel.layout import ParallelDims, check_layout  # noqa: E402
from telechat_ms.parallel.strategies import (apply_strategies, parameter_splits, recorded_strategies,  # noqa: E402
                                             strategy_table)

CFG = TeleChatConfig.preset("tiny_moe", vocab_size=256, hidden_size=64, ffn_hidden_size=96)


def _moe_primitives(model) -> set[str]:
    """Every primitive of every MoE cell except reshapes, casts and the statistics' assigns (no strategy needed)."""
    out = set()
    for name, cell in model.cells_and_names():
        if ".feed_forward" not in name:
            continue
        for attr, prim in getattr(cell, "_primitives", {}).items():
            if prim is None or type(prim).__name__ in ("Reshape", "Cast", "Assign", "Shape"):
                continue
            out.add(f"{name}.{attr}")
    return out


@pytest.mark.parametrize("ep,dp,mp,sp", [(2, 2, 1, False), (4, 4, 2, False), (2, 4, 2, True)])
def test_every_moe_primitive_has_a_strategy(ep, dp, mp, sp):
    from telechat_ms.model.telechat import TeleChatForCausalLM
    model = TeleChatForCausalLM(CFG)
    dims = ParallelDims(dp=dp, mp=mp, ep=ep, sp=sp)
    table = strategy_table(CFG, dims)
    apply_strategies(model, table)
    recorded = recorded_strategies(model)
    missing = _moe_primitives(model) - set(recorded)
    assert not missing, sorted(missing)
    tr = dp * (mp if sp else 1)
    layer = "model.layers.1.feed_forward."
    dm = dp // ep
    assert recorded[layer + "ffn.w1.matmul"].inputs == ((ep, dm, 1), (ep, mp, 1))
    assert recorded[layer + "ffn.w2.matmul"].inputs == ((ep, dm, mp), (ep, 1, mp))
    assert recorded[layer + "gather_in"].inputs == ((tr, 1, 1), (tr, 1))
    assert recorded[layer + "router.dense.matmul"].inputs == ((tr, 1), (1, 1))
    assert recorded[layer + "gather_out"].inputs == ((tr, 1, 1), (tr, 1))
    for path, shard in recorded.items():  # no strategy uses more devices than the layout has
        for split in shard.inputs:
            n = 1
            for d in split:
                n *= d
            assert n <= dims.world, (path, split)
    splits = parameter_splits([p.name for p in model.get_parameters() if p.requires_grad], table)
    assert splits[layer + "ffn.w1.weight"] == (ep, mp, 1)          # [E, F, H]: experts by ep, F by mp
    assert splits[layer + "ffn.w2.weight"] == (ep, 1, mp)          # [E, H, F]
    assert splits[layer + "ffn.w2.bias"] == (1, ep, 1, 1)          # [1, E, 1, H]
    assert splits[layer + "router.dense.weight"] == (1, 1)
    for name, shape in ((p.name, p.shape) for p in model.get_parameters() if "ffn.w" in p.name):
        assert all(s % d == 0 for s, d in zip(shape, splits[name])), name  # the splits are whole


def test_layout_checks_expert_parallel():
    big = TeleChatConfig.preset("telechat2_39b_a12b")
    ok = check_layout(big, ParallelDims(dp=4, mp=2, ep=4), 8192)
    assert not [i for i in ok if i.level == "error"]
    bad = [i.message for i in check_layout(big, ParallelDims(dp=6, mp=1, ep=3), 8192) if i.level == "error"]
    assert any("expert_parallel 3 does not divide num_experts 16" in m for m in bad)
    bad = [i.message for i in check_layout(big, ParallelDims(dp=2, mp=1, ep=4), 8192) if i.level == "error"]
    assert any("does not divide data_parallel 2" in m for m in bad)
    dense = TeleChatConfig.preset("7b")
    assert any("needs an MoE model" in i.message for i in check_layout(dense, ParallelDims(dp=2, ep=2), 8192))


def _swiglu(x, w1, w3, w2, b2):
    g = x @ w1.T
    return ((g / (1 + np.exp(-g))) * (x @ w3.T)) @ w2.T + b2


@pytest.mark.parametrize("ep,mp,factor,groups", [(2, 1, 0.0, 1), (4, 2, 0.0, 4), (4, 2, 0.75, 4), (2, 2, 0.75, 8)])
def test_expert_shards_emulated_equal_the_unsharded_layer(ep, mp, factor, groups):
    """Rank (r, m) holds experts r*E/ep.. and the m-th F/mp slice of each: it computes its slots' partial w2 sums;
    the mp partial sums reduce, the ep shards gather, and the combine gives the layer's output. With routing groups
    (the data shards) and no capacity, the grouped layer equals the one-group layer exactly."""
    ms.set_seed(3)
    layer = TeleChatMoE(CFG.replace(capacity_factor=factor))
    one_group = layer(ms.Tensor(np.random.default_rng(0).normal(size=(2, 16, 64)).astype(np.float32))).asnumpy()
    layer.groups = groups
    x = np.random.default_rng(0).normal(size=(2, 16, 64)).astype(np.float32)
    full = (layer.construct_aux(ms.Tensor(x))[0] if factor else layer(ms.Tensor(x))).asnumpy()
    x2d = ms.Tensor(x.reshape(-1, 64))
    _, gate, idx = layer.route(x2d)
    n = x2d.shape[0]
    from telechat_ms.model.moe import expert_capacity
    cap = expert_capacity(layer.cfg, n // groups) if factor else n // groups
    if not factor:
        np.testing.assert_allclose(full, one_group, atol=1e-6)
    expert_in, slot, _, _ = layer.dispatch(x2d, idx, cap)           # the dispatch every rank computes
    expert_in = expert_in.asnumpy()
    w1, w3 = layer.ffn.w1.weight.asnumpy(), layer.ffn.w3.weight.asnumpy()
    w2, b2 = layer.ffn.w2.weight.asnumpy(), layer.ffn.w2.bias.asnumpy()[0, :, 0]
    e_per, f_per = 8 // ep, 96 // mp
    shards = []
    for r in range(ep):
        experts = range(r * e_per, (r + 1) * e_per)
        out = np.zeros((e_per, groups * cap, 64), np.float32)
        for m in range(mp):                                         # row-parallel w2: partial sums over F
            fs = slice(m * f_per, (m + 1) * f_per)
            for j, e in enumerate(experts):
                g = expert_in[e] @ w1[e, fs].T
                out[j] += ((g / (1 + np.exp(-g))) * (expert_in[e] @ w3[e, fs].T)) @ w2[e][:, fs].T
        shards.append(out + b2[list(experts), None, :])
    gathered = np.concatenate(shards)                               # the combine's all-gather over ep
    combined = layer.combine(ms.Tensor(gathered), slot, gate).asnumpy().reshape(x.shape)
    np.testing.assert_allclose(combined, full, atol=1e-5)
    unsharded = np.stack([_swiglu(expert_in[e], w1[e], w3[e], w2[e], b2[e]) for e in range(8)])
    np.testing.assert_allclose(gathered, unsharded, atol=1e-5)
