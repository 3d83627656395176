"""The MoE FFN of TeleChat2-39B-A12B (spec 12) on a tiny MoE: the MindSpore model against the torch reference
(logits, experts chosen, capacity drops, aux loss) and against MindFormers' own MoE layer (MoEV2 + TopkRouterV2)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ms = pytest.importorskip("mindspore")

from telechat_ms.config import TeleChatConfig  # noqa: E402
from telechat_ms.model.moe import TeleChatMoE, expert_capacity  # noqa: E402
from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402
from telechat_ms.reference.parity import run_parity  # noqa: E402
from telechat_ms.reference.torch_model import TeleChatRef  # noqa: E402
from telechat_ms.reference.torch_moe import capacity_of, kept_choices  # noqa: E402


def _hidden(seed: int = 0, batch: int = 2, seq: int = 16, hidden: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, seq, hidden)).astype(np.float32)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def pair(tiny_moe_ckpt):
    """(MindSpore model, torch reference) of the tiny MoE checkpoint."""
    return TeleChatForCausalLM.from_pretrained(tiny_moe_ckpt), TeleChatRef.from_pretrained(tiny_moe_ckpt)


@pytest.mark.parametrize("seq_len", [16, 96])  # 96 = 3 x training_seqlen: NTK scaling on
def test_moe_logits_match_reference(tiny_moe_ckpt, seq_len):
    result = run_parity(tiny_moe_ckpt, seq_len=seq_len, batch_size=2, atol=1e-5)
    assert result["max_abs"] <= 1e-5, result
    assert result["loss_delta"] <= 1e-5, result
    assert result["greedy_agreement"] == 1.0


def test_moe_config_and_preset():
    cfg = TeleChatConfig.preset("telechat2_39b_a12b")
    assert (cfg.n_layer, cfg.hidden_size, cfg.n_head, cfg.num_key_value_heads) == (30, 4096, 32, 32)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.ffn_hidden_size, cfg.norm_topk_prob) == (16, 4, 6144, True)
    assert abs(cfg.num_parameters() / 39.3e9 - 1) < 0.005
    assert abs(cfg.num_parameters(active=True) / 12.1e9 - 1) < 0.005
    hf = cfg.to_hf_dict()
    assert (hf["num_experts"], hf["num_experts_per_tok"], hf["norm_topk_prob"]) == (16, 4, True)
    assert "capacity_factor" not in hf and "aux_loss_factor" not in hf
    assert "num_experts" not in TeleChatConfig.preset("7b").to_hf_dict()  # dense config.json as released
    assert TeleChatConfig.from_dict(hf) == cfg
    mixtral_names = {**hf, "num_local_experts": 16, "num_experts_chosen": 4}
    assert TeleChatConfig.from_dict(mixtral_names) == cfg


@pytest.mark.parametrize("bad", [{"num_experts_per_tok": 9}, {"shared_expert_num": 1},
                                 {"moe_intermediate_size": 100}])
def test_moe_config_rejects(bad):
    from telechat_ms.errors import ConfigError
    hf = TeleChatConfig.preset("tiny_moe").to_hf_dict()
    with pytest.raises(ConfigError, match=next(iter(bad)) if "shared" not in next(iter(bad)) else "shared"):
        TeleChatConfig.from_dict({**hf, **bad})


def test_routing_picks_the_same_experts(pair):
    model, ref = pair
    for i in range(model.config.n_layer):
        x = _hidden(seed=i)
        probs, gate, idx = model.model.layers[i].feed_forward.route(ms.Tensor(x.reshape(-1, 64)))
        r_probs, r_gate, r_idx = ref.transformer.h[i].mlp.route(torch.from_numpy(x.reshape(-1, 64)))
        np.testing.assert_array_equal(idx.asnumpy(), r_idx.numpy())
        np.testing.assert_allclose(gate.asnumpy(), r_gate.numpy(), atol=1e-6)
        np.testing.assert_allclose(gate.asnumpy().sum(-1), 1.0, atol=1e-6)  # renormalized top-k
        assert len(set(idx.asnumpy().reshape(-1).tolist())) == 8  # the test routes to every expert


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_limited_step_drops_what_the_rule_says(pair, factor):
    """A training forward caps each expert at ceil(k N factor / E) choices served k-major; the dropped ones and the
    tokens per expert are reported; outputs and aux loss equal the reference under the same rule."""
    model, ref = pair
    layer = model.model.layers[0].feed_forward
    layer.cfg = model.config.replace(capacity_factor=factor, aux_loss_factor=0.01)
    layer.aux_factor = 0.01
    try:
        x = _hidden(seed=5)
        out, aux = layer.construct_aux(ms.Tensor(x))
        r_out, r_aux, r_counts, r_dropped = ref.transformer.h[0].mlp.forward_stats(
            torch.from_numpy(x), capacity_factor=factor, aux_factor=0.01)
        n = x.shape[0] * x.shape[1]
        cap = expert_capacity(layer.cfg, n)
        assert cap == capacity_of(n, 2, 8, factor) == -(-2 * n * factor // 8)
        _, _, idx = ref.transformer.h[0].mlp.route(torch.from_numpy(x.reshape(-1, 64)))
        counts = np.bincount(idx.numpy().reshape(-1), minlength=8)
        expected_dropped = int(np.maximum(counts - cap, 0).sum())  # every choice past an expert's capacity
        assert expected_dropped > 0 and r_dropped == expected_dropped
        assert int(kept_choices(idx, 8, cap).logical_not().sum()) == expected_dropped
        assert float(layer.router_dropped.asnumpy()[0]) == expected_dropped
        np.testing.assert_array_equal(layer.router_tokens.asnumpy(), counts)
        np.testing.assert_allclose(out.asnumpy(), r_out.numpy(), atol=1e-5)
        np.testing.assert_allclose(float(aux.asnumpy()), float(r_aux), rtol=1e-5)
        # inference never drops: the same input without capacity differs exactly where choices were dropped
        full = layer(ms.Tensor(x)).asnumpy().reshape(n, -1)
        keep = kept_choices(idx, 8, cap).all(dim=1).numpy()
        np.testing.assert_allclose(full[keep], out.asnumpy().reshape(n, -1)[keep], atol=1e-6)
        assert np.abs(full[~keep] - out.asnumpy().reshape(n, -1)[~keep]).min() > 0
    finally:
        layer.cfg = model.config
        layer.aux_factor = 0.0


def _mindformers_moe(ours: TeleChatMoE, capacity_factor: float, dp: int = 1):
    """MindFormers' MoEV2 with TopkRouterV2 (research/telechat2's MoE), our router weights, our stacked experts as
    its ffn (MindFormers' expert Linear needs a 4-D broadcast BatchMatMul that CPU MindSpore refuses)."""
    from mindspore import nn
    from mindformers.modules.transformer.moe import MoEConfig, MoEV2
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig

    class Experts(nn.Cell):
        def __init__(self, experts, num):
            super().__init__()
            self.experts, self.num = experts, num

        def construct(self, x):  # MoEV2 hands [dp, E * capacity, H]; ours take [E, dp * capacity, H]
            g, _, h = x.shape
            y = self.experts(x.reshape(g, self.num, -1, h).transpose(1, 0, 2, 3).reshape(self.num, -1, h))
            return y.reshape(self.num, g, -1, h).transpose(1, 0, 2, 3).reshape(x.shape)

    cfg = MoEConfig(expert_num=8, num_experts_chosen=2, capacity_factor=capacity_factor,
                    routing_policy="TopkRouterV2", norm_topk_prob=True, use_fused_ops_topkrouter=False,
                    router_dense_type="float32", aux_loss_types=["expert"], aux_loss_factors=[0.01])
    mf = MoEV2(ffn=Experts(ours.ffn, 8), dim=64, moe_config=cfg,
               parallel_config=TransformerOpParallelConfig(data_parallel=dp),
               return_extra_loss=True)
    mf.router.dense.weight.set_data(ours.router.dense.weight.data)
    return mf


@pytest.mark.parametrize("factor,dp", [(4.0, 1), (0.5, 1), (0.5, 2)])  # 4.0: no drop; dp 2: routed per shard
def test_moe_layer_equals_mindformers_moev2(pair, factor, dp):
    model, _ = pair
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    layer = model.model.layers[1].feed_forward
    layer.cfg = model.config.replace(capacity_factor=factor)
    layer.aux_factor = 0.01
    layer.groups = dp
    try:
        x = _hidden(seed=7)
        mf_out, mf_aux = _mindformers_moe(layer, factor, dp)(ms.Tensor(x.reshape(-1, 64)))
        out, aux = layer.construct_aux(ms.Tensor(x))
        np.testing.assert_allclose(out.asnumpy(), mf_out.asnumpy().reshape(x.shape), atol=1e-6)
        np.testing.assert_allclose(float(aux.asnumpy()), float(mf_aux.asnumpy()), rtol=1e-5)
        if factor > 1:
            np.testing.assert_allclose(layer(ms.Tensor(x)).asnumpy(), out.asnumpy(), atol=1e-6)
    finally:
        layer.cfg = model.config
        layer.aux_factor = 0.0
        layer.groups = 1
        ms.set_context(mode=mode)
