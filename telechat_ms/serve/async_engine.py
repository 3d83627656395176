"""The bridge between the event loop and the engine thread: submit without blocking, receive updates as awaitables.

The engine thread calls each sequence's sink; the sink hands the update to the request's asyncio queue with
call_soon_threadsafe, so HTTP handlers only ever await. Leaving a stream early (the client went away) cancels
the sequences, and the engine frees their rows before its next step.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from telechat_ms.serve.engine import Engine, ScoreJob, Sequence
from telechat_ms.serve.output import Delta, TokenLogprob
from telechat_ms.serve.sampler import SamplingParams


class Submission:
    """The sequences of one request (n choices x prompts) and the updates they send."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = engine, loop
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.seqs: list[Sequence] = []
        self.open = 0

    def _sink(self, delta: Delta) -> None:   # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)
        except RuntimeError:   # the loop is closed: nobody is listening any more
            pass

    def add(self, prompt_ids: list[int], params: SamplingParams, index: int, choice: int = 0) -> None:
        self.seqs.append(Sequence(list(prompt_ids), params, self._sink, index=index, choice=choice))

    def start(self) -> "Submission":
        """Queue every sequence (raises QueueFull / EngineStopped before anything is queued)."""
        self.engine.submit(self.seqs)
        self.open = len(self.seqs)
        return self

    async def updates(self) -> AsyncIterator[Delta]:
        """Every update of every sequence until all have finished; cancels the rest when left early."""
        try:
            while self.open:
                delta = await self.queue.get()
                if delta.finished:
                    self.open -= 1
                yield delta
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Drop every sequence still running or waiting."""
        if self.open:
            for seq in self.seqs:
                self.engine.cancel(seq)


class AsyncEngine:
    """What the routes use: generate(...) -> Submission, score(...) -> prompt log-probs."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                 choices: list[int] | None = None) -> Submission:
        """One sequence per (prompt, params) pair, answering choice index = its position (choices[i]: its number
        among its prompt's n choices); all queued at once."""
        sub = Submission(self.engine, asyncio.get_running_loop())
        for index, (ids, p) in enumerate(zip(prompts, params)):
            sub.add(ids, p, index, choices[index] if choices else index)
        return sub.start()

    async def score(self, ids: list[int], top_k: int) -> list[TokenLogprob]:
        """Log-prob of every prompt token after the first (full forward), with its top_k alternatives."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(result) -> None:   # engine thread
            def resolve() -> None:
                if future.done():
                    return
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            try:
                loop.call_soon_threadsafe(resolve)
            except RuntimeError:
                pass

        job = ScoreJob(list(ids), top_k, done)
        self.engine.submit_score(job)
        try:
            return await future
        finally:
            if not future.done():
                self.engine.cancel(job)
