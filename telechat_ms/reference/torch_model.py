"""Stand-alone torch reference of TeleChat2, written from TELECHAT2_SPEC.md only, used to check the MindSpore model."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from telechat_ms.reference.torch_moe import MoE

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (key after RoPE, value), each [B, K, T, d]

_ALIASES = {  # released name -> other names seen in transformers-style configs
    "n_layer": ("num_hidden_layers", "num_layers"),
    "n_head": ("num_attention_heads",),
    "hidden_size": ("n_embed",),
    "ffn_hidden_size": ("intermediate_size",),
    "layer_norm_epsilon": ("rms_norm_eps",),
    "num_experts": ("num_local_experts", "n_routed_experts", "expert_num"),
    "num_experts_per_tok": ("num_experts_chosen", "moe_topk"),
}


@dataclass
class RefConfig:
    """The architecture fields of an HF TeleChat2 config.json that change the numbers."""

    hidden_size: int
    n_layer: int
    n_head: int
    ffn_hidden_size: int
    vocab_size: int
    num_key_value_heads: int | None = None
    layer_norm_epsilon: float = 1e-5
    training_seqlen: int = 8192
    base_seqlen: int = 8192
    embed_layernorm: bool = False
    apply_residual_connection_post_layernorm: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3
    num_experts: int = 0          # > 1: every FFN is an MoE of that many experts (torch_moe.MoE)
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.n_head  # missing or null means MHA
        if self.hidden_size % self.n_head or self.n_head % self.num_key_value_heads:
            raise ValueError(f"hidden_size {self.hidden_size}, n_head {self.n_head} and num_key_value_heads "
                             f"{self.num_key_value_heads} must divide evenly")

    @property
    def head_dim(self) -> int:
        """Per-head width d = hidden_size / n_head."""
        return self.hidden_size // self.n_head

    @property
    def n_rep(self) -> int:
        """How many consecutive query heads share one kv head."""
        return self.n_head // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "RefConfig":
        """Build from a config.json dict, resolving aliases and the released defaults."""
        d = dict(d)
        for name, aliases in _ALIASES.items():
            for alias in aliases:
                if d.get(name) is None and d.get(alias) is not None:
                    d[name] = d[alias]
        missing = [k for k in ("hidden_size", "n_layer", "n_head", "ffn_hidden_size", "vocab_size")
                   if d.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks {missing}")
        kw = {f: d[f] for f in cls.__dataclass_fields__ if d.get(f) is not None}
        return cls(**kw)

    @classmethod
    def from_dir(cls, path: str) -> "RefConfig":
        """Read <path>/config.json (or a config.json path itself)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(file, encoding="utf-8") as fh:
            return cls.from_hf_dict(json.load(fh))


# ----------------------------------------------------------------------------------------------- RoPE
def ntk_params(total_len: int, head_dim: int, training_seqlen: int, base_seqlen: int) -> tuple[int, float, float]:
    """(ntk_alpha, base', mscale) of the spec's NTK-aware RoPE for a total length L."""
    length = max(total_len, training_seqlen)
    ctx = math.log2(length / base_seqlen) + 1
    alpha = max(2 ** math.ceil(ctx) - 1, 1)
    base = 10000.0 * alpha ** (head_dim / (head_dim - 2))
    ratio = length / training_seqlen
    mscale = 1.0 if ratio <= 1 else 0.1 * math.log(ratio) + 1.0
    return alpha, base, mscale


def ntk_rope(total_len: int, head_dim: int, training_seqlen: int, base_seqlen: int,
             positions: torch.Tensor | range | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [len(positions), d] (mscale folded in) for the NTK RoPE built for total length L.

    Float32 arithmetic exactly as the released torch code: inv_freq = 1 / base' ** (arange(0, d, 2).float() / d),
    angles = outer(t.float(), inv_freq), emb = cat(freqs, freqs), mscale * cos/sin(emb). Taking rows of the
    L'-row table equals computing the outer product at the wanted positions only (one fp32 multiply per entry).
    The released code then rounds the tables to fp16/bf16; this reference keeps them in fp32 and casts them to
    the activation dtype where they are applied.
    """
    _, base, mscale = ntk_params(total_len, head_dim, training_seqlen, base_seqlen)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    t = torch.as_tensor(list(positions) if isinstance(positions, range) else positions).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return mscale * emb.cos(), mscale * emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotate-half: cat(-x[d/2:], x[:d/2])."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# --------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """RMSNorm normalised in fp32, cast back to the input dtype, then times weight."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention with the per-head interleaved fused key_value projection."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h = cfg.head_dim, cfg.hidden_size
        self.query = nn.Linear(h, h, bias=False)
        self.key_value = nn.Linear(h, 2 * cfg.num_key_value_heads * d, bias=False)
        self.dense = nn.Linear(h, h, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple]:
        cfg, (b, s, _) = self.cfg, x.shape
        d = cfg.head_dim
        q = self.query(x).view(b, s, cfg.n_head, d).transpose(1, 2)                       # [B, H, S, d]
        kv = self.key_value(x).view(b, s, cfg.num_key_value_heads, 2 * d).transpose(1, 2)  # [B, K, S, 2d]
        k, v = kv[..., :d], kv[..., d:]                       # per head: first d = key, last d = value
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin                    # cached after rotation
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        present = (k, v)
        k_all = k.repeat_interleave(cfg.n_rep, dim=1)         # query head j uses kv head j // n_rep
        v_all = v.repeat_interleave(cfg.n_rep, dim=1)
        scores = torch.matmul(q.float(), k_all.float().transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v_all.dtype)
        ctx = torch.matmul(probs, v_all).transpose(1, 2).reshape(b, s, cfg.hidden_size)
        return self.dense(ctx), present


class MLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)), down_proj with bias."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm decoder layer."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.post_ln_residual = cfg.apply_residual_connection_post_layernorm
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.self_attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = MoE(cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                       cfg.norm_topk_prob) if cfg.num_experts > 1 else MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple]:
        h = self.input_layernorm(x)
        attn, present = self.self_attention(h, cos, sin, mask, past)
        x1 = (h if self.post_ln_residual else x) + attn
        h = self.post_attention_layernorm(x1)
        return (h if self.post_ln_residual else x1) + self.mlp(h), present


class Transformer(nn.Module):
    """Embedding, decoder layers and final norm (the HF `transformer.` prefix)."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.embed_layernorm:
            self.word_embeddings_layernorm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class RefOutput(NamedTuple):
    """Forward result: logits [B, S, V] (model dtype) and the fp32 loss (None without labels)."""

    logits: torch.Tensor
    loss: torch.Tensor | None


class GenerateOutput(NamedTuple):
    """Generation result: prompt + new ids [B, S+n], and the raw model logits [B, V] of every step if asked."""

    sequences: torch.Tensor
    step_logits: list[torch.Tensor] | None


# --------------------------------------------------------------------------------------- sampling
def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF rule on every token id present in seen_ids [B, T]: logit > 0 -> logit / p, else logit * p."""
    if penalty == 1.0:
        return logits
    score = torch.gather(logits, 1, seen_ids)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(1, seen_ids, score)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits per row (ties with the k-th kept), -inf elsewhere; 0 disables."""
    if top_k <= 0:
        return logits
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest most-probable set whose cumulative probability >= top_p (at least one token)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.float().softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)                       # HF formulation, ascending order
    remove[..., -1:] = False                          # always keep the most probable token
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def process_logits(logits: torch.Tensor, seen_ids: torch.Tensor, do_sample: bool = False,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0) -> torch.Tensor:
    """HF order: repetition penalty (greedy too), then, when sampling, temperature, top-k, top-p."""
    logits = apply_repetition_penalty(logits.float(), seen_ids, repetition_penalty)
    if do_sample:
        if temperature != 1.0:
            logits = logits / temperature
        logits = apply_top_p(apply_top_k(logits, top_k), top_p)
    return logits


# ------------------------------------------------------------------------------------------- model
class TeleChatRef(nn.Module):
    """TeleChat2 causal LM with the HF parameter names: full forward, released kv-cache decoding, generation."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward_step(self, input_ids: torch.Tensor, past_kv: KVCache | None = None, start_pos: int | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """Released incremental rule: tables for total length start_pos+n, applied to the new tokens only.

        attention_mask [B, start_pos+n] (1 = real token) masks padded keys; positions still count pads,
        as in the released code (it passes no position ids).
        """
        cfg, t = self.cfg, self.transformer
        b, n = input_ids.shape
        past_len = 0 if not past_kv else past_kv[0][0].shape[2]
        start = past_len if start_pos is None else start_pos
        if start != past_len:
            raise ValueError(f"start_pos {start} does not match the cache length {past_len}")
        total = start + n
        cos, sin = ntk_rope(total, cfg.head_dim, cfg.training_seqlen, cfg.base_seqlen, range(start, total))
        mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=start)[None, None]   # [1, 1, n, total]
        if attention_mask is not None:
            mask = mask & attention_mask.to(torch.bool)[:, None, None, :]
        x = t.word_embeddings(input_ids)
        if cfg.embed_layernorm:
            x = t.word_embeddings_layernorm(x)
        presents: KVCache = []
        for i, block in enumerate(t.h):
            x, present = block(x, cos, sin, mask, past_kv[i] if past_kv else None)
            presents.append(present)
        return self.lm_head(t.ln_f(x)), presents

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> RefOutput:
        """Full forward over S tokens (tables for length S, positions 0..S-1); shifted CE loss with labels."""
        logits, _ = self.forward_step(input_ids, None, 0, attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return RefOutput(logits, loss)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 eos_token_id: int | None = 2, seed: int | None = None, return_step_logits: bool = False,
                 attention_mask: torch.Tensor | None = None) -> GenerateOutput:
        """Prefill then decode one token a step with the kv cache; finished rows are padded with pad_token_id."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        seq = input_ids
        finished = torch.zeros(seq.shape[0], dtype=torch.bool)
        steps: list[torch.Tensor] = []
        logits, past = self.forward_step(seq, None, 0, attention_mask)
        for step in range(max_new_tokens):
            raw = logits[:, -1].float()
            if return_step_logits:
                steps.append(raw)
            scores = process_logits(raw, seq, do_sample, temperature, top_k, top_p, repetition_penalty)
            if do_sample:
                nxt = torch.multinomial(scores.softmax(dim=-1), 1, generator=gen).squeeze(-1)
            else:
                nxt = scores.argmax(dim=-1)
            nxt = torch.where(finished, torch.full_like(nxt, self.cfg.pad_token_id), nxt)
            seq = torch.cat((seq, nxt[:, None]), dim=1)
            if eos_token_id is not None:
                finished |= nxt == eos_token_id
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            if attention_mask is not None:
                attention_mask = torch.cat((attention_mask, torch.ones_like(attention_mask[:, :1])), dim=1)
            logits, past = self.forward_step(nxt[:, None], past, None, attention_mask)
        return GenerateOutput(seq, steps if return_step_logits else None)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "TeleChatRef":
        """Load an HF directory (safetensors or .bin, single or sharded) strictly: any mismatch is a ValueError."""
        cfg = RefConfig.from_dir(path)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state: dict[str, torch.Tensor] = {}
        for file, names in _weight_files(path):
            for name, tensor in _read_file(file).items():
                if names is not None and name not in names:
                    raise ValueError(f"tensor {name!r} in {file} is not listed for that file in the index")
                if name not in expected:
                    raise ValueError(f"unexpected tensor {name!r} in {file}")
                if tuple(tensor.shape) != expected[name]:
                    raise ValueError(f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, "
                                     f"expected {expected[name]}")
                if name in state:
                    raise ValueError(f"tensor {name!r} appears twice (again in {file})")
                state[name] = tensor.to(device=device, dtype=dtype)
            for name in names or ():
                if name not in state:
                    raise ValueError(f"tensor {name!r} is listed in the index for {file} but missing from it")
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"checkpoint {path} lacks tensor {missing[0]!r}" +
                             (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()


def _weight_files(path: str) -> list[tuple[str, set[str] | None]]:
    """The weight files of an HF directory, each with the names its index assigns to it (None: no index)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = os.path.join(path, index_name)
        if os.path.exists(index_file):
            with open(index_file, encoding="utf-8") as fh:
                weight_map: dict[str, str] = json.load(fh)["weight_map"]
            by_file: dict[str, set[str]] = {}
            for name, fname in weight_map.items():
                by_file.setdefault(fname, set()).add(name)
            for fname in by_file:
                if not os.path.exists(os.path.join(path, fname)):
                    raise ValueError(f"{index_file} names shard {fname} which does not exist")
            return [(os.path.join(path, f), names) for f, names in sorted(by_file.items())]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [(os.path.join(path, single), None)]
    raise ValueError(f"no model.safetensors, pytorch_model.bin or index json in {path}")


def _read_file(file: str) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors or .bin file (the .bin read with weights_only=True)."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(file, device="cpu")
    obj = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{file} does not hold a state dict")
    return obj
