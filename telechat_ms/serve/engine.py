"""The serving engine: one thread owns the model and runs continuous batching over a static kv cache.

Requests arrive through a thread-safe queue. Between model steps the engine drops cancelled sequences, admits
waiting ones into free rows, and runs ONE step over all rows: the prompts of the sequences admitted together are
prefilled in it (right-aligned in a width bucket) while every decoding row writes its one new token in the last
column, so decoding never stalls behind a prefill. Each row owns its slots: a sequence starts at slot 0 of its
row and its token at position p sits in slot p, so the released incremental NTK rule (tables of each row's own
total length) holds per row. Columns that carry no token of a row (the padding of a shorter prompt, idle rows)
write into the reserved scratch slot L - 1 that no query ever attends, so a step never touches a live slot it does
not own and a greedy answer does not depend on what it is batched with.

The model is driven only through a stepper with CacheStepper.step's signature, built by the factory the engine
is given (a local CacheStepper, or a model-parallel stepper under msrun); prompt log-probs come from a full
forward through the `scorer` callable.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Callable, Protocol

import numpy as np

from telechat_ms.errors import ConfigError
from telechat_ms.infer.kv_cache import MIN_PREFILL, bucket
from telechat_ms.serve.metrics import ServeMetrics
from telechat_ms.serve.output import Delta, OutputBuilder, TokenLogprob
from telechat_ms.serve.sampler import SequenceSampler, log_softmax, top_logprobs
from telechat_ms.serve.sequence import ScoreJob, Sequence
from telechat_ms.special_tokens import PAD_ID

__all__ = ["Engine", "EngineStopped", "QueueFull", "ScoreJob", "Scorer", "Sequence", "Stepper", "StepperFactory"]

log = logging.getLogger("telechat_ms.serve")


class Stepper(Protocol):
    """What the engine calls: CacheStepper.step (telechat_ms.infer.kv_cache)."""

    def step(self, ids: np.ndarray, positions: np.ndarray, totals: np.ndarray, slots: np.ndarray,
             first_slot: np.ndarray, last: int) -> np.ndarray: ...


StepperFactory = Callable[[int, int], Stepper]      # (batch rows, cache slots) -> stepper
Scorer = Callable[[list[int]], np.ndarray]          # prompt ids -> full-forward logits [S, V]


class QueueFull(Exception):
    """The waiting queue is full (HTTP 503 with Retry-After)."""


class EngineStopped(Exception):
    """The engine thread is not running (HTTP 503)."""


class Engine:
    """Continuous batching over `max_batch_size` rows of `max_model_len` tokens (+ one scratch slot)."""

    def __init__(self, stepper_factory: StepperFactory, tokenizer, vocab_size: int, max_model_len: int,
                 max_batch_size: int = 8, max_queue: int = 64, scorer: Scorer | None = None,
                 metrics: ServeMetrics | None = None, pad_token_id: int = PAD_ID, warmup: bool = True,
                 batch_window: float = 0.0, on_idle: Callable[[], None] | None = None, idle_interval: float = 60.0):
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.factory, self.tokenizer, self.vocab_size = stepper_factory, tokenizer, int(vocab_size)
        self.max_model_len, self.batch, self.max_queue = int(max_model_len), int(max_batch_size), int(max_queue)
        self.cache_len = self.max_model_len + 1
        self.scratch = self.max_model_len         # the slot nobody attends
        self.scorer, self.pad_token_id, self.warmup_on_start = scorer, pad_token_id, warmup
        self.batch_window = max(0.0, float(batch_window))   # seconds an idle engine gathers a burst of requests
        # called every idle_interval seconds while nothing runs (a model-parallel leader keeps its followers alive)
        self.on_idle, self.idle_interval = on_idle, float(idle_interval)
        self.metrics = metrics or ServeMetrics(self.batch)
        self.rows: list[Sequence | None] = [None] * self.batch
        self.waiting: deque[Sequence] = deque()
        self.scores: deque[ScoreJob] = deque()
        self.inbox: queue.Queue = queue.Queue()
        self.step_count = 0
        self._lock = threading.Lock()
        self._pending = 0            # submitted, not yet in a row (guarded by _lock)
        self._running = 0
        self._max_rows = 0
        self._outbox: list[tuple[Sequence, Delta]] = []
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.start_error: BaseException | None = None
        self.stepper: Stepper | None = None

    # ------------------------------------------------------------------ other threads
    @property
    def alive(self) -> bool:
        """Accepting work: the engine thread runs (or, driven by run_once, the stepper is built)."""
        if self._stopping:
            return False
        return self._thread.is_alive() if self._thread is not None else self.stepper is not None

    def prepare(self) -> None:
        """Build the stepper (and compile its graphs when warmup is on); the thread does this first."""
        if self.stepper is None:
            self.stepper = self.factory(self.batch, self.cache_len)
            if self.warmup_on_start:
                self.warmup()

    def start(self, timeout: float | None = None) -> "Engine":
        """Start the engine thread; returns once the stepper is built (and warmed up)."""
        self._thread = threading.Thread(target=self._main, name="telechat-engine", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self.start_error is not None:
            exc = self.start_error
            raise ConfigError(f"the engine failed to start ({self.batch} rows x {self.cache_len} cache slots): "
                              f"{type(exc).__name__}: {exc}") from exc
        return self

    def run_once(self) -> bool:
        """One scheduling iteration without the thread (tests, tools): take the inbox, reap, admit, one step.
        Returns whether work is left."""
        self._drain(block=False)
        self._iteration()
        return bool(self.waiting or self.scores or any(r is not None for r in self.rows))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the thread; sequences still running end with finish_reason 'abort'."""
        self._stopping = True
        self.inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); QueueFull when the waiting queue cannot take them."""
        with self._lock:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            free_rows = self.batch - self._running
            if self._pending + len(seqs) > self.max_queue + max(free_rows, 0):
                raise QueueFull(f"{self._pending} requests are waiting (--max-queue {self.max_queue})")
            self._pending += len(seqs)
            self.metrics.waiting.set(self._pending)
        self.inbox.put(("seqs", seqs))

    def submit_score(self, job: ScoreJob) -> None:
        """Queue a full-forward scoring job (echo + logprobs)."""
        if not self.alive:
            raise EngineStopped("the engine is not running")
        if self.scorer is None:
            raise ValueError("this engine has no full-forward scorer: prompt log-probs are not available")
        self.inbox.put(("score", job))

    def cancel(self, seq: Sequence | ScoreJob) -> None:
        """Ask for a sequence to be dropped (client gone): its row is freed before the next step."""
        if isinstance(seq, Sequence) and not seq.cancelled:
            seq.cancel_step = self.step_count
        seq.cancelled = True
        self.inbox.put(("wake", None))

    # ------------------------------------------------------------------ engine thread
    def _main(self) -> None:
        try:
            self.prepare()
        except BaseException as exc:  # reported by start()
            self.start_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while self._drain(block=self._idle()):
                try:
                    self._iteration()
                except Exception as exc:  # a bug in one iteration fails its sequences, not the server
                    log.exception("engine iteration failed")
                    self.metrics.engine_errors.inc()
                    for seq in [s for s in self.rows if s is not None]:
                        self._finish(seq, "", "error", error=f"{type(exc).__name__}: {exc}")
                    self._flush()
        finally:
            self._stopping = True
            self._abort_all("the server is shutting down")

    def _idle(self) -> bool:
        return not self.waiting and not self.scores and all(r is None for r in self.rows)

    def _iteration(self) -> None:
        self._reap()
        if self.scores:
            self._score(self.scores.popleft())
        admitted = self._admit()
        if any(r is not None for r in self.rows):
            self._step(admitted)
        if self._idle():   # no step comes next to carry the updates out
            self._flush()

    def prefill_widths(self) -> list[int]:
        """Every prefill width a step can have (a power-of-two bucket, capped at max_model_len)."""
        widths, n = [], 1
        while True:
            w = min(bucket(n, MIN_PREFILL), self.max_model_len)
            widths.append(w)
            if w >= self.max_model_len:
                return widths
            n = w + 1

    def warmup(self) -> None:
        """Compile the decode step and every prefill width once, with all rows idle (writes go to scratch)."""
        for width in [1] + self.prefill_widths():
            self._run_step(*self._empty_inputs(width), width - 1)

    def _empty_inputs(self, width: int):
        b = self.batch
        return (np.full((b, width), self.pad_token_id, np.int32), np.zeros((b, width), np.int64),
                np.ones(b, np.int64), np.full((b, width), self.scratch, np.int64), np.zeros(b, np.int64))

    def _run_step(self, ids, positions, totals, slots, first, last) -> np.ndarray:
        return self.stepper.step(ids, positions, totals, slots, first, last)

    def _drain(self, block: bool) -> bool:
        """Move the inbox into the engine's queues (waiting for something when block). False: stop.

        An idle engine woken by a request waits up to batch_window seconds for the rest of a burst, so the burst
        is prefilled in one step (every step computes all rows, so each extra prefill step costs a full one)."""
        try:
            if not block:
                item = self.inbox.get_nowait()
            elif self.on_idle is None:
                item = self.inbox.get()
            else:
                item = self.inbox.get(timeout=self.idle_interval)
        except queue.Empty:
            if block and self.on_idle is not None:
                self.on_idle()
            return True
        deadline = time.perf_counter() + self.batch_window if block else 0.0
        while True:
            kind, payload = item
            if kind == "stop":
                return False
            if kind == "seqs":
                self.waiting.extend(payload)
            elif kind == "score":
                self.scores.append(payload)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self.waiting or len(self.waiting) >= self.batch:
                    return True
                try:
                    item = self.inbox.get(timeout=remaining)
                except queue.Empty:
                    return True

    def _reap(self) -> None:
        """Free the rows of cancelled sequences; drop cancelled waiting ones."""
        for row, seq in enumerate(self.rows):
            if seq is not None and seq.cancelled:
                self.metrics.abort_steps.observe(self.step_count - seq.cancel_step)
                self._finish(seq, "", "abort")
        if any(s.cancelled for s in self.waiting):
            kept = deque(s for s in self.waiting if not s.cancelled)
            for seq in self.waiting:
                if seq.cancelled:
                    self._unpend(1)
                    self._send(seq, Delta(seq.index, "", [], None, "abort", prompt_tokens=len(seq.prompt_ids)))
                    self.metrics.finished.labels(finished_reason="abort").inc()
            self.waiting = kept

    def _unpend(self, n: int) -> None:
        with self._lock:
            self._pending -= n
            self.metrics.waiting.set(self._pending)

    def _admit(self) -> list[Sequence]:
        admitted = []
        for row in range(self.batch):
            if self.rows[row] is not None or not self.waiting:
                continue
            seq = self.waiting.popleft()
            seq.row, seq.cached = row, 0
            seq.sampler = SequenceSampler(seq.params, seq.prompt_ids, self.vocab_size, seq.rng())
            seq.output = OutputBuilder(self.tokenizer, seq.params.stop, seq.params.skip_special_tokens)
            self.rows[row] = seq
            admitted.append(seq)
            self.metrics.queue_time.observe(time.perf_counter() - seq.arrival)
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        if admitted:
            self._unpend(len(admitted))
            self._set_running()
            self.metrics.prefill_rows.observe(len(admitted))
        return admitted

    def _set_running(self) -> None:
        running = sum(r is not None for r in self.rows)
        with self._lock:
            self._running = running
        self.metrics.running.set(running)
        if running > self._max_rows:
            self._max_rows = running
            self.metrics.batch_rows_max.set(running)

    def _step(self, admitted: list[Sequence]) -> None:
        """One model step over every row; each active row gets its next token."""
        width = min(bucket(max(len(s.prompt_ids) for s in admitted), MIN_PREFILL), self.max_model_len) \
            if admitted else 1
        ids, positions, totals, slots, first = self._empty_inputs(width)
        new_counts = {}
        for row, seq in enumerate(self.rows):
            if seq is None:
                continue
            new = seq.prompt_ids if seq.cached == 0 else seq.output_ids[-1:]
            k, start = len(new), seq.cached
            if start + k > self.scratch:
                raise AssertionError(f"row {row} would write past its {self.max_model_len} slots")
            ids[row, width - k:] = new
            positions[row, width - k:] = slots[row, width - k:] = np.arange(start, start + k)
            totals[row] = start + k
            new_counts[row] = k
        self._flush()   # the last step's updates go out while this step computes (the GIL is free then)
        logits = self._run_step(ids, positions, totals, slots, first, width - 1)
        self.step_count += 1
        self.metrics.steps.inc()
        self.metrics.batch_rows.observe(len(new_counts))
        if admitted and len(new_counts) > len(admitted):
            self.metrics.mixed_steps.inc()
        for row, k in new_counts.items():
            seq = self.rows[row]
            seq.cached += k
            self._advance(seq, logits[row])

    def _advance(self, seq: Sequence, logits: np.ndarray) -> None:
        """Pick the sequence's next token, release its text, end it when it stops."""
        params = seq.params
        token = seq.sampler.pick(logits)
        seq.sampler.record(token)
        seq.output_ids.append(token)
        if params.logprobs is not None:
            lp = log_softmax(logits[: self.vocab_size])
            seq.pending_lps.append(TokenLogprob(token, float(lp[token]), top_logprobs(lp, params.logprobs)))
        seq.pending_ids.append(token)
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.inter_token.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.generation_tokens.inc()
        if token in params.stop_token_ids:
            self._finish(seq, seq.output.finish(), "stop", stop_reason=token)
            return
        text = seq.output.add(token)
        if seq.output.stopped_by is not None:
            self._finish(seq, text, "stop", stop_reason=seq.output.stopped_by)
        elif len(seq.output_ids) >= params.max_tokens:
            self._finish(seq, text + seq.output.finish(), "length")
        elif text:
            self._send(seq, self._delta(seq, text))

    def _delta(self, seq: Sequence, text: str, reason: str | None = None, **kw) -> Delta:
        delta = Delta(seq.index, text, seq.pending_ids, seq.pending_lps if seq.params.logprobs is not None else None,
                      reason, prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids), **kw)
        seq.pending_ids, seq.pending_lps = [], []
        return delta

    def _finish(self, seq: Sequence, text: str, reason: str, **kw) -> None:
        """Send the last update and free the row."""
        if seq.row is not None and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
            self._set_running()
        self.metrics.finished.labels(finished_reason=reason).inc()
        if seq.first_token_at is not None:
            self.metrics.e2e.observe(time.perf_counter() - seq.arrival)
        self._send(seq, self._delta(seq, text, reason, **kw))

    def _send(self, seq: Sequence, delta: Delta) -> None:
        """Queue an update; _flush hands them over in one batch, just before the next model step (waking the
        event loop while this thread runs Python would make the two fight over the GIL)."""
        self._outbox.append((seq, delta))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        notify = {}
        for seq, delta in outbox:
            try:
                seq.sink(delta)
            except Exception:  # a sink of a request whose loop is gone must not stop the engine
                log.exception("delivering a result failed")
            if seq.notify is not None:   # bound methods of one mailbox count once
                notify.setdefault(id(getattr(seq.notify, "__self__", seq.notify)), seq.notify)
        for wake in notify.values():   # one wake-up per consumer (event loop) per batch
            try:
                wake()
            except Exception:
                log.exception("waking a consumer failed")

    def _score(self, job: ScoreJob) -> None:
        """Prompt log-probs from the full forward."""
        if job.cancelled:
            return
        try:
            logits = np.asarray(self.scorer(job.ids))[: len(job.ids) - 1, : self.vocab_size]
            lp = log_softmax(logits)
            result = [TokenLogprob(t, float(lp[i, t]), top_logprobs(lp[i], job.top_k))
                      for i, t in enumerate(job.ids[1:])]
        except Exception as exc:
            log.exception("scoring failed")
            result = exc
        job.done(result)

    def _abort_all(self, why: str) -> None:
        for seq in [s for s in self.rows if s is not None] + list(self.waiting):
            self._finish(seq, "", "abort", error=why)
        self.waiting.clear()
        for job in self.scores:
            job.done(RuntimeError(why))
        self.scores.clear()
        self._flush()
