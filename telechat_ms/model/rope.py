"""TeleChat2 rotary tables: rotate-half RoPE with the released NTK-aware base and attention scaling (mscale).

The tables are pure functions of (positions, total length) and are built on the host with numpy, then fed to the
model as inputs: that keeps the MindSpore graph free of data-dependent shapes and lets the kv cache apply the
released incremental rule (tables for the new total length, applied only to the new tokens).
"""
from __future__ import annotations

import math

import numpy as np

ROPE_BASE = 10000.0  # hard-coded in the released code (no rope_theta key)


def ntk_params(total_len: int, head_dim: int, training_seqlen: int, base_seqlen: int) -> tuple[float, float, float]:
    """(ntk_alpha, rotary base, mscale) for a sequence of `total_len` tokens (spec section 1)."""
    length = max(int(total_len), int(training_seqlen))
    context_value = math.log(length / base_seqlen, 2) + 1
    ntk_alpha = max(2 ** math.ceil(context_value) - 1, 1)
    base = ROPE_BASE * ntk_alpha ** (head_dim / (head_dim - 2))
    ratio = length / training_seqlen
    mscale = 1.0 if ratio <= 1 else 0.1 * math.log(ratio) + 1.0
    return float(ntk_alpha), float(base), float(mscale)


def rope_tables(positions: np.ndarray | range | int, total_len: int, head_dim: int, training_seqlen: int,
                base_seqlen: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [len(positions), head_dim] (float32, mscale folded in) for the given total length.

    Arithmetic follows the released torch code in float32: inv_freq = 1 / base ** (arange(0, d, 2) / d),
    angles = t x inv_freq, emb = cat(angles, angles).
    """
    if isinstance(positions, int):
        positions = np.arange(positions)
    pos = np.asarray(positions, dtype=np.float32)
    _, base, mscale = ntk_params(total_len, head_dim, training_seqlen, base_seqlen)
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponent, dtype=np.float32)).astype(np.float32)
    freqs = np.outer(pos, inv_freq).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos = (np.cos(emb) * np.float32(mscale)).astype(np.float32)
    sin = (np.sin(emb) * np.float32(mscale)).astype(np.float32)
    return cos, sin
