"""TeleChatConfig: the one description of a TeleChat2 model (presets, HF config.json, YAML)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from telechat_ms import hf_export
from telechat_ms.errors import ConfigError
from telechat_ms.io import atomic_write_text, read_json_object

# HF config.json aliases: (our field, other names found in released or transformers-style configs).
_ALIASES = {
    "n_layer": ("num_hidden_layers", "num_layers"),
    "n_head": ("num_attention_heads",),
    "ffn_hidden_size": ("intermediate_size",),
    "layer_norm_epsilon": ("rms_norm_eps",),
    # MoE (TeleChat2-39B-A12B): the expert FFN size is ffn_hidden_size; Mixtral / Qwen-MoE / MindFormers names
    "num_experts": ("num_local_experts", "n_routed_experts", "expert_num"),
    "num_experts_per_tok": ("num_experts_chosen", "moe_topk"),
}
# A second name some MoE configs give the expert FFN size: read as ffn_hidden_size (contradicting values rejected).
_FFN_ALIASES = ("moe_intermediate_size",)
# MoE fields an HF config.json carries only for MoE models (a dense config.json stays as released).
_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "norm_topk_prob")

# Fields that only describe how MindSpore runs the model; never written to an HF config.json.
_RUNTIME_FIELDS = ("compute_dtype", "param_dtype", "use_flash_attention", "fused_rms_norm", "capacity_factor",
                   "aux_loss_factor")
# Keys of config.json that say which code loads the file, not what the model is: written back as they were read
# (an export replaces them), and not compared (an export of a model is the same model).
_LOADER_KEYS = ("architectures", "auto_map", "model_type")
# Keys an HF export writes that describe its weight files, not the model: read and dropped (a later export writes
# them from the files it writes), so a dtype conversion never carries a stale value along.
_FILE_KEYS = ("torch_dtype", "dtype")
# TeleChat2's RoPE base is fixed (the released code hard-codes it); exports state it for Llama-style loaders.
ROPE_THETA = 10000.0

_PRESETS: dict[str, dict[str, Any]] = {
    # A model small enough to train on 2 CPU cores in minutes; vocab is usually overridden by the tokenizer.
    "tiny": dict(n_layer=2, hidden_size=128, ffn_hidden_size=256, n_head=4, num_key_value_heads=2,
                 vocab_size=4096, training_seqlen=256, base_seqlen=256, seq_length=256),
    "3b": dict(n_layer=24, hidden_size=3072, ffn_hidden_size=6144, n_head=24, num_key_value_heads=24),
    "7b": dict(n_layer=30, hidden_size=4096, ffn_hidden_size=12288, n_head=32, num_key_value_heads=32),
    "35b": dict(n_layer=64, hidden_size=6144, ffn_hidden_size=20480, n_head=48, num_key_value_heads=48),
    "115b": dict(n_layer=96, hidden_size=8192, ffn_hidden_size=40960, n_head=64, num_key_value_heads=8,
                 layer_norm_epsilon=1e-8),
    # TeleChat2-39B-A12B (spec 12): every FFN is 16 routed SwiGLU experts of 6144, top-4 renormalized, MHA
    "telechat2_39b_a12b": dict(n_layer=30, hidden_size=4096, ffn_hidden_size=6144, n_head=32, num_key_value_heads=32,
                               num_experts=16, num_experts_per_tok=4, norm_topk_prob=True),
    # The CPU test MoE: 2 layers, 8 experts, top-2
    "tiny_moe": dict(n_layer=2, hidden_size=128, ffn_hidden_size=128, n_head=4, num_key_value_heads=2,
                     vocab_size=4096, training_seqlen=256, base_seqlen=256, seq_length=256,
                     num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
}


@dataclass
class TeleChatConfig:
    """Architecture hyper-parameters of TeleChat2 (spec section 1-3) plus MindSpore run-time switches."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    n_layer: int = 30
    n_head: int = 32
    num_key_value_heads: int | None = None
    ffn_hidden_size: int = 12288
    layer_norm_epsilon: float = 1e-5
    training_seqlen: int = 8192
    base_seqlen: int = 8192
    seq_length: int = 8192
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    embed_layernorm: bool = False
    apply_residual_connection_post_layernorm: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3
    unk_token_id: int = 0
    # MoE (spec 12): num_experts 0 = dense MLP; else every layer's FFN is num_experts routed SwiGLU experts of
    # ffn_hidden_size, num_experts_per_tok chosen per token by an fp32 router, their weights renormalized to sum to
    # 1 when norm_topk_prob; no shared expert.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True
    # MoE training switches (never in config.json): capacity_factor > 0 caps each expert at
    # ceil(k * tokens * factor / experts) tokens in training forwards (the overflow is dropped, MindFormers' rule);
    # 0 and every inference forward drop nothing. aux_loss_factor scales the load-balancing loss added in training.
    capacity_factor: float = 0.0
    aux_loss_factor: float = 0.0
    # MindSpore run-time switches (CPU path: fp32, plain attention, unfused norm; Ascend path: the opposite).
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    use_flash_attention: bool = False
    fused_rms_norm: bool = False
    # Keys of an HF config.json we do not model, kept so save_pretrained writes them back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # architectures / auto_map / model_type as read (see _LOADER_KEYS).
    loader: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.n_head  # missing or null means MHA
        self.validate()

    # ---------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def n_rep(self) -> int:
        """How many query heads share one kv head."""
        return self.n_head // self.num_key_value_heads

    def validate(self, source: str = "TeleChatConfig") -> None:
        """Raise ConfigError naming the field if the numbers cannot describe a TeleChat2 model."""
        for name in ("vocab_size", "hidden_size", "n_layer", "n_head", "num_key_value_heads", "ffn_hidden_size",
                     "training_seqlen", "base_seqlen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
        if self.hidden_size % self.n_head:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} is not divisible by n_head {self.n_head}")
        if self.n_head % self.num_key_value_heads:
            raise ConfigError(f"{source}: n_head {self.n_head} is not divisible by num_key_value_heads "
                              f"{self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim {self.head_dim} must be even for rotary embeddings")
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ConfigError(f"{source}: field 'layer_norm_epsilon' must be a positive number, "
                              f"got {self.layer_norm_epsilon!r}")
        if self.tie_word_embeddings:
            raise ConfigError(f"{source}: tie_word_embeddings=true is not a TeleChat2 layout (embeddings are untied)")
        if self.apply_residual_connection_post_layernorm:
            raise ConfigError(f"{source}: apply_residual_connection_post_layernorm=true is not supported "
                              "(no released TeleChat2 model uses it)")
        self._validate_moe(source)
        for name, allowed in (("compute_dtype", ("float32", "float16", "bfloat16")),
                              ("param_dtype", ("float32", "float16", "bfloat16"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{source}: field '{name}' must be one of {allowed}, got {getattr(self, name)!r}")

    def _validate_moe(self, source: str) -> None:
        for name in ("num_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{source}: field '{name}' must be an integer >= 0, got {value!r}")
        if self.is_moe and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"{source}: num_experts_per_tok {self.num_experts_per_tok} must be in 1.."
                              f"{self.num_experts} (num_experts)")
        for name in ("capacity_factor", "aux_loss_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{source}: field '{name}' must be a number >= 0, got {value!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ConfigError(f"{source}: field 'norm_topk_prob' must be true or false, got {self.norm_topk_prob!r}")

    # ---------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TeleChatConfig":
        """A released size ('3b', '7b', '35b', '115b') or 'tiny', with optional field overrides."""
        key = name.lower()
        if key not in _PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[key], **overrides})

    # ---------------------------------------------------------------- counting
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight of the HF checkpoint with its shape, computed from the config alone."""
        h, f, v, d, k = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.head_dim, self.num_key_value_heads
        shapes: dict[str, tuple[int, ...]] = {"transformer.word_embeddings.weight": (v, h)}
        if self.embed_layernorm:
            shapes["transformer.word_embeddings_layernorm.weight"] = (h,)
        for i in range(self.n_layer):
            p = f"transformer.h.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attention.query.weight": (h, h),
                p + "self_attention.key_value.weight": (2 * k * d, h),
                p + "self_attention.dense.weight": (h, h),
                p + "self_attention.dense.bias": (h,),
                p + "post_attention_layernorm.weight": (h,),
            })
            shapes.update(self._ffn_shapes(p))
        shapes["transformer.ln_f.weight"] = (h,)
        shapes["lm_head.weight"] = (v, h)
        return shapes

    def _ffn_shapes(self, p: str) -> dict[str, tuple[int, ...]]:
        """One layer's FFN weights in HF names: the dense MLP, or the router and every expert (mlp.local_experts.E)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        mlps = [p + "mlp."] if not self.is_moe else [f"{p}mlp.local_experts.{e}." for e in range(self.num_experts)]
        shapes: dict[str, tuple[int, ...]] = {p + "mlp.router.weight": (self.num_experts, h)} if self.is_moe else {}
        for m in mlps:
            shapes.update({m + "gate_proj.weight": (f, h), m + "up_proj.weight": (f, h),
                           m + "down_proj.weight": (h, f), m + "down_proj.bias": (h,)})
        return shapes

    def num_parameters(self, active: bool = False) -> int:
        """Total parameter count from the config alone (nothing is allocated); with `active`, the parameters one
        token uses (an MoE token runs num_experts_per_tok of the experts)."""
        total = 0
        for name, shape in self.parameter_shapes().items():
            if active and ".local_experts." in name and int(name.split(".local_experts.")[1].split(".")[0]) >= \
                    self.num_experts_per_tok:
                continue
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TeleChatConfig":
        """Build from an HF-style dict, resolving aliases; unknown keys are kept in `extra`, the loader keys
        (architectures, auto_map, model_type) in `loader`; an export's file keys (torch_dtype, dtype) are dropped."""
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "loader"}
        kwargs: dict[str, Any] = {}
        for ours, theirs in _ALIASES.items():
            present = [k for k in (ours, *theirs) if data.get(k) is not None]
            values = {data[k] for k in present}
            if len(values) > 1:
                raise ConfigError(f"{source}: contradictory fields " + ", ".join(f"{k}={data[k]!r}" for k in present))
            for k in (ours, *theirs):
                if k in data:
                    value = data.pop(k)
                    if value is not None:
                        kwargs[ours] = value
        for key in _FFN_ALIASES:
            value = data.pop(key, None)
            if value is not None and kwargs.setdefault("ffn_hidden_size", value) != value:
                raise ConfigError(f"{source}: contradictory fields ffn_hidden_size={kwargs['ffn_hidden_size']!r}, "
                                  f"{key}={value!r}")
        for key in ("shared_expert_num", "n_shared_experts", "num_shared_experts"):
            if data.get(key):
                raise ConfigError(f"{source}: {key}={data[key]!r}: shared experts are not part of TeleChat2 MoE")
        if "n_inner" in data and data["n_inner"] is not None and "ffn_hidden_size" not in kwargs:
            kwargs["ffn_hidden_size"] = data["n_inner"]
        loader = {key: data.pop(key) for key in _LOADER_KEYS if key in data}
        for key in _FILE_KEYS:
            data.pop(key, None)
        theta = data.pop("rope_theta", None)
        if theta is not None and theta != ROPE_THETA:
            raise ConfigError(f"{source}: rope_theta {theta!r} is not TeleChat2's (its RoPE base is {ROPE_THETA:g})")
        for key in list(data):
            if key in names:
                kwargs[key] = data.pop(key)
        for required in ("hidden_size", "n_layer", "n_head", "vocab_size", "ffn_hidden_size"):
            if required not in kwargs:
                raise ConfigError(f"{source}: missing required field '{required}'")
        extra = data
        try:
            return cls(**kwargs, extra=extra, loader=loader)
        except ConfigError as exc:  # re-issue with the file's name instead of the class name
            raise ConfigError(str(exc).replace("TeleChatConfig", source, 1)) from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "TeleChatConfig":
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ConfigError(f"{file}: no config.json found")
        return cls.from_dict(read_json_object(file, ConfigError), source=file)

    def to_hf_dict(self, export_dtype: str | None = None) -> dict[str, Any]:
        """The config.json the released torch code reads (its field names, plus any preserved extras).

        With `export_dtype` (the dtype of the exported weights) it is the config of an HF export (spec 9): the same
        fields, plus what vLLM's TeleChat2ForCausalLM and transformers' trust_remote_code need (architectures, our
        configuration module in auto_map, num_key_value_heads stated even for MHA, the weights' dtype, rope_theta).
        """
        out: dict[str, Any] = {
            "architectures": ["TelechatForCausalLM"],
            "model_type": "telechat",
        }
        out.update(self.loader)
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "loader") or f.name in _RUNTIME_FIELDS:
                continue
            if f.name in _MOE_FIELDS and not self.is_moe:
                continue
            out[f.name] = getattr(self, f.name)
        if export_dtype is not None:
            # auto_map names only the code the export ships (the released modeling file is not ours to ship)
            out.update(architectures=[hf_export.ARCHITECTURE], model_type="telechat",
                       auto_map=dict(hf_export.CONFIG_AUTO_MAP), rope_theta=ROPE_THETA,
                       torch_dtype=export_dtype, dtype=export_dtype)
        return out

    def to_dict(self) -> dict[str, Any]:
        """All fields, run-time switches included (for YAML model_config)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "loader")}
        return out

    def save_pretrained(self, path: str | os.PathLike, export_dtype: str | None = None) -> str:
        """Write `config.json` into directory `path` atomically; returns the file path. With `export_dtype`, the
        config of an HF export, with our configuration module beside it (see to_hf_dict)."""
        os.makedirs(path, exist_ok=True)
        file = os.path.join(os.fspath(path), "config.json")
        if export_dtype is not None:
            hf_export.write_config_code(os.fspath(path))
        atomic_write_text(file, json.dumps(self.to_hf_dict(export_dtype), indent=2, ensure_ascii=False) + "\n")
        return file

    def replace(self, **changes: Any) -> "TeleChatConfig":
        return dataclasses.replace(self, **changes)
