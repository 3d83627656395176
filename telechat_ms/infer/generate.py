"""The generation loop: prefill, then one token per step with the kv cache; greedy or sampled; batched rows.

Same loop as the torch reference's `TeleChatRef.generate` (telechat_ms/reference/torch_model.py), so the two can
be compared token for token: raw step logits -> processors -> token; finished rows are fed pad_token_id.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from telechat_ms.errors import ConfigError
from telechat_ms.infer.gen_config import GenerationConfig, model_generation_config
from telechat_ms.infer.kv_cache import session_for
from telechat_ms.infer.sampling import process_logits, select_tokens


@dataclass
class GenerationOutput:
    """Result of generate(): per row the full sequence, the new tokens (stop id excluded) and why it ended."""

    sequences: list[list[int]]
    new_tokens: list[list[int]]
    finish_reasons: list[str]                    # "stop" (a stop id was produced) or "length"
    step_logits: list[np.ndarray] | None = None  # raw fp32 logits [B, V] of every step, when asked for
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        """Tokens produced over all rows (stop ids included)."""
        return sum(len(s) for s in self.sequences) - self.prompt_tokens

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode throughput over all rows (tokens after the first, per second of decode steps)."""
        steps = len(self.step_seconds)
        return steps * len(self.sequences) / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass
class Step:
    """One generated position: the token of every row, which rows were already finished, raw logits."""

    tokens: np.ndarray      # [B] int64 (pad_token_id for rows finished earlier)
    active: np.ndarray      # [B] bool: the row was still generating at this step
    logits: np.ndarray      # [B, V] fp32 raw model logits that produced the tokens


def prepare_rows(input_ids: Any, attention_mask: Any = None) -> list[list[int]]:
    """Prompt rows as lists of ids: accepts a list of ids, a list of lists, a numpy array or a Tensor [B, S];
    attention_mask [B, S] (1 = real token, 0 = pad) removes padding on either side."""
    if hasattr(input_ids, "asnumpy"):
        input_ids = input_ids.asnumpy()
    if hasattr(input_ids, "numpy") and not isinstance(input_ids, np.ndarray):
        input_ids = input_ids.numpy()
    if isinstance(input_ids, np.ndarray):
        rows = input_ids.reshape(1, -1).tolist() if input_ids.ndim == 1 else input_ids.tolist()
    elif isinstance(input_ids, Sequence) and input_ids and all(isinstance(i, (int, np.integer)) for i in input_ids):
        rows = [list(input_ids)]
    elif isinstance(input_ids, Sequence):
        rows = [list(r) for r in input_ids]
    else:
        raise ValueError(f"input_ids: expected ids, a list of id lists or an array, got {type(input_ids).__name__}")
    if attention_mask is not None:
        mask = np.asarray(attention_mask.asnumpy() if hasattr(attention_mask, "asnumpy") else attention_mask)
        mask = mask.reshape(len(rows), -1)
        if any(len(r) != mask.shape[1] for r in rows):
            raise ValueError("attention_mask must have the shape of input_ids")
        rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, mask)]
    if not rows:
        raise ValueError("input_ids: no prompt given")
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"input_ids row {b} is empty")
    return [[int(t) for t in r] for r in rows]


def resolve_config(model, generation_config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    """The model's defaults (its generation_config.json), then an explicit config, then keyword overrides."""
    base = generation_config if generation_config is not None else model_generation_config(model)
    config = base.replace(**options) if options else base
    vocab = model.config.vocab_size
    bad = [i for i in config.stop_ids | {config.pad_token_id} if i >= vocab]
    if bad:
        raise ConfigError(f"generation config: token id(s) {sorted(bad)} are outside the vocabulary ({vocab})")
    return config


def iter_generate(model, rows: list[list[int]], config: GenerationConfig, use_jit: bool = True,
                  timings: dict[str, Any] | None = None) -> Iterator[Step]:
    """Yield one Step per generated position until every row stopped or max_new_tokens is reached."""
    batch, longest = len(rows), max(len(r) for r in rows)
    session = session_for(model, batch, longest + config.max_new_tokens, use_jit)
    rng = np.random.default_rng(config.seed) if not config.greedy else None
    seen = [list(r) for r in rows]
    stop = np.array(sorted(config.stop_ids), np.int64)
    active = np.ones(batch, bool)
    timings = {} if timings is None else timings
    start = time.perf_counter()
    logits = session.prefill(rows)
    timings["prefill_seconds"] = time.perf_counter() - start
    timings.setdefault("step_seconds", [])
    for step in range(config.max_new_tokens):
        scores = process_logits(logits, seen, not config.greedy, config.temperature, config.top_k, config.top_p,
                                config.repetition_penalty)
        tokens = select_tokens(scores, not config.greedy, rng).astype(np.int64)
        tokens = np.where(active, tokens, config.pad_token_id)
        yield Step(tokens, active.copy(), logits)
        for b in np.flatnonzero(active):
            seen[b].append(int(tokens[b]))
        active &= ~np.isin(tokens, stop)
        if not active.any() or step == config.max_new_tokens - 1:
            break
        start = time.perf_counter()
        logits = session.decode(tokens)
        timings["step_seconds"].append(time.perf_counter() - start)


def generate(model, input_ids: Any, generation_config: GenerationConfig | None = None, attention_mask: Any = None,
             use_jit: bool = True, return_step_logits: bool = False,
             on_step: Callable[[Step], None] | None = None, **options: Any) -> GenerationOutput:
    """Generate from one prompt or a batch of prompts of any lengths (left-padded internally, pads masked).

    options are GenerationConfig fields (max_new_tokens, do_sample, temperature, top_k, top_p,
    repetition_penalty, eos_token_id, stop_token_ids, pad_token_id, seed) overriding the model's
    generation_config.json. use_jit compiles the step in graph mode (fast after a few seconds of compiling).
    """
    config = resolve_config(model, generation_config, options)
    rows = prepare_rows(input_ids, attention_mask)
    sequences = [list(r) for r in rows]
    new_tokens: list[list[int]] = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    step_logits: list[np.ndarray] | None = [] if return_step_logits else None
    timings: dict[str, Any] = {}
    stop_ids = config.stop_ids
    for step in iter_generate(model, rows, config, use_jit, timings):
        if step_logits is not None:
            step_logits.append(step.logits)
        for b in np.flatnonzero(step.active):
            token = int(step.tokens[b])
            sequences[b].append(token)
            if token in stop_ids:
                reasons[b] = "stop"
            else:
                new_tokens[b].append(token)
        if on_step is not None:
            on_step(step)
    steps = timings.get("step_seconds", [])
    return GenerationOutput(sequences, new_tokens, reasons, step_logits, sum(len(r) for r in rows),
                            timings.get("prefill_seconds", 0.0), float(sum(steps)), steps)
