"""Write small random TeleChat2 checkpoints in the released HF layout, for tests and parity checks."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from telechat_ms.reference.torch_model import RefConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ALIAS_KEYS = ("num_hidden_layers", "num_layers", "num_attention_heads", "n_embed", "intermediate_size",
               "rms_norm_eps")


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A small HF config dict (d = 16, GQA 4 heads / 2 kv heads) that runs in milliseconds on CPU."""
    cfg: dict[str, Any] = dict(hidden_size=64, n_layer=2, n_head=4, num_key_value_heads=2, ffn_hidden_size=96,
                               vocab_size=256, layer_norm_epsilon=1e-5, training_seqlen=32, base_seqlen=32,
                               seq_length=32)
    cfg.update(overrides)
    return cfg


def tiny_moe_config(**overrides: Any) -> dict[str, Any]:
    """tiny_config as an MoE: 8 experts of 96, top-2, renormalized (TeleChat2-39B-A12B's structure, scaled down)."""
    return tiny_config(**{"num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, **overrides})


def hf_config_json(config: dict[str, Any]) -> dict[str, Any]:
    """The config.json dict with the released field names and fixed released values filled in."""
    ref = RefConfig.from_hf_dict(config)
    out: dict[str, Any] = {
        "architectures": ["TelechatForCausalLM"], "model_type": "telechat",
        "apply_residual_connection_post_layernorm": False, "embed_layernorm": False,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "unk_token_id": 0,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }
    out.update({k: v for k, v in config.items() if k not in _ALIAS_KEYS})
    out.update(hidden_size=ref.hidden_size, n_layer=ref.n_layer, n_head=ref.n_head,
               num_key_value_heads=ref.num_key_value_heads, ffn_hidden_size=ref.ffn_hidden_size,
               vocab_size=ref.vocab_size, layer_norm_epsilon=ref.layer_norm_epsilon,
               training_seqlen=ref.training_seqlen, base_seqlen=ref.base_seqlen,
               embed_layernorm=ref.embed_layernorm,
               apply_residual_connection_post_layernorm=ref.apply_residual_connection_post_layernorm)
    out.setdefault("seq_length", ref.training_seqlen)
    if out["tie_word_embeddings"]:
        raise ValueError("TeleChat2 checkpoints have an untied lm_head; tie_word_embeddings must be false")
    return out


def random_state_dict(config: dict[str, Any], seed: int = 0, qk_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """fp32 random weights in HF names: matrices/biases ~N(0, 0.02), norm weights U(0.9, 1.1)."""
    cfg = RefConfig.from_hf_dict(config)
    gen = torch.Generator().manual_seed(seed)
    h, f, v, d, k = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.head_dim, cfg.num_key_value_heads

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    def norm() -> torch.Tensor:
        return 0.9 + 0.2 * torch.rand(h, generator=gen)

    sd: dict[str, torch.Tensor] = {"transformer.word_embeddings.weight": normal(v, h)}
    if cfg.embed_layernorm:
        sd["transformer.word_embeddings_layernorm.weight"] = norm()
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        kv = normal(2 * k * d, h).view(k, 2 * d, h)
        kv[:, :d] *= qk_scale  # key rows of each per-head [key; value] block
        sd[p + "input_layernorm.weight"] = norm()
        sd[p + "self_attention.query.weight"] = normal(h, h) * qk_scale
        sd[p + "self_attention.key_value.weight"] = kv.reshape(2 * k * d, h)
        sd[p + "self_attention.dense.weight"] = normal(h, h)
        sd[p + "self_attention.dense.bias"] = normal(h)
        sd[p + "post_attention_layernorm.weight"] = norm()
        if cfg.num_experts > 1:  # MoE (spec 12): router + mlp.local_experts.E.*; a wider router spreads choices
            sd[p + "mlp.router.weight"] = normal(cfg.num_experts, h) * 10
        mlps = [p + "mlp."] if cfg.num_experts <= 1 else [f"{p}mlp.local_experts.{e}." for e in range(cfg.num_experts)]
        for m in mlps:
            sd[m + "gate_proj.weight"] = normal(f, h)
            sd[m + "up_proj.weight"] = normal(f, h)
            sd[m + "down_proj.weight"] = normal(h, f)
            sd[m + "down_proj.bias"] = normal(h)
    sd["transformer.ln_f.weight"] = norm()
    sd["lm_head.weight"] = normal(v, h)
    return sd


def write_state_dict(out_dir: str, state: dict[str, torch.Tensor], fmt: str = "safetensors",
                     num_shards: int = 1) -> list[str]:
    """Write tensors as one file or num_shards files plus an HF index json; returns the file names."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    names = list(state)
    num_shards = max(1, min(num_shards, len(names)))
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if num_shards == 1:
        files = [f"{stem}.{ext}"]
    else:
        files = [f"{stem}-{i + 1:05d}-of-{num_shards:05d}.{ext}" for i in range(num_shards)]
    per = -(-len(names) // num_shards)
    weight_map: dict[str, str] = {}
    for i, fname in enumerate(files):
        chunk = {n: state[n].contiguous() for n in names[i * per:(i + 1) * per]}
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(chunk, os.path.join(out_dir, fname), metadata={"format": "pt"})
        else:
            torch.save(chunk, os.path.join(out_dir, fname))
        weight_map.update(dict.fromkeys(chunk, fname))
    if num_shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(out_dir, f"{stem}.{ext}.index.json"), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
    return files


def write_random_hf_checkpoint(out_dir: str, config: dict[str, Any], dtype: str = "float32",
                               fmt: str = "safetensors", num_shards: int = 1, seed: int = 0,
                               qk_scale: float = 1.0) -> str:
    """Write config.json and random weights of a TeleChat2 model as an HF directory; returns out_dir."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    os.makedirs(out_dir, exist_ok=True)
    cfg_json = hf_config_json(config)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg_json, fh, indent=2)
    state = {k: v.to(_DTYPES[dtype]) for k, v in random_state_dict(cfg_json, seed, qk_scale).items()}
    write_state_dict(out_dir, state, fmt, num_shards)
    return out_dir
