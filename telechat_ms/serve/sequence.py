"""A sequence (one answer being generated) and a scoring job: what the HTTP side hands the engine, and the
engine-side state of each (its row, cached tokens, sampler, text output)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from telechat_ms.serve.output import Delta, OutputBuilder, TokenLogprob
from telechat_ms.serve.sampler import SamplingParams, SequenceSampler


@dataclass(eq=False)
class Sequence:
    """One answer being generated: its prompt, settings, where its updates go, and its engine-side state."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Delta], None]
    notify: Callable[[], None] | None = None   # called once after a batch of sink() calls (wakes a consumer)
    index: int = 0                  # the choice it answers in the response
    choice: int = 0                 # its number among the n choices of its prompt (seeds its Generator)
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    cancel_step: int = 0
    # engine-thread state
    row: int | None = None
    cached: int = 0
    output_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    sampler: SequenceSampler | None = None
    output: OutputBuilder | None = None
    pending_ids: list[int] = field(default_factory=list)
    pending_lps: list[TokenLogprob] = field(default_factory=list)
    # paged engine (telechat_ms.serve.paged_engine): the kv-cache blocks it holds, the prefix-cache keys of its
    # full blocks so far, when it was admitted (the latest is preempted first), prefix-cache tokens it reused
    blocks: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)
    admitted_at: int = 0
    reused_tokens: int = 0

    def rng(self) -> np.random.Generator | None:
        """The sequence's own Generator: the seed for choice 0 (the draws of generate(seed=...)), (seed, i) for
        choice i, so every prompt of a batch draws what it would alone."""
        if self.params.greedy:
            return None
        seed = self.params.seed
        if seed is None:
            return np.random.default_rng()
        return np.random.default_rng(seed if self.choice == 0 else [seed, self.choice])


@dataclass(eq=False)
class ScoreJob:
    """Prompt log-probs from a full forward: result[i] is token i+1 given tokens 0..i."""

    ids: list[int]
    top_k: int
    done: Callable[[list[TokenLogprob] | Exception], None]
    cancelled: bool = False
