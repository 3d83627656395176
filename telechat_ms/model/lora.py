"""LoRA for TeleChat2: low-rank adapters on chosen projections (wq, wk_v, wo, w1, w2, w3), merge and save.

The adapted layer keeps the base parameter names (attention.wq.weight ...) so checkpoints stay compatible;
adapters add `<layer>.lora_a` [r, in] and `<layer>.lora_b` [out, r]; y = base(x) + (alpha / r) * B A x.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn
from mindspore.common.initializer import HeUniform, initializer
from mindspore.ops import operations as P

from telechat_ms.backend import Linear
from telechat_ms.checkpoint_io import assign_from_safetensors, write_sharded_safetensors
from telechat_ms.errors import CheckpointError, ConfigError
from telechat_ms.io import atomic_output_dir, atomic_write_text, read_json_object
from telechat_ms.weights import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TARGETS = {"wq": "attention", "wk_v": "attention", "wo": "attention", "w1": "feed_forward",
           "w2": "feed_forward", "w3": "feed_forward"}


class LoRALinear(nn.Cell):
    """A frozen base Linear plus a trainable low-rank update; the base keeps its parameter names."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.scaling = alpha / rank
        self.lora_a = Parameter(initializer(HeUniform(negative_slope=math.sqrt(5)), [rank, self.in_channels],
                                            ms.float32), name="lora_a")
        self.lora_b = Parameter(initializer("zeros", [self.out_channels, rank], ms.float32), name="lora_b")
        self.matmul_a = P.MatMul(transpose_b=True)
        self.matmul_b = P.MatMul(transpose_b=True)
        self.reshape = P.Reshape()
        self.cast = P.Cast()
        self.add = P.Add()
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None

    def construct(self, x):
        out = self.base(x)
        h = self.reshape(x, (-1, self.in_channels))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.cast(h, ms.float32)
        delta = self.matmul_b(self.matmul_a(h, self.lora_a), self.lora_b) * self.scaling
        delta = self.reshape(delta, out.shape)
        return self.add(out, self.cast(delta, out.dtype))


def _set_base_names(base: Linear, prefix: str) -> None:
    """MindSpore renames parameters when a cell is re-attached; keep the checkpoint names."""
    base.weight.name = f"{prefix}.weight"
    if base.has_bias:
        base.bias.name = f"{prefix}.bias"


def _targets(model, target_modules: list[str]):
    for i, layer in enumerate(model.model.layers):
        for name in target_modules:
            if name not in TARGETS:
                raise ConfigError(f"LoRA target '{name}' is not one of {sorted(TARGETS)}")
            yield i, getattr(layer, TARGETS[name]), name


def apply_lora(model, rank: int, alpha: float, dropout: float = 0.0, target_modules: list[str] | None = None):
    """Wrap the target projections of every layer; freeze everything else. Returns the trainable parameters."""
    targets = list(target_modules or ["wq", "wk_v"])
    moe_ffn = [t for t in targets if t in ("w1", "w2", "w3")] if model.config.is_moe else []
    if moe_ffn:
        raise ConfigError(f"model.lora.target_modules {moe_ffn}: LoRA on MoE experts (stacked w1/w2/w3) is not "
                          "supported; target the attention projections (wq, wk_v, wo)")
    for _, parent, name in _targets(model, targets):
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    # Re-derive full names: base weights keep theirs ('...wq.weight'), adapters become '...wq.lora_a'.
    names = {}
    for i, parent, name in _targets(model, targets):
        prefix = f"model.layers.{i}.{TARGETS[name]}.{name}"
        cell = getattr(parent, name)
        _set_base_names(cell.base, prefix)
        cell.lora_a.name, cell.lora_b.name = f"{prefix}.lora_a", f"{prefix}.lora_b"
        names[cell.lora_a.name] = cell.lora_a
        names[cell.lora_b.name] = cell.lora_b
    for param in model.get_parameters():
        param.requires_grad = param.name in names
    model.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": targets}
    return list(names.values())


def lora_parameters(model) -> dict[str, Parameter]:
    return {p.name: p for p in model.get_parameters() if p.name.endswith((".lora_a", ".lora_b"))}


def save_adapter(model, path: str, base_model: str = "") -> str:
    """Write adapter_config.json + adapter_model.safetensors (adapter weights only), atomically."""
    params = lora_parameters(model)
    if not params:
        raise CheckpointError("the model has no LoRA adapters to save")
    names = sorted(params)
    specs = [(n, tuple(params[n].shape), "float32") for n in names]
    with atomic_output_dir(path, overwrite=True) as tmp:
        write_sharded_safetensors(tmp, specs, lambda i: params[names[i]].asnumpy(), 10**12, prefix="adapter_model")
        atomic_write_text(os.path.join(tmp, ADAPTER_CONFIG),
                          json.dumps({**model.lora_config, "base_model": base_model}, indent=2) + "\n")
    return path


def load_adapter(model, path: str) -> None:
    """Apply the adapter config to `model` and load the adapter weights (strict)."""
    cfg_file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG}")
    cfg = read_json_object(cfg_file, CheckpointError)
    apply_lora(model, cfg["rank"], cfg["alpha"], cfg.get("dropout", 0.0), cfg["target_modules"])
    assign_from_safetensors(os.path.join(path, ADAPTER_WEIGHTS), lora_parameters(model), "adapter")


def merge_lora(model) -> None:
    """Fold every adapter into its base weight (W += alpha/r * B A) and unwrap the layers."""
    for i, layer in enumerate(model.model.layers):
        for name, parent_name in TARGETS.items():
            parent = getattr(layer, parent_name)
            cell = getattr(parent, name)
            if not isinstance(cell, LoRALinear):
                continue
            base = cell.base
            w = base.weight.asnumpy().astype(np.float32)
            delta = cell.scaling * (cell.lora_b.asnumpy() @ cell.lora_a.asnumpy())
            base.weight.set_data(ms.Tensor((w + delta).astype(np.float32), dtype=base.weight.dtype))
            setattr(parent, name, base)
            _set_base_names(base, f"model.layers.{i}.{parent_name}.{name}")
    for param in model.get_parameters():
        param.requires_grad = True
    model.lora_config = None
