"""TeleChatModel and TeleChatForCausalLM: the TeleChat2 forward (spec section 1) in MindSpore.

Position-dependent inputs (rotary cos/sin tables, the attention mask) are built on the host by
telechat_ms.positions and passed in, so one graph serves every length and the kv cache can follow the
released incremental NTK rule. `model(input_ids)` builds them itself (PyNative convenience). `generate` and
`chat` come from telechat_ms.infer's GenerationMixin, which sits below the model and knows no concrete model.
"""
from __future__ import annotations

import os

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import operations as P

from telechat_ms.backend import LlamaEmbedding, ms_dtype
from telechat_ms.config import TeleChatConfig
from telechat_ms.infer.mixin import GenerationMixin
from telechat_ms.model.layers import TeleChatDecoderLayer, linear, rms_norm
from telechat_ms.positions import training_inputs
from telechat_ms.special_tokens import IGNORE_INDEX
from telechat_ms.weights import load_into_model, save_model


class TeleChatModel(nn.Cell):
    """Embedding, the decoder layers and the final norm: hidden states [B, S, H]."""

    def __init__(self, cfg: TeleChatConfig):
        super().__init__()
        self.tok_embeddings = LlamaEmbedding(cfg.vocab_size, cfg.hidden_size, init_method_std=cfg.initializer_range,
                                             param_init_type=ms_dtype(cfg.param_dtype))
        self.embed_layernorm = cfg.embed_layernorm
        if cfg.embed_layernorm:
            self.word_embeddings_layernorm = rms_norm(cfg, cfg.hidden_size)
        self.layers = nn.CellList([TeleChatDecoderLayer(cfg) for _ in range(cfg.n_layer)])
        self.norm_out = rms_norm(cfg, cfg.hidden_size)
        self.cast = P.Cast()
        self.compute_dtype = ms_dtype(cfg.compute_dtype)

    def construct(self, input_ids, cos, sin, attn_mask):
        h = self.cast(self.tok_embeddings(input_ids), self.compute_dtype)
        if self.embed_layernorm:
            h = self.word_embeddings_layernorm(h)
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask)
        return self.norm_out(h)

    def construct_aux(self, input_ids, cos, sin, attn_mask):
        """MoE training forward: (hidden states, the load-balancing loss summed over the layers)."""
        h = self.cast(self.tok_embeddings(input_ids), self.compute_dtype)
        if self.embed_layernorm:
            h = self.word_embeddings_layernorm(h)
        aux = 0.0
        for layer in self.layers:
            h, layer_aux = layer.construct_aux(h, cos, sin, attn_mask)
            aux = aux + layer_aux
        return self.norm_out(h), aux

    def construct_with_cache(self, input_ids, cos, sin, attn_mask, k_caches, v_caches, cache_index):
        """Hidden states of the new tokens; each layer writes its keys/values into k_caches[i], v_caches[i]."""
        h = self.cast(self.tok_embeddings(input_ids), self.compute_dtype)
        if self.embed_layernorm:
            h = self.word_embeddings_layernorm(h)
        for i in range(len(self.layers)):
            h = self.layers[i].construct_with_cache(h, cos, sin, attn_mask, k_caches[i], v_caches[i], cache_index)
        return self.norm_out(h)

    def construct_paged(self, input_ids, cos, sin, attn_mask, k_caches, v_caches, write_slots, block_table):
        """Hidden states of the new tokens over the paged kv cache (telechat_ms.infer.paged)."""
        h = self.cast(self.tok_embeddings(input_ids), self.compute_dtype)
        if self.embed_layernorm:
            h = self.word_embeddings_layernorm(h)
        for i in range(len(self.layers)):
            h = self.layers[i].construct_paged(h, cos, sin, attn_mask, k_caches[i], v_caches[i], write_slots,
                                               block_table)
        return self.norm_out(h)


class TokenNLL(nn.Cell):
    """sum(-log_softmax(logits)[target] * mask) with a hand-written backward, (softmax - onehot) * mask * dout.

    The forward runs the same LogSoftmax and GatherD as autodiff's form (so the same bits); the backward replaces
    autodiff's GatherD grad + LogSoftmaxGrad (a dense [N, V] scatter, then CPU's slow LogSoftmaxGrad: 3-5x the
    time of this form on CPU) with one softmax, a one-hot and two element-wise passes, equal up to rounding.
    """

    def __init__(self):
        super().__init__(auto_prefix=False)
        self.log_softmax = P.LogSoftmax(axis=-1)
        self.gather_d = P.GatherD()
        self.reduce_sum = P.ReduceSum()
        self.reshape = P.Reshape()
        self.softmax = P.Softmax(axis=-1)
        self.one_hot = P.OneHot()
        self.sub = P.Sub()
        self.mul = P.Mul()
        self.spread = P.MatMul()
        self.on = ms.Tensor(1.0, ms.float32)
        self.off = ms.Tensor(0.0, ms.float32)

    def construct(self, logits, safe, mask):
        """logits [N, V] fp32, safe (targets, ignored ones as 0) int32 [N, 1], mask fp32 [B, S] with B * S = N."""
        picked = self.gather_d(self.log_softmax(logits), 1, safe)
        return self.reduce_sum(-self.reshape(picked, mask.shape) * mask)

    def bprop(self, logits, safe, mask, out, dout):
        vocab = logits.shape[1]
        # each row's weight spread over the vocabulary by an outer product: a MatMul and a full-shape Mul cost less
        # on CPU than the Mul of a [N, 1] column broadcast
        weight = self.spread(self.reshape(mask * dout, (-1, 1)), ops.ones((1, vocab), ms.float32))
        target = self.one_hot(self.reshape(safe, (-1,)), vocab, self.on, self.off)
        grad = self.mul(self.sub(self.softmax(logits), target), weight)
        return grad, ops.zeros_like(safe), ops.zeros_like(mask)


class TeleChatForCausalLM(nn.Cell, GenerationMixin):
    """TeleChat2 language model: logits [B, S, V], or the mean token loss when labels are given."""

    def __init__(self, cfg: TeleChatConfig):
        super().__init__()
        self.config = cfg
        self.model = TeleChatModel(cfg)
        self.lm_head = linear(cfg, cfg.hidden_size, cfg.vocab_size, has_bias=False)
        self.reshape = P.Reshape()
        self.cast = P.Cast()
        self.log_softmax = P.LogSoftmax(axis=-1)
        self.gather_d = P.GatherD()
        self.not_equal = P.NotEqual()
        self.maximum = P.Maximum()
        self.reduce_sum = P.ReduceSum()
        self.concat = P.Concat(axis=1)
        self.fill_ignore = P.Fill()
        self.gather_last = P.Gather()
        self.logits_fp32 = P.Cast()  # the cached step's logits; model-parallel predict gathers the vocab shards here
        # training loss with the hand-written backward; telechat_ms.parallel turns it off (its strategies shard
        # log_softmax and gather_d of autodiff's form)
        self.token_nll = TokenNLL()
        self.nll_bprop = True

    # ------------------------------------------------------------------ forward
    def construct(self, input_ids, labels=None, cos=None, sin=None, attn_mask=None):
        if cos is None:  # PyNative convenience: one causal sequence per row (shared tables)
            cos, sin, attn_mask = (ms.Tensor(x) for x in training_inputs(self.config, input_ids.shape[1]))
        if labels is not None and self.config.is_moe:  # training: capacity rule + load-balancing loss
            hidden, aux = self.model.construct_aux(input_ids, cos, sin, attn_mask)
            return self.loss(self.cast(self.lm_head(hidden), ms.float32), labels) + aux
        hidden = self.model(input_ids, cos, sin, attn_mask)
        logits = self.cast(self.lm_head(hidden), ms.float32)
        if labels is None:
            return logits
        return self.loss(logits, labels)

    def forward_with_cache(self, input_ids, cos, sin, attn_mask, k_caches, v_caches, cache_index, last_index):
        """Inference step with a kv cache (telechat_ms.infer builds the inputs): fp32 logits [B, 1, V] of the
        token at position last_index (int32 [1]) of input_ids; the caches are updated in place."""
        hidden = self.model.construct_with_cache(input_ids, cos, sin, attn_mask, k_caches, v_caches, cache_index)
        hidden = self.gather_last(hidden, last_index, 1)
        return self.logits_fp32(self.lm_head(hidden), ms.float32)

    def forward_paged(self, input_ids, cos, sin, attn_mask, k_caches, v_caches, write_slots, block_table,
                      last_index):
        """Serving step over the paged kv cache: fp32 logits [R, 1, V] of column last_index (int32 [1])."""
        hidden = self.model.construct_paged(input_ids, cos, sin, attn_mask, k_caches, v_caches, write_slots,
                                            block_table)
        hidden = self.gather_last(hidden, last_index, 1)
        return self.logits_fp32(self.lm_head(hidden), ms.float32)

    def loss(self, logits, labels):
        """Shifted cross entropy, mean over targets != -100 (token mean over the batch)."""
        nll_sum, count = self.loss_terms(logits, labels)
        return nll_sum / self.maximum(count, 1.0)

    def loss_terms(self, logits, labels):
        """(sum of the shifted token NLL over targets != -100, number of such targets)."""
        bs, seq, vocab = logits.shape
        ignore = self.fill_ignore(labels.dtype, (bs, 1), IGNORE_INDEX)
        targets = self.concat((labels[:, 1:], ignore))          # position t predicts token t+1
        mask = self.cast(self.not_equal(targets, IGNORE_INDEX), ms.float32)
        safe = self.maximum(targets, 0)
        flat = self.reshape(logits, (bs * seq, vocab))
        safe = self.reshape(safe, (bs * seq, 1)).astype(ms.int32)
        if self.nll_bprop:
            return self.token_nll(flat, safe, mask), self.reduce_sum(mask)
        picked = self.gather_d(self.log_softmax(flat), 1, safe)
        nll = -self.reshape(picked, (bs, seq)) * mask
        return self.reduce_sum(nll), self.reduce_sum(mask)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: TeleChatConfig | None = None,
                        **overrides) -> "TeleChatForCausalLM":
        """Build the model from an HF directory (converted in memory, tensor by tensor) or an hf2ms output."""
        cfg = config or TeleChatConfig.from_pretrained(path)
        if overrides:
            cfg = cfg.replace(**overrides)
        model = cls(cfg)
        load_into_model(model, os.fspath(path))
        model.name_or_path = os.fspath(path)  # where telechat_ms.infer finds generation_config.json
        return model

    def save_pretrained(self, path: str | os.PathLike, fmt: str = "ms", dtype: str | None = None,
                        max_shard_size: str | int = "5GB") -> str:
        """Write config.json + sharded safetensors (fmt 'ms': port names; 'hf': released HF names)."""
        return save_model(self, os.fspath(path), fmt=fmt, dtype=dtype, max_shard_size=max_shard_size)
