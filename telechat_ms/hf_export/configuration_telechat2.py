"""TeleChat2 configuration for transformers (`trust_remote_code=True`), shipped by telechat_ms in every HF export.

This file is copied as is into exported model directories, so it imports nothing from telechat_ms: a user of the
export needs transformers only. Field names are the released TeleChat2 config.json names; the attribute map adds
the Llama-style names that vLLM's TeleChat2ForCausalLM (a LlamaForCausalLM subclass) and its ModelConfig read.
"""
from __future__ import annotations

from transformers import PretrainedConfig

# Other names of our fields found in transformers-style configs; read as aliases, never stored twice.
_ALIASES = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "intermediate_size": "ffn_hidden_size",
            "rms_norm_eps": "layer_norm_epsilon"}


class Telechat2Config(PretrainedConfig):
    """The released TeleChat2 hyper-parameters, plus what Llama-style loaders ask for (rope_theta, head counts)."""

    model_type = "telechat"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = dict(_ALIASES)

    def __init__(self, vocab_size: int = 131072, hidden_size: int = 4096, n_layer: int = 30, n_head: int = 32,
                 num_key_value_heads: int | None = None, ffn_hidden_size: int = 12288,
                 layer_norm_epsilon: float = 1e-5, training_seqlen: int = 8192, base_seqlen: int = 8192,
                 seq_length: int = 8192, initializer_range: float = 0.02, embed_layernorm: bool = False,
                 apply_residual_connection_post_layernorm: bool = False, hidden_dropout: float = 0.0,
                 attention_dropout: float = 0.0, use_cache: bool = True, bos_token_id: int = 1,
                 eos_token_id: int = 2, pad_token_id: int = 3, unk_token_id: int = 0,
                 tie_word_embeddings: bool = False, **kwargs):
        given = {"n_layer": n_layer, "n_head": n_head, "ffn_hidden_size": ffn_hidden_size,
                 "layer_norm_epsilon": layer_norm_epsilon}
        for alias, ours in _ALIASES.items():  # an alias in config.json must not reach setattr: it would overwrite
            if alias in kwargs:
                value = kwargs.pop(alias)
                if value is not None:
                    given[ours] = value
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.n_layer = given["n_layer"]
        self.n_head = given["n_head"]
        # Missing or null means MHA (spec); stored explicitly because vLLM and MindFormers read it.
        self.num_key_value_heads = self.n_head if num_key_value_heads is None else num_key_value_heads
        self.ffn_hidden_size = given["ffn_hidden_size"]
        self.layer_norm_epsilon = given["layer_norm_epsilon"]
        self.training_seqlen = training_seqlen
        self.base_seqlen = base_seqlen
        self.seq_length = seq_length
        self.initializer_range = initializer_range
        self.embed_layernorm = embed_layernorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.use_cache = use_cache
        self.unk_token_id = unk_token_id
        # The released code hard-codes RoPE base 10000; Llama-style loaders read rope_theta and size their rotary
        # tables by max_position_embeddings (vLLM defaults it to 8192), so both are derived here, never guessed.
        self.rope_theta = float(kwargs.pop("rope_theta", 10000.0))
        self.max_position_embeddings = int(kwargs.pop("max_position_embeddings", seq_length))
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
