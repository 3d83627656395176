"""Per-sequence token selection for the serving engine.

The HF processors of telechat_ms.infer.sampling (so a lone request picks exactly what `model.generate` picks with
the same settings and seed) plus the OpenAI / vLLM extras: logit_bias, presence and frequency penalties (the OpenAI
formula on the sequence's own output counts) and min_p. Every sequence owns its numpy Generator, so a seeded
request draws the same tokens whatever it is batched with.

Order (vLLM's): logit_bias, repetition penalty (HF rule on prompt + output ids), presence / frequency penalties;
greedy picks the argmax there; sampling goes on with temperature, top-k, top-p, min_p and one draw.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from telechat_ms.infer.sampling import apply_temperature, apply_top_k, apply_top_p, select_tokens, softmax


@dataclass
class SamplingParams:
    """How one sequence picks its tokens and when it ends (validated by the HTTP layer, defaults resolved)."""

    max_tokens: int
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()          # strings that end the answer (not included in it)
    stop_token_ids: tuple[int, ...] = ()  # ids that end the answer: eos (unless ignore_eos) + the request's
    logprobs: int | None = None         # None: no log-probs; k >= 0: the chosen token's and the top k
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        """Pick the argmax (temperature 0)."""
        return self.temperature == 0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (log-probs as vLLM reports them: of the raw model logits)."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (id, log-prob) pairs of one row, most likely first."""
    if k <= 0:
        return []
    k = min(k, logprobs.shape[-1])
    idx = np.argpartition(-logprobs, k - 1)[:k]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in idx]


class SequenceSampler:
    """Token selection state of one sequence: seen ids (repetition penalty), output counts, its Generator."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int,
                 rng: np.random.Generator | None):
        self.params = params
        self.vocab = vocab_size
        self.seen = np.zeros(vocab_size, bool)
        self.seen[np.asarray(prompt_ids, np.int64)] = True
        self.counts = np.zeros(vocab_size, np.int64)   # output tokens only (OpenAI penalties)
        self.bias = None
        if params.logit_bias:
            self.bias = np.zeros(vocab_size, np.float32)
            for token, value in params.logit_bias.items():
                self.bias[token] = value
        self.rng = rng

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Penalised (and, when sampling, filtered) float32 scores [1, V] of one row of raw logits."""
        p = self.params
        scores = np.asarray(logits[: self.vocab], np.float32).copy()
        if self.bias is not None:
            scores += self.bias
        if p.repetition_penalty != 1.0:
            idx = np.flatnonzero(self.seen)
            picked = scores[idx]
            penalty = np.float32(p.repetition_penalty)
            scores[idx] = np.where(picked > 0, picked / penalty, picked * penalty)
        if p.presence_penalty or p.frequency_penalty:
            scores -= (np.float32(p.frequency_penalty) * self.counts
                       + np.float32(p.presence_penalty) * (self.counts > 0)).astype(np.float32)
        scores = scores[None]
        if p.greedy:
            return scores
        scores = apply_top_p(apply_top_k(apply_temperature(scores, p.temperature), p.top_k), p.top_p)
        if p.min_p > 0:
            probs = softmax(scores)
            scores = np.where(probs < p.min_p * probs.max(axis=-1, keepdims=True), np.float32(-np.inf), scores)
        return scores

    def pick(self, logits: np.ndarray) -> int:
        """The next token of this sequence from its raw logits [V]."""
        scores = self.scores(logits)
        if self.params.greedy:
            return int(scores[0].argmax())
        return int(select_tokens(scores, True, self.rng)[0])

    def record(self, token: int) -> None:
        """Count a produced token (for the penalties)."""
        self.seen[token] = True
        self.counts[token] += 1
