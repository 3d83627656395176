"""A shared context computed once: the keys and values of a prefix many rows start with (a subject's few-shot
exemplars in C-Eval / MMLU / CMMLU: every question of the subject repeats them), then the rows' own tokens (the
question and its choice) scored against them in batches, so the prefix costs one forward per subject instead of
one per question.

Exact to the full forward: a row's prefix keys must carry the rotary tables (NTK base, mscale) of the row's own
total length, so only rows whose lengths give the same tables share a prefix (`key`); below training_seqlen that is
every row. The math is the model's own sub-cells (norms, projections, grouped attention, FFN, LM head): the
attention of a suffix token reads the prefix keys concatenated with the suffix keys under a causal mask.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from telechat_ms.positions import ntk_params, tables_for


def _attend(layer, x, cos, sin, mask, past_k=None, past_v=None):
    """One decoder layer over x [B, S, H]; past_k / past_v [1, K, p, d] are keys / values before x (shared by the
    B rows). Returns (output, this layer's keys, values of x)."""
    attn = layer.attention
    h_in = layer.attention_norm(x)
    q, k, v = attn._project(h_in, cos, sin)
    ctx_k, ctx_v = k, v
    if past_k is not None:
        bs = x.shape[0]
        ctx_k = ops.concat((ops.broadcast_to(past_k, (bs,) + tuple(past_k.shape[1:])), k), 2)
        ctx_v = ops.concat((ops.broadcast_to(past_v, (bs,) + tuple(past_v.shape[1:])), v), 2)
    out = attn._grouped_attention(q, ctx_k, ctx_v, mask)
    bs, seq, _ = x.shape
    out = attn.wo(attn.reshape(attn.transpose_out(out, (0, 2, 1, 3)), (bs, seq, attn.hidden)))
    x = layer.add_attn(x, layer.cast(out, x.dtype))
    h = layer.feed_forward(layer.ffn_norm(x))
    return layer.add_ffn(x, layer.cast(h, x.dtype)), k, v


class _Prefix(nn.Cell):
    def __init__(self, lm):
        super().__init__(auto_prefix=False)
        self.lm = lm

    def construct(self, input_ids, cos, sin, mask):
        body = self.lm.model
        h = body.cast(body.tok_embeddings(input_ids), body.compute_dtype)
        if body.embed_layernorm:
            h = body.word_embeddings_layernorm(h)
        keys, values = [], []
        for layer in body.layers:
            h, k, v = _attend(layer, h, cos, sin, mask)
            keys.append(k)
            values.append(v)
        return keys, values


class _Suffix(nn.Cell):
    def __init__(self, lm):
        super().__init__(auto_prefix=False)
        self.lm = lm

    def construct(self, input_ids, cos, sin, mask, keys, values, positions, gather):
        body = self.lm.model
        h = body.cast(body.tok_embeddings(input_ids), body.compute_dtype)
        if body.embed_layernorm:
            h = body.word_embeddings_layernorm(h)
        for i, layer in enumerate(body.layers):
            h, _, _ = _attend(layer, h, cos, sin, mask, keys[i], values[i])
        h = body.norm_out(h)
        idx = ops.broadcast_to(positions.expand_dims(-1), (positions.shape[0], positions.shape[1], h.shape[-1]))
        logits = ops.cast(self.lm.lm_head(ops.gather_elements(h, 1, idx)), ms.float32)      # read cells only
        logp = ops.log_softmax(logits, -1)
        return ops.gather_elements(logp, 2, gather), ops.argmax(logits, -1)


class LocalPrefixForward:
    """The prefix / suffix forwards of a TeleChatForCausalLM in this process (LoglikelihoodScorer's `prefix`)."""

    def __init__(self, model):
        self.cfg = model.config
        self._prefix = _Prefix(model)
        self._suffix = _Suffix(model)
        self._prefix.set_train(False)
        self._suffix.set_train(False)
        self.prefix_tokens = 0          # tokens computed as shared prefixes (benchmarks and tests read it)

    def key(self, total_len: int) -> tuple[float, float, float]:
        """Rows may share a prefix only if their total lengths give the same rotary tables."""
        cfg = self.cfg
        return ntk_params(total_len, cfg.head_dim, cfg.training_seqlen, cfg.base_seqlen)

    def prefix(self, ids: list[int], total_len: int) -> Any:
        """Keys and values of every layer for `ids` (tables of a row of `total_len` tokens)."""
        p = len(ids)
        cos, sin = tables_for(self.cfg, p, total_len)
        mask = np.triu(np.ones((p, p), np.uint8), 1)[None, None]
        self.prefix_tokens += p
        keys, values = self._prefix(ms.Tensor(np.asarray([ids], np.int32)), ms.Tensor(cos[None, None]),
                                    ms.Tensor(sin[None, None]), ms.Tensor(mask))
        return p, tuple(keys), tuple(values)

    def suffix(self, state: Any, ids: np.ndarray, positions: np.ndarray, gather: np.ndarray, lengths: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        """BatchForward of the rows' tokens after the prefix: ids [B, W] right-padded, positions [B, P] cells read
        (relative to the suffix start, -1 none), lengths [B] suffix tokens of each row."""
        p, keys, values = state
        b, w = ids.shape
        cos = np.zeros((b, 1, w, self.cfg.head_dim), np.float32)
        sin = np.zeros_like(cos)
        for i, n in enumerate(lengths):
            n = int(n)
            cos[i, 0, :n], sin[i, 0, :n] = tables_for(self.cfg, range(p, p + n), p + n)
        q = np.arange(w)[:, None] + p
        hide = (np.arange(p + w)[None, :] > q).astype(np.uint8)          # causal over prefix + suffix
        mask = np.broadcast_to(hide[None, None], (b, 1, w, p + w)).copy()
        logp, argmax = self._suffix(ms.Tensor(ids.astype(np.int32)), ms.Tensor(cos), ms.Tensor(sin), ms.Tensor(mask),
                                    keys, values, ms.Tensor(np.maximum(positions, 0).astype(np.int32)),
                                    ms.Tensor(gather.astype(np.int32)))
        return logp.asnumpy().astype(np.float64), argmax.asnumpy()
