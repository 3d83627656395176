"""Next-token selection on host logits (numpy): the Hugging Face processors, in the HF order.

Order (as transformers applies them): repetition penalty (greedy too), then, when sampling, temperature,
top-k, top-p; then argmax or a draw from the softmax. Draws use one numpy Generator per generation, so a fixed
seed reproduces the same tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def apply_repetition_penalty(logits: np.ndarray, seen: Sequence[Sequence[int]], penalty: float) -> np.ndarray:
    """HF rule on every id a row has seen (prompt + generated): logit > 0 -> logit / p, else logit * p."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for b, ids in enumerate(seen):
        idx = np.unique(np.asarray(ids, np.int64))
        if idx.size:
            score = out[b, idx]
            out[b, idx] = np.where(score > 0, score / np.float32(penalty), score * np.float32(penalty))
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """logits / temperature (1.0 leaves them unchanged)."""
    return logits if temperature == 1.0 else logits / np.float32(temperature)


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep the top_k largest logits of each row (ties with the k-th are kept), -inf elsewhere; 0 disables."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
    return np.where(logits < kth, np.float32(-np.inf), logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (-inf entries get probability 0)."""
    x = logits.astype(np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """HF nucleus filter: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p; keep the best."""
    if top_p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    cum = np.cumsum(softmax(sorted_logits), axis=-1)
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[:, -1] = False  # always keep the most probable token
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(-np.inf), logits)


def process_logits(logits: np.ndarray, seen: Sequence[Sequence[int]], do_sample: bool = False,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0) -> np.ndarray:
    """All processors in HF order on float32 logits [B, V]."""
    scores = apply_repetition_penalty(np.asarray(logits, np.float32), seen, repetition_penalty)
    if do_sample:
        scores = apply_top_p(apply_top_k(apply_temperature(scores, temperature), top_k), top_p)
    return scores


def select_tokens(scores: np.ndarray, do_sample: bool, rng: np.random.Generator | None) -> np.ndarray:
    """argmax per row, or one draw per row from softmax(scores) by inverse CDF on rng.random()."""
    if not do_sample:
        return scores.argmax(axis=-1)
    if rng is None:
        rng = np.random.default_rng()
    probs = softmax(scores)
    cum = np.cumsum(probs, axis=-1)
    draws = rng.random(scores.shape[0]) * cum[:, -1]
    picked = np.array([np.searchsorted(cum[b], draws[b], side="right") for b in range(scores.shape[0])])
    picked = np.minimum(picked, scores.shape[-1] - 1)
    # never land on a filtered (probability 0) token through floating-point edge cases
    bad = probs[np.arange(len(picked)), picked] == 0
    if bad.any():
        picked[bad] = scores[bad].argmax(axis=-1)
    return picked
