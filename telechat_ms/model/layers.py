"""TeleChat2 decoder layer in MindSpore on MindFormers' legacy blocks (Linear, LlamaRMSNorm).

Parameter names follow the public MindSpore port (attention.wq / wk_v / wo, feed_forward.w1 / w2 / w3,
attention_norm, ffn_norm) so its checkpoints load as they are. Every primitive is an attribute so that
telechat_ms.parallel can attach shard strategies without touching this file.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn
from mindspore.common.initializer import Normal, initializer
from mindspore.ops import operations as P

from telechat_ms.backend import FlashAttention, Linear, LlamaRMSNorm, LlamaSiLU, ms_dtype
from telechat_ms.config import TeleChatConfig
from telechat_ms.positions import compressed_causal_mask

MASK_VALUE = -1e9  # added to masked attention scores in fp32; exp() of it is exactly 0
_COMPRESSED_MASK: list = []


def _compressed_mask() -> ms.Tensor:
    """The kernel's 2048 x 2048 causal mask, one Tensor shared by every layer."""
    if not _COMPRESSED_MASK:
        _COMPRESSED_MASK.append(ms.Tensor(compressed_causal_mask(), ms.uint8))
    return _COMPRESSED_MASK[0]


def rms_norm(cfg: TeleChatConfig, dim: int) -> LlamaRMSNorm:
    """RMSNorm computed in fp32 and cast back (fused Ascend kernel when cfg.fused_rms_norm)."""
    return LlamaRMSNorm(dim, eps=cfg.layer_norm_epsilon, compute_type=ms.float32, fused_kernel=cfg.fused_rms_norm)


def linear(cfg: TeleChatConfig, n_in: int, n_out: int, has_bias: bool) -> Linear:
    """A [out, in] (transpose_b) Linear, in the config's parameter and compute dtypes."""
    return Linear(n_in, n_out, has_bias=has_bias, init_method_std=cfg.initializer_range, transpose_b=True,
                  param_init_type=ms_dtype(cfg.param_dtype), compute_dtype=ms_dtype(cfg.compute_dtype))


class RotaryEmbedding(nn.Cell):
    """q*cos + rotate_half(q)*sin with precomputed (NTK + mscale) tables; rotate_half by slicing (CPU-safe)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.split = P.Split(axis=-1, output_num=2)
        self.neg = P.Neg()
        self.concat = P.Concat(axis=-1)
        self.mul_cos = P.Mul()
        self.mul_sin = P.Mul()
        self.add = P.Add()
        self.cast = P.Cast()

    def construct(self, x, cos, sin):
        dtype = x.dtype
        cos = self.cast(cos, dtype)
        sin = self.cast(sin, dtype)
        x1, x2 = self.split(x)
        rotated = self.concat((self.neg(x2), x1))
        return self.add(self.mul_cos(x, cos), self.mul_sin(rotated, sin))


class TeleChatAttention(nn.Cell):
    """GQA self-attention with the fused, per-head interleaved key_value projection (wk_v) and a biased wo."""

    def __init__(self, cfg: TeleChatConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.n_rep = cfg.n_rep
        self.hidden = cfg.hidden_size
        self.use_flash_attention = cfg.use_flash_attention
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.wq = linear(cfg, cfg.hidden_size, cfg.hidden_size, has_bias=False)
        self.wk_v = linear(cfg, cfg.hidden_size, 2 * self.n_kv * self.head_dim, has_bias=False)
        self.wo = linear(cfg, cfg.hidden_size, cfg.hidden_size, has_bias=True)
        self.rotary = RotaryEmbedding(self.head_dim)
        self.reshape = P.Reshape()
        self.transpose_q = P.Transpose()
        self.transpose_k = P.Transpose()
        self.transpose_v = P.Transpose()
        self.transpose_out = P.Transpose()
        self.split_kv = P.Split(axis=-1, output_num=2)  # [.., K, 2d] -> key = first d, value = last d
        self.tile_kv = P.Tile()
        self.cast = P.Cast()
        if self.use_flash_attention:
            self.flash_attention = FlashAttention(head_num=self.n_head, scale_value=self.scale, input_layout="BNSD",
                                                  sparse_mode=0, use_attention_mask=True)
            # packed rows (positions.VARLEN): tokens of the whole batch in TND layout, samples delimited by
            # actual_seq_len, causal inside each through the compressed mask (sparse_mode 3, as MindFormers does)
            self.flash_attention_varlen = FlashAttention(head_num=self.n_head, scale_value=self.scale,
                                                         next_tokens=0, input_layout="TND", sparse_mode=3,
                                                         use_attention_mask=True, use_actual_seqlen=True)
            self.compressed_mask = _compressed_mask()
            self.transpose_tnd_q = P.Transpose()
            self.transpose_tnd_k = P.Transpose()
            self.transpose_tnd_v = P.Transpose()
        else:
            self.qk_matmul = P.BatchMatMul(transpose_b=True)
            self.mul_scale = P.Mul()
            self.mask_mul = P.Mul()
            self.mask_add = P.Add()
            self.softmax = P.Softmax(axis=-1)
            self.pv_matmul = P.BatchMatMul()
        # kv-cache path (inference only; no parameters): in-place scatter into the caches, grouped attention
        self.cache_update = P.ScatterNdUpdate()
        # The model-parallel predict configuration (telechat_ms.parallel) shards the caches by kv head and writes
        # with ScatterNdAdd into slots its stepper has zeroed: MindSpore cannot split the dimensions a
        # ScatterNdUpdate indexes (the kv head is one of them), a ScatterNdAdd it can.
        self.cache_add = P.ScatterNdAdd()
        self.cache_write_by_add = False
        # The cache's last slot is the scratch slot: schedulers send the columns that carry no token there (any
        # number of them). ScatterNdAdd would sum them into it, so on that path their values are zeroed first.
        self.write_slot = P.Split(axis=-1, output_num=3)   # (row, kv head, slot) -> the slot column
        self.not_scratch = P.NotEqual()
        self.write_cast = P.Cast()
        self.write_mul_k = P.Mul()
        self.write_mul_v = P.Mul()
        self.cache_qk = P.BatchMatMul(transpose_b=True)
        self.cache_pv = P.BatchMatMul()
        self.mul_scale_c = P.Mul()
        self.mask_mul_c = P.Mul()
        self.mask_add_c = P.Add()
        self.softmax_c = P.Softmax(axis=-1)

    def _repeat_kv(self, x, bs, seq):
        """[B, K, S, d] -> [B, K*n_rep, S, d]: query head j reads kv head j // n_rep."""
        if self.n_rep == 1:
            return x
        x = self.reshape(x, (bs, self.n_kv, 1, seq, self.head_dim))
        x = self.tile_kv(x, (1, 1, self.n_rep, 1, 1))
        return self.reshape(x, (bs, self.n_head, seq, self.head_dim))

    def _project(self, x, cos, sin):
        """q [B, N, S, d], k and v [B, K, S, d], with RoPE applied to q and k (keys are cached after rotation)."""
        bs, seq, _ = x.shape
        q = self.reshape(self.wq(x), (bs, seq, self.n_head, self.head_dim))
        kv = self.reshape(self.wk_v(x), (bs, seq, self.n_kv, 2 * self.head_dim))
        k, v = self.split_kv(kv)
        q = self.transpose_q(q, (0, 2, 1, 3))
        k = self.transpose_k(k, (0, 2, 1, 3))
        v = self.transpose_v(v, (0, 2, 1, 3))
        return self.rotary(q, cos, sin), self.rotary(k, cos, sin), v

    def construct(self, x, cos, sin, attn_mask):
        """x [B, S, H]; cos/sin [S, d] or [B, 1, S, d]; attn_mask uint8 [B or 1, 1, S, S] with 1 = may not attend,
        or (flash attention, packed rows) actual_seq_len int32 [B * K] (telechat_ms.positions, layout varlen)."""
        bs, seq, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        if self.use_flash_attention and len(attn_mask.shape) == 1:  # resolved when the graph is compiled
            return self.wo(self._varlen_attention(q, k, v, attn_mask))
        if self.use_flash_attention:
            out = self.flash_attention(q, k, v, attn_mask)
        else:
            out = self._attention(q, self._repeat_kv(k, bs, seq), self._repeat_kv(v, bs, seq), attn_mask)
        out = self.reshape(self.transpose_out(out, (0, 2, 1, 3)), (bs, seq, self.hidden))
        return self.wo(out)

    def construct_with_cache(self, x, cos, sin, attn_mask, k_cache, v_cache, cache_index):
        """Cached path (inference): write the new rotated keys and values into the static-shape caches in place,
        then attend over the whole cache.

        x [B, S, H]; cos/sin [B or 1, 1, S, d] (per-row tables: the released incremental rule and left padding);
        attn_mask uint8 [B or 1, 1, S, L] with 1 = may not attend; k_cache/v_cache Parameters [B, K, L, d];
        cache_index int32 [B, K, S, 3] of (row, kv head, slot) for every new key; writes to the last slot (the
        scratch slot) are never attended.
        """
        bs, seq, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        k, v = self.cast(k, k_cache.dtype), self.cast(v, v_cache.dtype)
        if self.cache_write_by_add:
            slot = self.write_slot(cache_index)[2]
            scratch = float(k_cache.shape[2] - 1)
            keep = self.write_cast(self.not_scratch(self.cast(slot, ms.float32), scratch), k_cache.dtype)  # [B,K,n,1]
            k_cache = self.cache_add(k_cache, cache_index, self.write_mul_k(k, keep))
            v_cache = self.cache_add(v_cache, cache_index, self.write_mul_v(v, keep))
        else:
            k_cache = self.cache_update(k_cache, cache_index, k)
            v_cache = self.cache_update(v_cache, cache_index, v)
        if self.use_flash_attention and seq > 1:  # Ascend prefill: the fused kernel over the repeated cache
            max_len = k_cache.shape[2]
            out = self.flash_attention(q, self._repeat_kv(k_cache, bs, max_len), self._repeat_kv(v_cache, bs, max_len),
                                       attn_mask)
        else:
            out = self._grouped_attention(q, k_cache, v_cache, attn_mask)
        out = self.reshape(self.transpose_out(out, (0, 2, 1, 3)), (bs, seq, self.hidden))
        return self.wo(out)

    def _varlen_attention(self, q, k, v, actual_seq_len):
        """Flash attention over packed samples in TND layout: [B*S, heads, d], no [S, S] mask; returns [B, S, H]."""
        bs, _, seq, _ = q.shape
        q = self.reshape(self.transpose_tnd_q(q, (0, 2, 1, 3)), (bs * seq, self.n_head, self.head_dim))
        k = self.reshape(self.transpose_tnd_k(k, (0, 2, 1, 3)), (bs * seq, self.n_kv, self.head_dim))
        v = self.reshape(self.transpose_tnd_v(v, (0, 2, 1, 3)), (bs * seq, self.n_kv, self.head_dim))
        out = self.flash_attention_varlen(q, k, v, self.compressed_mask, actual_seq_qlen=actual_seq_len,
                                          actual_seq_kvlen=actual_seq_len)
        return self.reshape(out, (bs, seq, self.hidden))

    def _grouped_attention(self, q, k_cache, v_cache, attn_mask):
        """GQA without copying the cache: the n_rep query heads of one kv head are stacked on the query axis."""
        bs, _, seq, _ = q.shape
        max_len = k_cache.shape[2]
        qg = self.reshape(self.cast(q, k_cache.dtype), (bs, self.n_kv, self.n_rep * seq, self.head_dim))
        scores = self.mul_scale_c(self.cast(self.cache_qk(qg, k_cache), ms.float32), self.scale)
        scores = self.reshape(scores, (bs, self.n_kv, self.n_rep, seq, max_len))
        mask = self.reshape(self.cast(attn_mask, ms.float32), (attn_mask.shape[0], 1, 1, seq, max_len))
        scores = self.mask_add_c(scores, self.mask_mul_c(mask, MASK_VALUE))
        probs = self.reshape(self.cast(self.softmax_c(scores), v_cache.dtype),
                             (bs, self.n_kv, self.n_rep * seq, max_len))
        out = self.cache_pv(probs, v_cache)
        return self.reshape(out, (bs, self.n_head, seq, self.head_dim))

    def _attention(self, q, k, v, attn_mask):
        """softmax(q k^T / sqrt(d) + mask) v with the softmax in fp32."""
        scores = self.mul_scale(self.cast(self.qk_matmul(q, k), ms.float32), self.scale)
        scores = self.mask_add(scores, self.mask_mul(self.cast(attn_mask, ms.float32), MASK_VALUE))
        probs = self.cast(self.softmax(scores), v.dtype)
        return self.pv_matmul(probs, v)


class TeleChatMLP(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x) with a biased w2 (down_proj)."""

    def __init__(self, cfg: TeleChatConfig):
        super().__init__()
        self.w1 = linear(cfg, cfg.hidden_size, cfg.ffn_hidden_size, has_bias=False)  # gate_proj
        self.w3 = linear(cfg, cfg.hidden_size, cfg.ffn_hidden_size, has_bias=False)  # up_proj
        self.w2 = linear(cfg, cfg.ffn_hidden_size, cfg.hidden_size, has_bias=True)   # down_proj
        self.silu = LlamaSiLU()
        self.mul = P.Mul()

    def construct(self, x):
        return self.w2(self.mul(self.silu(self.w1(x)), self.w3(x)))


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
        if self.has_bias:
            e, _, n_out = out.shape
            out = self.bias_add(out, self.reshape(self.cast(self.bias, self.compute_dtype), (e, 1, n_out)))
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
        self.scatter = P.ScatterNd()
        self.concat_x = P.Concat(axis=0)
        self.gather_in = P.Gather()
        self.concat_out = P.Concat(axis=0)
        self.transpose_slot = P.Transpose()
        self.gather_out = P.Gather()
        self.coeff_mul = P.Mul()
        self.combine_sum = P.ReduceSum()
        self.mean_probs = P.ReduceMean()
        self.mean_load = P.ReduceMean()
        self.aux_mul = P.Mul()
        self.aux_sum = P.ReduceSum()
        self.count_sum = P.ReduceSum()
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

    def _moe(self, x, capacity_factor_on):
        shape = x.shape
        n, e, k = shape[0] * shape[1], self.num_experts, self.top_k
        x2d = self.reshape(x, (n, self.hidden))
        probs, gate, idx = self.route(x2d)
        cap = expert_capacity(self.cfg, n, self.model_parallel) if capacity_factor_on else n
        # k-major priority: row j * N + t is token t's j-th choice
        flat = self.reshape(self.transpose_idx(idx, (1, 0)), (k * n,))
        mask = self.onehot(flat, e, ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32))  # [kN, E]
        position = self.pos_sum(self.pos_mul(self.cumsum(mask, 0), mask), -1)               # 1-based, [kN]
        keep = self.less_equal(position, float(cap))
        slot = self.cast(self.slot_add(self.slot_mul(self.cast(flat, ms.float32), float(cap)), position - 1.0),
                         ms.int32)
        trash = ms.Tensor(np.full((k * n,), e * cap, np.int32))  # dropped choices: a slot nothing reads
        slot = self.keep_select(keep, slot, trash)
        tokens = ms.Tensor(np.tile(np.arange(1, n + 1, dtype=np.int32), k))  # 1-based token of each row
        dispatch = self.scatter(self.reshape(slot, (k * n, 1)), tokens, (e * cap + 1,))[:e * cap]  # 0 = empty
        x_pad = self.concat_x((ms.ops.zeros((1, self.hidden), x.dtype), x2d))
        expert_in = self.reshape(self.gather_in(x_pad, dispatch, 0), (e, cap, self.hidden))
        expert_out = self.reshape(self.ffn(expert_in), (e * cap, self.hidden))
        out_pad = self.concat_out((expert_out, ms.ops.zeros((1, self.hidden), expert_out.dtype)))
        picked = self.gather_out(out_pad, self.transpose_slot(self.reshape(slot, (k, n)), (1, 0)), 0)  # [N, k, H]
        coeff = self.reshape(self.cast(gate, picked.dtype), (n, k, 1))
        out = self.combine_sum(self.coeff_mul(picked, coeff), 1)
        return self.reshape(self.cast(out, x.dtype), shape), probs, mask, keep

    def construct(self, x):
        """Inference: x [B, S, H] -> [B, S, H], no token dropped."""
        return self._moe(x, False)[0]

    def construct_aux(self, x):
        """Training: (output, load-balancing loss) with capacity dropping; records the router statistics."""
        out, probs, mask, keep = self._moe(x, True)
        # MindFormers' "expert" loss: factor * E * sum_e P_e * f_e, P = mean router probability, f = load share
        load = self.mean_load(mask, 0)
        aux = self.aux_mul(self.aux_sum(self.aux_mul(self.mean_probs(probs, 0), load)), self.aux_factor * self.num_experts)
        counts = self.count_sum(mask, 0)
        dropped = self.reshape(float(keep.shape[0]) - self.count_sum(self.cast(keep, ms.float32)), (1,))
        aux = ms.ops.depend(aux, self.assign_tokens(self.router_tokens, ms.ops.stop_gradient(counts)))
        aux = ms.ops.depend(aux, self.assign_dropped(self.router_dropped, ms.ops.stop_gradient(dropped)))
        aux = ms.ops.depend(aux, self.assign_aux(self.router_aux, ms.ops.stop_gradient(self.reshape(aux, (1,)))))
        return out, aux


def feed_forward(cfg: TeleChatConfig) -> nn.Cell:
    """The FFN a decoder layer uses: the dense SwiGLU MLP, or the MoE FFN when cfg.num_experts > 1."""
    return TeleChatMoE(cfg) if cfg.is_moe else TeleChatMLP(cfg)


class TeleChatDecoderLayer(nn.Cell):
    """Pre-norm block: x + wo(attn(norm(x))), then + w2(mlp(norm(.)))."""

    def __init__(self, cfg: TeleChatConfig):
        super().__init__()
        self.attention_norm = rms_norm(cfg, cfg.hidden_size)
        self.attention = TeleChatAttention(cfg)
        self.ffn_norm = rms_norm(cfg, cfg.hidden_size)
        self.feed_forward = feed_forward(cfg)
        self.add_attn = P.Add()
        self.add_ffn = P.Add()
        self.cast = P.Cast()

    def construct(self, x, cos, sin, attn_mask):
        h = self.attention(self.attention_norm(x), cos, sin, attn_mask)
        x = self.add_attn(x, self.cast(h, x.dtype))
        h = self.feed_forward(self.ffn_norm(x))
        return self.add_ffn(x, self.cast(h, x.dtype))

    def construct_aux(self, x, cos, sin, attn_mask):
        """The MoE block in training: (output, this layer's load-balancing loss)."""
        h = self.attention(self.attention_norm(x), cos, sin, attn_mask)
        x = self.add_attn(x, self.cast(h, x.dtype))
        h, aux = self.feed_forward.construct_aux(self.ffn_norm(x))
        return self.add_ffn(x, self.cast(h, x.dtype)), aux

    def construct_with_cache(self, x, cos, sin, attn_mask, k_cache, v_cache, cache_index):
        """The same block with the attention reading and writing the layer's kv cache."""
        h = self.attention.construct_with_cache(self.attention_norm(x), cos, sin, attn_mask, k_cache, v_cache,
                                                cache_index)
        x = self.add_attn(x, self.cast(h, x.dtype))
        h = self.feed_forward(self.ffn_norm(x))
        return self.add_ffn(x, self.cast(h, x.dtype))
