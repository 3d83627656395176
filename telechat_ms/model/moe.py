"""The MoE FFN of TeleChat2-39B-A12B (spec 12) in MindSpore primitives: the router, the stacked experts and the
token dispatch / combine. layers.feed_forward puts it in a decoder layer in place of the dense MLP when
cfg.num_experts > 1. Every primitive is an attribute, so telechat_ms.parallel can attach shard strategies.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn
from mindspore.common.initializer import Normal, initializer
from mindspore.ops import operations as P

from telechat_ms.backend import Linear, LlamaSiLU, ms_dtype
from telechat_ms.config import TeleChatConfig


def expert_capacity(cfg: TeleChatConfig, tokens: int, model_parallel: int = 1) -> int:
    """Slots per expert: every token (no dropping) unless cfg.capacity_factor > 0, then MindFormers' rule
    min(ceil(k * tokens * factor / experts), tokens), rounded up to a multiple of model_parallel."""
    if cfg.capacity_factor <= 0:
        return tokens
    cap = min(math.ceil(cfg.num_experts_per_tok * tokens * cfg.capacity_factor / cfg.num_experts), tokens)
    return cap + (-cap) % model_parallel


class ExpertLinear(nn.Cell):
    """num_experts [out, in] matrices stacked as one [E, out, in] weight (+ a [1, E, 1, out] bias), the layout of
    MindFormers' expert Linear, applied with one 3-D BatchMatMul (MindFormers' 4-D broadcast form fails on CPU)."""

    def __init__(self, cfg: TeleChatConfig, n_in: int, n_out: int, has_bias: bool):
        super().__init__()
        e = cfg.num_experts
        self.weight = Parameter(initializer(Normal(sigma=cfg.initializer_range), (e, n_out, n_in),
                                            ms_dtype(cfg.param_dtype)), name="weight")
        self.has_bias = has_bias
        if has_bias:
            self.bias = Parameter(ms.Tensor(np.zeros((1, e, 1, n_out), np.float32), ms_dtype(cfg.param_dtype)),
                                  name="bias")
            self.bias_add = P.Add()
        self.matmul = P.BatchMatMul(transpose_b=True)
        self.compute_dtype = ms_dtype(cfg.compute_dtype)
        self.cast = P.Cast()
        self.reshape = P.Reshape()

    def construct(self, x):
        """x [E, C, in] -> [E, C, out]."""
        out = self.matmul(self.cast(x, self.compute_dtype), self.cast(self.weight, self.compute_dtype))
        if self.has_bias:  # in the bias's own [1, E, 1, out] layout (its shard strategy splits E)
            shape = out.shape
            out = self.bias_add(self.reshape(out, (1, *shape)), self.cast(self.bias, self.compute_dtype))
            out = self.reshape(out, shape)
        return out


class TeleChatExperts(nn.Cell):
    """num_experts SwiGLU FFNs stacked on a leading expert axis, weights as the NPU release stacks them:
    w1 / w3 [E, F, H], w2 [E, H, F], w2.bias [1, E, 1, H]."""

    def __init__(self, cfg: TeleChatConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.w1 = ExpertLinear(cfg, h, f, has_bias=False)  # gate_proj of every expert
        self.w3 = ExpertLinear(cfg, h, f, has_bias=False)  # up_proj
        self.w2 = ExpertLinear(cfg, f, h, has_bias=True)   # down_proj (+ bias)
        self.silu = LlamaSiLU()
        self.mul = P.Mul()

    def construct(self, x):
        """x [E, C, H] (the tokens dispatched to each expert) -> [E, C, H]."""
        return self.w2(self.mul(self.silu(self.w1(x)), self.w3(x)))


class MoERouter(nn.Cell):
    """The router: a bias-free hidden -> num_experts dense computed in fp32 (MindFormers' router.dense)."""

    def __init__(self, cfg: TeleChatConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.num_experts, has_bias=False, init_method_std=cfg.initializer_range,
                            transpose_b=True, param_init_type=ms.float32, compute_dtype=ms.float32)
        self.cast = P.Cast()

    def construct(self, x):
        return self.dense(self.cast(x, ms.float32))


class TeleChatMoE(nn.Cell):
    """The MoE FFN of TeleChat2-39B-A12B: fp32 softmax router, top-k experts per token (renormalized when
    norm_topk_prob), tokens gathered into per-expert slots, the stacked experts, and a weighted combine.

    Slot order follows MindFormers' TopkRouterV2 (k-major priority: every token's first choice before any second
    choice, tokens in order). Inference forwards give every expert a slot per token, so nothing is dropped;
    training forwards (construct_aux) cap slots at expert_capacity and drop the overflow (its share is 0, the
    residual carries the token), return the load-balancing loss, and keep router statistics of the last
    training forward in router_tokens (tokens routed per expert), router_dropped (choices dropped) and router_aux
    (its load-balancing loss): state, not weights (requires_grad False, never in a model checkpoint).
    """

    def __init__(self, cfg: TeleChatConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.hidden = cfg.hidden_size
        self.norm_topk_prob = cfg.norm_topk_prob and cfg.num_experts_per_tok > 1
        self.aux_factor = float(cfg.aux_loss_factor)
        self.model_parallel = 1  # telechat_ms.parallel rounds training capacity to its model_parallel
        self.groups = 1          # routing groups (telechat_ms.parallel: the data-parallel shards of the tokens)
        self.router = MoERouter(cfg)
        self.ffn = TeleChatExperts(cfg)
        self.router_tokens = Parameter(ms.Tensor(np.zeros(cfg.num_experts, np.float32)), name="router_tokens",
                                       requires_grad=False)
        self.router_dropped = Parameter(ms.Tensor(np.zeros(1, np.float32)), name="router_dropped",
                                        requires_grad=False)
        self.router_aux = Parameter(ms.Tensor(np.zeros(1, np.float32)), name="router_aux", requires_grad=False)
        self.reshape = P.Reshape()
        self.cast = P.Cast()
        self.softmax = P.Softmax(axis=-1)
        self.topk = P.TopK(sorted=True)
        self.gate_sum = P.ReduceSum(keep_dims=True)
        self.gate_div = P.RealDiv()
        self.transpose_idx = P.Transpose()
        self.onehot = P.OneHot()
        self.cumsum = P.CumSum()
        self.pos_mul = P.Mul()
        self.pos_sum = P.ReduceSum()
        self.less_equal = P.LessEqual()
        self.slot_mul = P.Mul()
        self.slot_add = P.Add()
        self.keep_select = P.Select()
        self.slot_off = P.Add()
        self.scatter = P.ScatterNd()
        self.concat_x = P.Concat(axis=1)
        self.gather_in = P.Gather(batch_dims=1)
        self.transpose_in = P.Transpose()
        self.transpose_back = P.Transpose()
        self.concat_out = P.Concat(axis=1)
        self.transpose_slot = P.Transpose()
        self.gather_out = P.Gather(batch_dims=1)
        self.coeff_mul = P.Mul()
        self.combine_sum = P.ReduceSum()
        self.mean_probs = P.ReduceMean()
        self.mean_load = P.ReduceMean()
        self.aux_mul = P.Mul()
        self.aux_sum = P.ReduceSum()
        self.aux_scale = P.Mul()
        self.count_sum = P.ReduceSum()
        self.kept_sum = P.ReduceSum()
        self.assign_tokens = P.Assign()
        self.assign_dropped = P.Assign()
        self.assign_aux = P.Assign()

    def route(self, x2d):
        """(router probabilities [N, E] fp32, chosen weights [N, k] fp32, chosen experts [N, k] int32)."""
        probs = self.softmax(self.router(x2d))
        gate, idx = self.topk(probs, self.top_k)
        if self.norm_topk_prob:
            gate = self.gate_div(gate, self.gate_sum(gate, -1))
        return probs, gate, self.cast(idx, ms.int32)

    def dispatch(self, x2d, idx, cap: int):
        """Tokens into expert slots, per routing group (self.groups equal runs of tokens; MindFormers routes per
        data-parallel shard): (expert inputs [E, G * cap, H] (expert e's slots of group g at g * cap..), the slot
        of every choice in its group [G, kn] (k-major; a dropped choice gets E * cap, which holds zeros), kept
        [G, kn] bool, expert one-hot of the choices [G, kn, E])."""
        g, e, k = self.groups, self.num_experts, self.top_k
        n = x2d.shape[0] // g
        flat = self.reshape(self.transpose_idx(self.reshape(idx, (g, n, k)), (0, 2, 1)), (g, k * n))
        mask = self.onehot(flat, e, ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32))  # [G, kn, E]
        position = self.pos_sum(self.pos_mul(self.cumsum(mask, 1), mask), -1)               # 1-based, [G, kn]
        keep = self.less_equal(position, float(cap))
        slot = self.cast(self.slot_add(self.slot_mul(self.cast(flat, ms.float32), float(cap)), position - 1.0),
                         ms.int32)
        slot = self.keep_select(keep, slot, ms.Tensor(np.full((g, k * n), e * cap, np.int32)))
        # one scatter for every group: group g's slots at g * (E cap + 1) + slot, its 1-based local token ids
        where = self.slot_off(slot, ms.Tensor((np.arange(g, dtype=np.int32) * (e * cap + 1))[:, None]))
        tokens = ms.Tensor(np.tile(np.arange(1, n + 1, dtype=np.int32), (g, k)).reshape(-1))
        dispatch = self.scatter(self.reshape(where, (g * k * n, 1)), tokens, (g * (e * cap + 1),))
        dispatch = self.reshape(dispatch, (g, e * cap + 1))[:, :e * cap]                    # 0 = empty slot
        x_pad = self.concat_x((ms.ops.zeros((g, 1, self.hidden), x2d.dtype), self.reshape(x2d, (g, n, self.hidden))))
        local = self.reshape(self.gather_in(x_pad, dispatch, 1), (g, e, cap, self.hidden))  # [G, E, cap, H]
        expert_in = self.reshape(self.transpose_in(local, (1, 0, 2, 3)), (e, g * cap, self.hidden))
        return expert_in, slot, keep, mask

    def combine(self, expert_out, slot, gate):
        """Expert outputs [E, G * cap, H] back to tokens [N, H]: each token's k outputs weighted by its gate."""
        g, e, k = self.groups, self.num_experts, self.top_k
        cap = expert_out.shape[1] // g
        n = gate.shape[0] // g
        local = self.reshape(self.transpose_back(self.reshape(expert_out, (e, g, cap, self.hidden)), (1, 0, 2, 3)),
                             (g, e * cap, self.hidden))
        out_pad = self.concat_out((local, ms.ops.zeros((g, 1, self.hidden), expert_out.dtype)))
        order = self.reshape(self.transpose_slot(self.reshape(slot, (g, k, n)), (0, 2, 1)), (g, n * k))
        picked = self.reshape(self.gather_out(out_pad, order, 1), (g, n, k, self.hidden))
        coeff = self.reshape(self.cast(gate, picked.dtype), (g, n, k, 1))
        return self.reshape(self.combine_sum(self.coeff_mul(picked, coeff), 2), (g * n, self.hidden))

    def _moe(self, x, capacity_factor_on):
        shape = x.shape
        n = shape[0] * shape[1]
        x2d = self.reshape(x, (n, self.hidden))
        probs, gate, idx = self.route(x2d)
        tokens = n // self.groups
        cap = expert_capacity(self.cfg, tokens, self.model_parallel) if capacity_factor_on else tokens
        expert_in, slot, keep, mask = self.dispatch(x2d, idx, cap)
        out = self.combine(self.ffn(expert_in), slot, gate)
        return self.reshape(self.cast(out, x.dtype), shape), probs, mask, keep

    def construct(self, x):
        """Inference: x [B, S, H] -> [B, S, H], no token dropped."""
        return self._moe(x, False)[0]

    def construct_aux(self, x):
        """Training: (output, load-balancing loss) with capacity dropping; records the router statistics."""
        out, probs, mask, keep = self._moe(x, True)
        # MindFormers' "expert" loss: factor * E * sum_e P_e * f_e, P = mean router probability, f = load share
        g, e = self.groups, self.num_experts
        load = self.mean_load(mask, 1)                                                   # [G, E]
        share = self.mean_probs(self.reshape(probs, (g, probs.shape[0] // g, e)), 1)     # [G, E]
        aux = self.aux_scale(self.aux_sum(self.aux_mul(share, load)), self.aux_factor * e / g)  # mean over groups
        counts = self.count_sum(mask, (0, 1))
        dropped = self.reshape(float(keep.size) - self.kept_sum(self.cast(keep, ms.float32)), (1,))
        aux = ms.ops.depend(aux, self.assign_tokens(self.router_tokens, ms.ops.stop_gradient(counts)))
        aux = ms.ops.depend(aux, self.assign_dropped(self.router_dropped, ms.ops.stop_gradient(dropped)))
        aux = ms.ops.depend(aux, self.assign_aux(self.router_aux, ms.ops.stop_gradient(self.reshape(aux, (1,)))))
        return out, aux
