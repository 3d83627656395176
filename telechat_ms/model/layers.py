"""TeleChat2 decoder layer in MindSpore on MindFormers' legacy blocks (Linear, LlamaRMSNorm).

Parameter names follow the public MindSpore port (attention.wq / wk_v / wo, feed_forward.w1 / w2 / w3,
attention_norm, ffn_norm) so its checkpoints load as they are. Every primitive is an attribute so that
telechat_ms.parallel can attach shard strategies without touching this file.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn
from mindspore.ops import operations as P

from telechat_ms.backend import FlashAttention, Linear, LlamaRMSNorm, LlamaSiLU, ms_dtype
from telechat_ms.config import TeleChatConfig
from telechat_ms.model.moe import TeleChatMoE
from telechat_ms.positions import compressed_causal_mask

MASK_VALUE = -1e9  # added to masked attention scores in fp32; exp() of it is exactly 0
_COMPRESSED_MASK: list = []


def _compressed_mask() -> ms.Tensor:
    """The kernel's 2048 x 2048 causal mask, one Tensor shared by every layer."""
    if not _COMPRESSED_MASK:
        _COMPRESSED_MASK.append(ms.Tensor(compressed_causal_mask(), ms.uint8))
    return _COMPRESSED_MASK[0]


class RMSNorm(LlamaRMSNorm):
    """MindFormers' LlamaRMSNorm (same parameter, primitives and forward bits) whose self-defined form takes a
    hand-written backward (`_RMSNormCore`) while `hand_bprop` is on; telechat_ms.parallel turns it off, since its
    strategies shard the primitives autodiff differentiates. The fused kernel (Ascend) is MindFormers' as is."""

    def __init__(self, dim: int, eps: float, fused_kernel: bool):
        super().__init__(dim, eps=eps, compute_type=ms.float32, fused_kernel=fused_kernel)
        self.hand_bprop = self.self_define
        self.core = _RMSNormCore(eps)

    def construct(self, x):
        if self.hand_bprop:
            return self.core(x, self.weight)
        return self.rms_norm(x)


class _RMSNormCore(nn.Cell):
    """out = cast(x * r, x.dtype) * w, r = rsqrt(mean(x^2) + eps) in fp32: LlamaRMSNorm's forward, op for op.

    Its backward has no broadcasting element-wise op: on CPU those cost 2-3x a full-shape one, and autodiff's
    form of this norm has several (x * r, its row sums, the mean's tile). With g = dout * x over rows of H:
    dw = r^T g (a MatMul), dx = (r w^T) * dout - (c 1^T) * x with c = r^3 (g w) / H, the two outer products as
    MatMuls. Eight norms forward and backward at [256, 256]: 5.4 -> 3.7 ms on the 2-core CI machine."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.cast = P.Cast()
        self.square = P.Square()
        self.mean = P.ReduceMean(keep_dims=True)
        self.add = P.Add()
        self.rsqrt = P.Rsqrt()
        self.mul = P.Mul()
        self.mul2 = P.Mul()
        self.reshape = P.Reshape()
        self.weight_grad = P.MatMul(transpose_a=True)
        self.row_dot = P.MatMul(transpose_b=True)
        self.outer_w = P.MatMul()
        self.outer_c = P.MatMul()
        self.mul_g = P.Mul()
        self.mul_dout = P.Mul()
        self.mul_x = P.Mul()
        self.sub = P.Sub()

    def _inv_rms(self, h):
        return self.rsqrt(self.add(self.mean(self.square(h), -1), self.eps))

    def construct(self, x, weight):
        h = self.cast(x, ms.float32)
        return self.mul2(self.cast(self.mul(h, self._inv_rms(h)), x.dtype), self.cast(weight, x.dtype))

    def bprop(self, x, weight, out, dout):
        hidden = x.shape[-1]
        h = self.reshape(self.cast(x, ms.float32), (-1, hidden))
        d = self.reshape(self.cast(dout, ms.float32), (-1, hidden))
        w = self.reshape(self.cast(weight, ms.float32), (1, hidden))
        r = self._inv_rms(h)                                             # [M, 1]
        g = self.mul_g(d, h)
        dw = self.reshape(self.weight_grad(r, g), (hidden,))             # sum over rows of r * dout * x
        c = r * r * r * self.row_dot(g, w) / hidden                      # [M, 1]
        dx = self.sub(self.mul_dout(self.outer_w(r, w), d),
                      self.mul_x(self.outer_c(c, ms.ops.ones((1, hidden), ms.float32)), h))
        return self.cast(self.reshape(dx, x.shape), x.dtype), self.cast(dw, weight.dtype)


def rms_norm(cfg: TeleChatConfig, dim: int) -> RMSNorm:
    """RMSNorm computed in fp32 and cast back (fused Ascend kernel when cfg.fused_rms_norm)."""
    return RMSNorm(dim, eps=cfg.layer_norm_epsilon, fused_kernel=cfg.fused_rms_norm)


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
        # stand-alone / data-parallel training; telechat_ms.parallel turns it off (its strategies split the tables)
        self.full_tables = True

    def construct(self, x, cos, sin):
        dtype = x.dtype
        cos = self.cast(cos, dtype)
        sin = self.cast(sin, dtype)
        if self.training and self.full_tables:  # the tables at x's shape, built once per shape for all layers:
            cos = ms.ops.broadcast_to(cos, x.shape)          # CPU's broadcasting Mul costs about twice a full one
            sin = ms.ops.broadcast_to(sin, x.shape)
        x1, x2 = self.split(x)
        rotated = self.concat((self.neg(x2), x1))
        return self.add(self.mul_cos(x, cos), self.mul_sin(rotated, sin))


class RowSoftmax(nn.Cell):
    """Softmax over the last axis whose backward, out * (dout - sum(out * dout)), takes the row sums as a MatMul
    against a ones column: CPU's ReduceSum kernel (autodiff's form) was 3 ms of a 66 ms hidden-256 step, the
    MatMul a tenth of that. Same forward bits; the backward equal up to fp32 summation order."""

    def __init__(self):
        super().__init__()
        self.softmax = P.Softmax(axis=-1)
        self.row_sum = P.MatMul()
        self.spread = P.MatMul()
        self.reshape = P.Reshape()
        self.mul = P.Mul()
        self.sub = P.Sub()

    def construct(self, x):
        return self.softmax(x)

    def bprop(self, x, out, dout):
        n = x.shape[-1]
        rows = self.row_sum(self.reshape(self.mul(out, dout), (-1, n)), ms.ops.ones((n, 1), out.dtype))
        # the row sums spread over their rows by an outer product (a MatMul): CPU's Sub of a [.., 1] column
        # broadcast costs more than the MatMul and a full-shape Sub together
        spread = self.reshape(self.spread(rows, ms.ops.ones((1, n), out.dtype)), x.shape)
        return (self.mul(out, self.sub(dout, spread)),)


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
        # the softmax with the hand-written backward (stand-alone and data parallel); telechat_ms.parallel turns it
        # off: its strategies shard the primitive autodiff differentiates
        self.row_softmax = RowSoftmax()
        self.softmax_bprop = True
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
        # paged kv cache (telechat_ms.infer.paged): rows of one slot per token, written at the step's slot of every
        # new token, read back as the blocks of each row's block table
        self.paged_write_k = P.ScatterUpdate()
        self.paged_write_v = P.ScatterUpdate()
        self.paged_gather_k = P.Gather()
        self.paged_gather_v = P.Gather()
        self.paged_transpose_k = P.Transpose()
        self.paged_transpose_v = P.Transpose()
        # Ascend paged-attention kernels (PagedStepper(kernels=True), the layout MindFormers' PagedAttentionMgr uses:
        # caches [num_blocks, block_size, K, d]): ReshapeAndCache writes the new keys and values at their slots,
        # PagedAttention attends a decode call over each row's blocks (its context length counted from the mask);
        # prefill chunks gather their rows' blocks and take the grouped attention. Off: the gather path above.
        self.paged_kernels = False
        self.reshape_and_cache = ms.ops.auto_generate.ReshapeAndCache()
        self.paged_attention = ms.ops.auto_generate.PagedAttention(self.n_head, self.scale, self.n_kv)
        self.paged_depend = P.Depend()
        self.paged_visible = P.ReduceSum()
        self.paged_lens = P.Sub()
        self.paged_lens_cast = P.Cast()

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
            out = self._attention(q, k, v, attn_mask)
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

    def construct_paged(self, x, cos, sin, attn_mask, k_cache, v_cache, write_slots, ctx_slots):
        """Paged path (serving): write the new rotated keys and values into their slots of the block cache, then
        attend over the blocks of each row's table only (the live context, not the allocated cache).

        x [R, n, H]; cos/sin [R, n, 1, d] (each token's own tables: the released incremental rule per sequence);
        attn_mask uint8 [R, 1, n, C] (C = blocks x block size, 1 = may not attend); k_cache/v_cache Parameters
        slot-major [num_slots, K, d] with write_slots int32 [R * n] and ctx_slots int32 [R, C] (the slot of every
        context index: the row's blocks expanded to their slots; the gather reads the cache Parameter as it is, a
        reshape of it into blocks was measured to copy it), or head-major [K * num_slots, d] with the rows of every
        kv head, write_slots [R * n, K] and ctx_slots [R, K, C] (the gather then needs no transpose).
        """
        if self.paged_kernels:
            return self._paged_kernels(x, cos, sin, attn_mask, k_cache, v_cache, write_slots, ctx_slots)
        bs, seq, _ = x.shape
        q = self.reshape(self.wq(x), (bs, seq, self.n_head, self.head_dim))
        kv = self.reshape(self.wk_v(x), (bs, seq, self.n_kv, 2 * self.head_dim))
        k, v = self.split_kv(kv)
        q = self.transpose_q(self.rotary(q, cos, sin), (0, 2, 1, 3))        # [R, N, n, d]
        k = self.reshape(self.cast(self.rotary(k, cos, sin), k_cache.dtype), (bs * seq, self.n_kv, self.head_dim))
        v = self.reshape(self.cast(v, v_cache.dtype), (bs * seq, self.n_kv, self.head_dim))
        k_cache = self.paged_write_k(k_cache, write_slots, k)
        v_cache = self.paged_write_v(v_cache, write_slots, v)
        ctx_k = self.paged_gather_k(k_cache, ctx_slots, 0)    # no copy of the cache itself
        ctx_v = self.paged_gather_v(v_cache, ctx_slots, 0)
        if len(k_cache.shape) == 3:   # slot-major (model parallel): [R, C, K, d] -> [R, K, C, d]
            ctx_k = self.paged_transpose_k(ctx_k, (0, 2, 1, 3))
            ctx_v = self.paged_transpose_v(ctx_v, (0, 2, 1, 3))
        out = self._grouped_attention(q, ctx_k, ctx_v, attn_mask)
        out = self.reshape(self.transpose_out(out, (0, 2, 1, 3)), (bs, seq, self.hidden))
        return self.wo(out)

    def _paged_kernels(self, x, cos, sin, attn_mask, k_cache, v_cache, write_slots, block_tables):
        """construct_paged on Ascend's kernels: caches [num_blocks, block_size, K, d], block_tables int32 [R, nb]
        (not slots); attn_mask [R, 1, n, nb * block_size] as on the gather path."""
        bs, seq, _ = x.shape
        q = self.reshape(self.wq(x), (bs, seq, self.n_head, self.head_dim))
        kv = self.reshape(self.wk_v(x), (bs, seq, self.n_kv, 2 * self.head_dim))
        k, v = self.split_kv(kv)
        q = self.rotary(q, cos, sin)                                          # [R, n, N, d]
        kv_hidden = self.n_kv * self.head_dim
        k = self.reshape(self.cast(self.rotary(k, cos, sin), k_cache.dtype), (bs, seq, kv_hidden))
        v = self.reshape(self.cast(v, v_cache.dtype), (bs, seq, kv_hidden))
        written = self.reshape_and_cache(k, v, k_cache, v_cache, write_slots)
        q = self.paged_depend(q, written)
        ctx = attn_mask.shape[-1]
        if seq == 1:   # decode: the fused kernel over each row's blocks, context length = the visible slots
            hidden = self.paged_visible(self.cast(self.reshape(attn_mask, (bs, ctx)), ms.float32), -1)
            lens = self.paged_lens_cast(self.paged_lens(float(ctx), hidden), ms.int32)
            out = self.paged_attention(self.reshape(self.cast(q, k_cache.dtype), (bs, 1, self.hidden)), k_cache,
                                       v_cache, block_tables, lens)
            return self.wo(self.reshape(out, (bs, 1, self.hidden)))
        q = self.transpose_q(q, (0, 2, 1, 3))                                 # [R, N, n, d]
        ctx_k = self.reshape(self.paged_gather_k(k_cache, block_tables, 0), (bs, ctx, self.n_kv, self.head_dim))
        ctx_v = self.reshape(self.paged_gather_v(v_cache, block_tables, 0), (bs, ctx, self.n_kv, self.head_dim))
        out = self._grouped_attention(q, self.paged_transpose_k(ctx_k, (0, 2, 1, 3)),
                                      self.paged_transpose_v(ctx_v, (0, 2, 1, 3)), attn_mask)
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

    def _gqa(self, q, k, v, attn_mask, qk, mul_scale, mask_mul, mask_add, softmax, pv, full_mask=False):
        """softmax(q k^T / sqrt(d) + mask) v with the softmax in fp32, GQA by stacking the n_rep query heads of a
        kv head on the query axis: no Tile of k and v forward, and no strided reduction of the tiled gradients
        backward (on CPU 7% of a hidden-256 step). q [B, N, S, d], k and v [B, K, L, d] (L: the keys, S or the
        cache's slots), mask [B or 1, S, L]. The primitives are the caller's: each path has its own (strategies).
        full_mask (stand-alone training; in inference its memory would match the scores'): the mask broadcast to the
        scores once, not inside the Add."""
        bs, _, seq, _ = q.shape
        keys = k.shape[2]
        if q.dtype != k.dtype:
            q = self.cast(q, k.dtype)
        qg = self.reshape(q, (bs, self.n_kv, self.n_rep * seq, self.head_dim))
        scores = mul_scale(self.cast(qk(qg, k), ms.float32), self.scale)
        scores = self.reshape(scores, (bs, self.n_kv, self.n_rep, seq, keys))
        mask = mask_mul(self.reshape(self.cast(attn_mask, ms.float32), (attn_mask.shape[0], 1, 1, seq, keys)),
                        MASK_VALUE)
        if full_mask:  # training: the mask at the scores' shape, built once (every layer's nodes are the same and
            mask = ms.ops.broadcast_to(mask, scores.shape)   # merge); CPU's broadcasting Add costs 3x a full one
        scores = mask_add(scores, mask)
        probs = self.reshape(self.cast(softmax(scores), v.dtype), (bs, self.n_kv, self.n_rep * seq, keys))
        return self.reshape(pv(probs, v), (bs, self.n_head, seq, self.head_dim))

    def _grouped_attention(self, q, k_cache, v_cache, attn_mask):
        """GQA over the kv cache without copying it (the inference paths' primitives)."""
        return self._gqa(q, k_cache, v_cache, attn_mask, self.cache_qk, self.mul_scale_c, self.mask_mul_c,
                         self.mask_add_c, self.softmax_c, self.cache_pv)

    def _attention(self, q, k, v, attn_mask):
        """Training / full-forward GQA: the softmax with the hand-written backward unless parallelized."""
        if self.softmax_bprop:
            return self._gqa(q, k, v, attn_mask, self.qk_matmul, self.mul_scale, self.mask_mul, self.mask_add,
                             self.row_softmax, self.pv_matmul, full_mask=self.training)
        return self._gqa(q, k, v, attn_mask, self.qk_matmul, self.mul_scale, self.mask_mul, self.mask_add,
                         self.softmax, self.pv_matmul)


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

    def construct_paged(self, x, cos, sin, attn_mask, k_cache, v_cache, write_slots, ctx_slots):
        """The same block over the paged kv cache (TeleChatAttention.construct_paged)."""
        h = self.attention.construct_paged(self.attention_norm(x), cos, sin, attn_mask, k_cache, v_cache,
                                           write_slots, ctx_slots)
        x = self.add_attn(x, self.cast(h, x.dtype))
        h = self.feed_forward(self.ffn_norm(x))
        return self.add_ffn(x, self.cast(h, x.dtype))

    def construct_with_cache(self, x, cos, sin, attn_mask, k_cache, v_cache, cache_index):
        """The same block with the attention reading and writing the layer's kv cache."""
        h = self.attention.construct_with_cache(self.attention_norm(x), cos, sin, attn_mask, k_cache, v_cache,
                                                cache_index)
        x = self.add_attn(x, self.cast(h, x.dtype))
        h = self.feed_forward(self.ffn_norm(x))
        return self.add_ffn(x, self.cast(h, x.dtype))
