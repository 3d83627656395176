"""Greedy generation for evaluation through the serving engine's public interface (Engine.submit of Sequences with
SamplingParams, answers through their sink as Deltas), so many samples decode at once on whichever engine serve/
provides, and a sample's answer does not depend on its batch mates."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence as Seq

from telechat_ms.errors import TeleChatError
from telechat_ms.serve.engine import Engine, QueueFull
from telechat_ms.serve.output import Delta
from telechat_ms.serve.sampler import SamplingParams
from telechat_ms.serve.sequence import Sequence


class GenerationError(TeleChatError, RuntimeError):
    """The engine failed a sequence."""


@dataclass
class GenRequest:
    """One greedy generation: prompt ids, stop strings, token budget."""

    prompt_ids: list[int]
    until: tuple[str, ...] = ()
    max_tokens: int = 256


def fit(prompt_ids: list[int], max_tokens: int, max_model_len: int) -> tuple[list[int], int]:
    """Prompt and budget that fit the engine's rows: a prompt that fits is kept whole and the budget capped to the
    room left (as `serve` caps a default max_tokens); a longer one keeps its last tokens, leaving room for the
    budget (lm-eval's HF model keeps the last max_length - max_gen_toks)."""
    budget = max(1, min(max_tokens, max_model_len - 1))
    if len(prompt_ids) < max_model_len:
        return list(prompt_ids), min(budget, max_model_len - len(prompt_ids))
    return list(prompt_ids[-(max_model_len - budget):]), budget


def generate_greedy(engine: Engine, requests: Seq[GenRequest], stop_token_ids: Seq[int],
                    on_done: Callable[[int, str], None] | None = None) -> list[str]:
    """The answer text of every request (stop strings cut, as OpenAI / lm-eval do); submitted as the engine's
    rows and queue allow, in order; on_done(i, text) as each finishes."""
    texts = [""] * len(requests)
    done = [False] * len(requests)
    errors: list[str] = []
    cond = threading.Condition()

    def sink_for(i: int) -> Callable[[Delta], None]:
        def sink(delta: Delta) -> None:
            texts[i] += delta.text
            if delta.finished:
                with cond:
                    if delta.finish_reason in ("error", "abort"):
                        errors.append(f"request {i}: {delta.finish_reason}: {delta.error or ''}")
                    done[i] = True
                    cond.notify_all()
                if on_done is not None and delta.finish_reason not in ("error", "abort"):
                    on_done(i, texts[i])
        return sink

    pending = list(range(len(requests)))
    pending.reverse()
    while pending:
        i = pending[-1]
        prompt, budget = fit(requests[i].prompt_ids, requests[i].max_tokens, engine.max_model_len)
        params = SamplingParams(max_tokens=budget, temperature=0.0, stop=tuple(s for s in requests[i].until if s),
                                stop_token_ids=tuple(sorted(set(stop_token_ids))))
        try:
            engine.submit([Sequence(prompt, params, sink_for(i))])
            pending.pop()
        except QueueFull:
            with cond:
                cond.wait(0.05)
        if errors:
            break
    with cond:
        while not all(done) and not errors:
            cond.wait(0.5)
            if not engine.alive and not all(done):
                errors.append("the engine stopped")
    if errors:
        raise GenerationError("generation failed: " + "; ".join(errors[:3]))
    return texts
