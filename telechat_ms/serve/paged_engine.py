"""The serving engine over a paged kv cache: continuous batching with chunked prefill and prefix caching.

Same thread, queues and public interface as telechat_ms.serve.engine.Engine (submit, submit_score, cancel,
Sequence, sink / Delta); what differs is memory and the step. The cache is `num_blocks` blocks of `block_size`
slots shared by all sequences (telechat_ms.infer.paged); a sequence holds the blocks its tokens fill, taken from a
free list as it grows, so admission is decided by free blocks, not rows x max length, and memory is weights + the
cache + the activations of a bounded step, whatever --max-model-len says.

Each step gets a token budget (`max_num_batched_tokens`): first every decoding sequence's one token, then chunks of
the prompts being prefilled (running ones first, then newly admitted ones), so a long prompt is prefilled over
several steps while the others keep decoding. While sequences decode, chunks are also sized by time: each call's
duration is measured per shape (CallTimings), and a step takes only the prompt tokens whose calls are measured (or
extrapolated from half the width) to add at most (max_decode_slowdown - 1) x a decode step, so a long prompt slows
the running streams by at most that factor; with nothing decoding a chunk takes the whole budget.

Only sequences with tokens in the step are computed: the decoding ones in one call of [rows, 1] (rows: a power of
two), each prefill chunk in a call of [1, width] (a power-of-two width up to the budget); the context each call
gathers is a power-of-two number of blocks of its longest row, so a step costs what its live tokens cost. Decode
rows whose contexts differ by SPLIT_CONTEXT x or more run in two calls, so short conversations do not gather a long
one's context. The compiled shapes are those (rows, width, context) combinations; warmup compiles the decode rows
and chunk widths at the smallest context, longer contexts compile when first met.

Rotary tables follow the released incremental NTK rule per sequence: a prompt token takes the tables of the
prompt's length (whichever chunk computes it), a decoded token those of the length it makes, so the greedy tokens
are those of one-sequence `generate`. Full blocks enter the prefix cache (telechat_ms.serve.blocks), keyed by
their token prefix and those tables; a new prompt reuses the longest cached prefix (at least its last token is
computed) and only computes the rest. When a decoding sequence needs a block and none is free, the latest
admitted sequence is preempted: its blocks are freed and it is recomputed later (prompt + what it generated).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from telechat_ms.errors import ConfigError
from telechat_ms.infer.paged import NULL_BLOCK, chunk_area
from telechat_ms.positions import ntk_params
from telechat_ms.serve.blocks import BlockManager, NoFreeBlocks
from telechat_ms.serve.engine import Engine
from telechat_ms.serve.output import OutputBuilder
from telechat_ms.serve.sampler import SequenceSampler
from telechat_ms.serve.sequence import Sequence

__all__ = ["CallTimings", "DEFAULT_DECODE_SLOWDOWN", "PagedEngine", "PagedStepperFactory", "chunk_widths",
           "context_blocks", "pow2_at_least"]

log = logging.getLogger("telechat_ms.serve")

MIN_PREFILL = 32            # smallest chunk width
MIN_CONTEXT = 256           # smallest gathered context, in tokens
SPLIT_CONTEXT = 4           # decode rows whose contexts differ this much (in gathered blocks) run in two calls
DEFAULT_DECODE_SLOWDOWN = 2.0   # --max-decode-slowdown
GROUP_WIDTH = 64            # prefill chunks this short, of several sequences, share one call of [rows, 64]
PagedStepperFactory = Callable[[int, int], object]   # (num_blocks, block_size) -> infer.paged.PagedStepper


def pow2_at_least(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def chunk_widths(budget: int) -> list[int]:
    """Prefill chunk widths: powers of two from MIN_PREFILL up to the token budget (the budget itself last)."""
    widths, w = [], MIN_PREFILL
    while w < budget:
        widths.append(w)
        w *= 2
    return widths + [budget]


def context_blocks(n_blocks: int, block_size: int, max_blocks: int) -> int:
    """Blocks a call gathers for a longest row of n_blocks: a power of two >= MIN_CONTEXT tokens, capped."""
    return min(pow2_at_least(max(n_blocks, -(-MIN_CONTEXT // block_size))), max_blocks)


class CallTimings:
    """Measured seconds of the stepper's calls by shape (rows, width, context blocks): an exponential average per
    shape, the first call of each left out (it compiles). Decode calls (width 1) also feed one running average,
    the time a step of decodes alone takes, which bounds what a prefill chunk may add beside them."""

    def __init__(self, alpha: float = 0.3):
        self.alpha, self.by_shape, self.seen, self._decode = alpha, {}, set(), None

    def record(self, shape: tuple[int, int, int], seconds: float) -> None:
        if shape not in self.seen:
            self.seen.add(shape)
            return
        old = self.by_shape.get(shape)
        self.by_shape[shape] = seconds if old is None else old + self.alpha * (seconds - old)
        if shape[1] == 1:
            self._decode = seconds if self._decode is None else self._decode + self.alpha * (seconds - self._decode)

    def decode_time(self) -> float | None:
        return self._decode

    def estimate(self, shape: tuple[int, int, int], half: tuple[int, int, int] | None = None) -> float | None:
        """The shape's average, else twice its half-width shape's (work grows at most linearly in width)."""
        if shape in self.by_shape:
            return self.by_shape[shape]
        if half is not None and half in self.by_shape:
            return 2.0 * self.by_shape[half]
        return None


class PagedEngine(Engine):
    """Engine over a paged cache of `num_blocks` blocks (block 0 is the null block) of `block_size` slots."""

    def __init__(self, stepper_factory: PagedStepperFactory, tokenizer, vocab_size: int, max_model_len: int, *,
                 num_blocks: int, block_size: int = 16, max_num_batched_tokens: int = 512,
                 prefix_caching: bool = True, max_decode_slowdown: float = DEFAULT_DECODE_SLOWDOWN, **kwargs):
        super().__init__(stepper_factory, tokenizer, vocab_size, max_model_len, **kwargs)
        if block_size < 1:
            raise ConfigError(f"--block-size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        self.max_blocks = -(-self.max_model_len // self.block_size)       # blocks of one sequence at most
        if num_blocks - 1 < self.max_blocks:
            raise ConfigError(f"a kv cache of {num_blocks} blocks x {block_size} tokens ({num_blocks - 1} usable) "
                              f"cannot hold one sequence of --max-model-len {self.max_model_len} "
                              f"({self.max_blocks} blocks): raise --num-blocks / --kv-cache-memory-bytes or lower "
                              f"--max-model-len")
        if max_num_batched_tokens < self.batch:
            raise ConfigError(f"--max-num-batched-tokens ({max_num_batched_tokens}) must be >= --max-batch-size "
                              f"({self.batch}): every running sequence decodes one token a step")
        if max_decode_slowdown != 0 and max_decode_slowdown < 1:
            raise ConfigError(f"--max-decode-slowdown must be 0 (off) or >= 1, got {max_decode_slowdown}")
        self.budget = int(max_num_batched_tokens)
        self.slowdown = float(max_decode_slowdown)
        self.timings = CallTimings()
        self._allowance: float | None = None    # seconds of prefill this step may add to its decodes
        self.widths = chunk_widths(self.budget)
        self.group_width = GROUP_WIDTH if GROUP_WIDTH in self.widths and self.batch > 1 else 0
        self.blocks = BlockManager(num_blocks, self.block_size, prefix_caching)
        self.cache_len = num_blocks * self.block_size
        self.area = chunk_area(self.budget, self.max_blocks * self.block_size, MIN_PREFILL)
        self._admissions = 0

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        if self.stepper is None:
            self.stepper = self.factory(self.blocks.num_blocks, self.block_size)
            self._set_block_metrics()
            if self.warmup_on_start:
                self.warmup()

    def row_buckets(self) -> list[int]:
        """Row counts of a decode call: powers of two below max_batch_size, then it."""
        out, r = [], 1
        while r < self.batch:
            out.append(r)
            r *= 2
        return out + [self.batch]

    def warmup(self) -> None:
        """Compile the decode call at every row count and the prefill call at every chunk width (at their smallest
        contexts), all rows padding (their writes go to the null block)."""
        for rows in self.row_buckets():
            self._call([], rows, 1, 1)
        for width in self.widths:
            self._call([], 1, width, -(-width // self.block_size))
        if self.group_width:
            for rows in self.row_buckets()[1:]:
                self._call([], rows, self.group_width, -(-self.group_width // self.block_size))

    def prefill_widths(self) -> list[int]:
        return list(self.widths)

    # ------------------------------------------------------------------ bookkeeping
    def _tokens(self, seq: Sequence) -> list[int]:
        return seq.prompt_ids + seq.output_ids

    def _total(self, seq: Sequence, pos: np.ndarray) -> np.ndarray:
        """The NTK total length of the tokens at `pos` (released rule: a prompt's tokens take the prompt's length,
        a generated token the length it makes)."""
        return np.where(pos < len(seq.prompt_ids), len(seq.prompt_ids), pos + 1)

    def _tag(self, total: int) -> tuple[float, float, float]:
        cfg = self.stepper.cfg
        return ntk_params(total, cfg.head_dim, cfg.training_seqlen, cfg.base_seqlen)

    def _chunk_len(self, start: int, n: int) -> int:
        """At most n tokens from `start`, fewer where width x gathered context would pass the chunk area (deep
        in a long prompt chunks narrow, so activations stay bounded whatever --max-model-len)."""
        while n > MIN_PREFILL:
            width = next(w for w in self.widths if w >= n)
            ctx = context_blocks(-(-(start + n) // self.block_size), self.block_size, self.max_blocks)
            if width * ctx * self.block_size <= self.area:
                break
            n = width // 2
        return n

    def _chunk(self, start: int, n: int) -> int:
        """A prompt chunk of at most n tokens from `start`: within the chunk area, and, while sequences are decoding
        and more than GROUP_WIDTH tokens are left, within this step's time allowance (see _affordable); a short
        prompt is not split (its whole prefill is bounded and the first token comes a step sooner)."""
        n = self._chunk_len(start, n)
        if self._allowance is not None and n > max(MIN_PREFILL, GROUP_WIDTH):
            n, cost = self._affordable(start, n, self._allowance)
            self._allowance = max(self._allowance - cost, 0.0)
        return n

    def _affordable(self, start: int, n: int, allowance: float) -> tuple[int, float]:
        """The widest chunk (<= n tokens from `start`) whose measured or extrapolated call time fits `allowance`,
        and that time. Widths are probed by doubling: a width is estimated only from a measured half width at the
        same context, so the first chunk at a new context is MIN_PREFILL and the next ones grow while they fit."""
        bs = self.block_size
        for k in [n] + [w for w in reversed(self.widths) if MIN_PREFILL < w < n]:
            if k <= MIN_PREFILL:
                break
            width = next(w for w in self.widths if w >= k)
            ctx = context_blocks(-(-(start + k) // bs), bs, self.max_blocks)
            cost = self.timings.estimate((1, width, ctx), (1, width // 2, ctx))
            if cost is not None and cost <= allowance:
                return k, cost
        k = min(n, MIN_PREFILL)
        ctx = context_blocks(-(-(start + k) // bs), bs, self.max_blocks)
        return k, self.timings.estimate((1, MIN_PREFILL, ctx)) or 0.0

    def _reserve(self, seq: Sequence, upto: int) -> int:
        """Give seq blocks for its first `upto` tokens, as many as are free; returns the tokens it can hold."""
        while len(seq.blocks) * self.block_size < upto:
            try:
                seq.blocks.append(self.blocks.allocate())
            except NoFreeBlocks:
                break
        return min(upto, len(seq.blocks) * self.block_size)

    def _register(self, seq: Sequence) -> None:
        """Offer seq's newly full blocks to the prefix cache (keyed by token prefix and rotary tables)."""
        bs, tokens = self.block_size, None
        while (len(seq.block_keys) + 1) * bs <= seq.cached:
            i = len(seq.block_keys)
            tokens = tokens or self._tokens(seq)
            first, last = self._total(seq, np.array([i * bs, i * bs + bs - 1]))
            tag_first, tag_last = self._tag(int(first)), self._tag(int(last))
            parent = seq.block_keys[-1] if seq.block_keys else None
            key = hash((parent, tuple(tokens[i * bs:(i + 1) * bs]), tag_first if tag_first == tag_last else None))
            seq.block_keys.append(key)
            if tag_first == tag_last:
                self.blocks.register(seq.blocks[i], key)

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks, seq.block_keys, seq.cached = [], [], 0

    def _set_block_metrics(self) -> None:
        m, b = self.metrics, self.blocks
        m.blocks_used.set(b.num_used)
        m.blocks_free.set(b.num_free)
        m.blocks_cached.set(len(b.by_hash))
        m.cache_usage.set(b.num_used / max(b.usable, 1))

    def _finish(self, seq: Sequence, text: str, reason: str, **kw) -> None:
        if seq.blocks:
            self._release(seq)
        super()._finish(seq, text, reason, **kw)

    def _advance(self, seq: Sequence, logits: np.ndarray) -> None:
        super()._advance(seq, logits)
        if seq.row is not None and self.rows[seq.row] is seq \
                and len(seq.prompt_ids) + len(seq.output_ids) >= self.max_model_len:
            self._finish(seq, seq.output.finish(), "length")

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first, to be recomputed (prompt + its tokens so far)."""
        log.info("preempting a sequence of %d tokens: the kv cache is full", seq.cached)
        self._release(seq)
        self.rows[seq.row] = None
        seq.row = None
        self.waiting.appendleft(seq)
        with self._lock:
            self._pending += 1
            self.metrics.waiting.set(self._pending)
        self._set_running()
        self.metrics.preemptions.inc()

    def _score(self, job) -> None:
        """A scoring job through the engine's own blocks (serve.paged_score.PagedScorer) waits, first in line, while
        running sequences hold the blocks its prompt needs."""
        need = getattr(self.scorer, "blocks_needed", None)
        if need is not None and not job.cancelled and need(job.ids) > self.blocks.num_free \
                and any(r is not None for r in self.rows):
            self.scores.appendleft(job)
            return
        super()._score(job)

    # ------------------------------------------------------------------ scheduling
    def _iteration(self) -> None:
        self._reap()
        if self.scores:
            self._score(self.scores.popleft())
        decode, chunks = self._schedule()
        if decode or chunks:
            self._run(decode, chunks)
        self._set_block_metrics()
        if self._idle():
            self._flush()

    def _live(self) -> list[Sequence]:
        return sorted((s for s in self.rows if s is not None), key=lambda s: s.admitted_at)

    def _schedule(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """This step's work within the token budget: decoding sequences (one token each), then prefill chunks."""
        budget = self.budget
        decode: list[Sequence] = []
        for seq in self._live():
            if seq.row is None or len(self._tokens(seq)) - seq.cached != 1:
                continue
            while self._reserve(seq, seq.cached + 1) < seq.cached + 1:
                victim = self._live()[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.row is not None:
                decode.append(seq)
        budget -= len(decode)
        self._allowance = None
        if decode and self.slowdown:   # decodes wait on this step's prefill: bound what it adds to their latency
            decode_time = self.timings.decode_time()
            self._allowance = (self.slowdown - 1.0) * decode_time if decode_time is not None else 0.0
        chunks: list[tuple[Sequence, int]] = []
        for seq in self._live():
            pending = len(self._tokens(seq)) - seq.cached
            if budget <= 0 or pending <= 1:
                continue
            n = self._reserve(seq, seq.cached + self._chunk(seq.cached, min(pending, budget))) - seq.cached
            if n > 0:
                chunks.append((seq, n))
                budget -= n
        while budget > 0 and self.waiting and None in self.rows:
            head = self.waiting[0]
            if len(head.prompt_ids) >= self.max_model_len:   # callers of submit() that skipped the HTTP checks
                self.waiting.popleft()
                self._unpend(1)
                self._finish(head, "", "error", error=f"the prompt has {len(head.prompt_ids)} tokens: no room for "
                             f"an answer within --max-model-len {self.max_model_len}")
                continue
            admitted = self._admit_one(budget)
            if admitted is None:
                break
            chunks.append(admitted)
            budget -= admitted[1]
        if not decode and not chunks and any(r is not None for r in self.rows):
            self._preempt(self._live()[-1])   # every block is held by sequences that cannot go on
        return decode, chunks

    def _admit_one(self, budget: int) -> tuple[Sequence, int] | None:
        """Seat the first waiting sequence if blocks for its first chunk are free: (seq, chunk tokens) or None."""
        seq = self.waiting[0]
        tokens, bs = self._tokens(seq), self.block_size
        reusable = (len(tokens) - 1) // bs           # its last token is always computed (its logits are needed)
        keys: list[int] = []
        if self.blocks.prefix_caching and reusable:
            tags = [self._tag(int(t)) for t in self._total(seq, np.array([0, reusable * bs - 1]))]
            if tags[0] == tags[1]:   # every reusable token takes the same tables
                parent = None
                for i in range(reusable):
                    parent = hash((parent, tuple(tokens[i * bs:(i + 1) * bs]), tags[0]))
                    keys.append(parent)
        hit = self.blocks.lookup(keys)
        n = self._chunk(len(hit) * bs, min(len(tokens) - len(hit) * bs, budget))
        if -(-(len(hit) * bs + n) // bs) - len(hit) > self.blocks.num_free:
            self.blocks.release(hit)
            return None
        self.waiting.popleft()
        self._unpend(1)
        row = self.rows.index(None)
        seq.row, seq.blocks, seq.block_keys = row, list(hit), keys[:len(hit)]
        seq.cached = seq.reused_tokens = len(hit) * bs
        self._admissions += 1
        seq.admitted_at = self._admissions
        self._reserve(seq, seq.cached + n)
        if seq.sampler is None:   # a preempted sequence keeps its sampler and text state
            seq.sampler = SequenceSampler(seq.params, seq.prompt_ids, self.vocab_size, seq.rng())
            seq.output = OutputBuilder(self.tokenizer, seq.params.stop, seq.params.skip_special_tokens)
            self.metrics.queue_time.observe(time.perf_counter() - seq.arrival)
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
            self.metrics.prefill_rows.observe(1)
        self.metrics.prefix_queries.inc(len(keys) * bs)
        self.metrics.prefix_hits.inc(len(hit) * bs)
        self.metrics.prefix_misses.inc((len(keys) - len(hit)) * bs)
        self.rows[row] = seq
        self._set_running()
        return seq, n

    # ------------------------------------------------------------------ the model calls
    def _call(self, rows: list[tuple[Sequence, int]], n_rows: int, width: int, ctx_need: int) -> np.ndarray:
        """One stepper call: each (seq, k) writes its next k tokens (right-aligned: the last k columns of its row);
        padding rows and columns write into the null block. Logits [n_rows, V] of the last column."""
        bs = self.block_size
        ids = np.full((n_rows, width), self.pad_token_id, np.int32)
        positions = np.zeros((n_rows, width), np.int64)
        totals = np.ones((n_rows, width), np.int64)
        slots = np.full((n_rows, width), NULL_BLOCK * bs, np.int64)
        tables = np.full((n_rows, context_blocks(ctx_need, bs, self.max_blocks)), NULL_BLOCK, np.int32)
        for r, (seq, k) in enumerate(rows):
            tokens = self._tokens(seq)
            pos = np.arange(seq.cached, seq.cached + k)
            ids[r, width - k:] = tokens[seq.cached:seq.cached + k]
            positions[r, width - k:] = pos
            totals[r, width - k:] = self._total(seq, pos)
            blocks = np.asarray(seq.blocks, np.int64)
            slots[r, width - k:] = blocks[pos // bs] * bs + pos % bs
            tables[r, :len(seq.blocks)] = seq.blocks
        start = time.perf_counter()
        logits = self.stepper.step(ids, positions, totals, slots, tables, width - 1)
        self.timings.record((n_rows, width, tables.shape[1]), time.perf_counter() - start)
        return logits

    def _decode_groups(self, decode: list[Sequence]) -> list[list[Sequence]]:
        """The decode calls of a step: one, or two when the longest contexts gather at least SPLIT_CONTEXT times
        the others' (a long conversation beside short ones: the short rows then do not gather the long context)."""
        if len(decode) < 2:
            return [decode] if decode else []
        bs = self.block_size
        ctx = {id(s): context_blocks(-(-(s.cached + 1) // bs), bs, self.max_blocks) for s in decode}
        longest = max(ctx.values())
        shorts = [s for s in decode if ctx[id(s)] < longest]
        if not shorts or longest < SPLIT_CONTEXT * max(ctx[id(s)] for s in shorts):
            return [decode]
        return [shorts, [s for s in decode if ctx[id(s)] == longest]]

    def _run(self, decode: list[Sequence], chunks: list[tuple[Sequence, int]]) -> None:
        """Run the step's calls, then advance every sequence whose pending tokens are all in the cache."""
        self._flush()   # the last step's updates go out while this step computes
        results: list[tuple[Sequence, np.ndarray]] = []
        for group in self._decode_groups(decode):
            n_rows = next(r for r in self.row_buckets() if r >= len(group))
            need = max(-(-(s.cached + 1) // self.block_size) for s in group)
            logits = self._call([(s, 1) for s in group], n_rows, 1, need)
            results += [(s, logits[i]) for i, s in enumerate(group)]
            for s in group:
                s.cached += 1
        small = [(s, k) for s, k in chunks if k <= self.group_width] if self.group_width else []
        calls = [[c] for c in chunks if c not in small] if len(small) > 1 else [[c] for c in chunks]
        if len(small) > 1:   # several short prompts (a burst of requests): one call
            calls.append(small)
        for group in calls:
            if len(group) == 1:
                n_rows, width = 1, next(w for w in self.widths if w >= group[0][1])
            else:
                n_rows, width = next(r for r in self.row_buckets() if r >= len(group)), self.group_width
            need = max(-(-(s.cached + k) // self.block_size) for s, k in group)
            logits = self._call(group, n_rows, width, need)
            for i, (seq, k) in enumerate(group):
                seq.cached += k
                self.metrics.prefill_chunks.inc()
                if seq.cached == len(self._tokens(seq)):
                    results.append((seq, logits[i]))
        self.step_count += 1
        self.metrics.steps.inc()
        self.metrics.batch_rows.observe(len(decode) + len(chunks))
        if decode and chunks:
            self.metrics.mixed_steps.inc()
        for seq, _ in [(s, 1) for s in decode] + chunks:
            self._register(seq)
        for seq, logits in results:
            if seq.row is not None and self.rows[seq.row] is seq:
                self._advance(seq, logits)
