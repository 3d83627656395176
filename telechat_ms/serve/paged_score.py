"""Prompt log-probs (echo + logprobs, lm-eval's scoring) through the paged engine's own stepper, so a server
without a compiled full forward (`serve --config` model parallel: only the paged step is laid out) still scores.

The prompt is prefilled into blocks of its own, in the engine's chunks, each call returning the logits of every
column (PagedStepper.step_columns); every token takes the tables of the prompt's length, as the full forward's do
(the released rule), so the log-probs are the full forward's to float rounding (tests). The blocks go back after:
nothing enters the prefix cache. It runs on the engine thread between steps (Engine._score); when the cache has
no room for the prompt now, the job waits for running sequences to free blocks (PagedEngine._score).
"""
from __future__ import annotations

import numpy as np

from telechat_ms.infer.paged import NULL_BLOCK
from telechat_ms.serve.paged_engine import context_blocks


class PagedScorer:
    """Scorer (prompt ids -> logits [S, V]) over a PagedEngine's stepper and blocks."""

    def __init__(self, engine):
        self.engine = engine

    def blocks_needed(self, ids: list[int]) -> int:
        return -(-len(ids) // self.engine.block_size)

    def __call__(self, ids: list[int]) -> np.ndarray:
        eng = self.engine
        bs, total = eng.block_size, len(ids)
        blocks = [eng.blocks.allocate() for _ in range(self.blocks_needed(ids))]   # NoFreeBlocks: the job fails
        try:
            out, start = [], 0
            while start < total:
                n = eng._chunk_len(start, min(total - start, eng.budget))
                width = next(w for w in eng.widths if w >= n)
                need = -(-(start + n) // bs)
                pos = np.arange(start, start + n)
                ids_a = np.full((1, width), eng.pad_token_id, np.int32)
                positions = np.zeros((1, width), np.int64)
                totals = np.ones((1, width), np.int64)
                slots = np.full((1, width), NULL_BLOCK * bs, np.int64)
                tables = np.full((1, context_blocks(need, bs, eng.max_blocks)), NULL_BLOCK, np.int32)
                ids_a[0, width - n:] = ids[start:start + n]
                positions[0, width - n:] = pos
                totals[0, width - n:] = total                 # the prompt's length: the full forward's tables
                slots[0, width - n:] = np.asarray(blocks, np.int64)[pos // bs] * bs + pos % bs
                tables[0, :need] = blocks[:need]
                out.append(eng.stepper.step_columns(ids_a, positions, totals, slots, tables)[0, width - n:])
                start += n
            return np.concatenate(out)
        finally:
            eng.blocks.release(blocks)
