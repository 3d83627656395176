"""Log-likelihood requests on the MindSpore model, batched: sum of the natural-log probabilities of a continuation's
tokens after a context, and whether greedy decoding would have produced it (lm-eval's `loglikelihood`).

Tokenisation and truncation follow lm-eval 0.4.13's HF model, so scores compare with `lm_eval --model hf`: trailing
spaces of the context move to the continuation; the continuation's tokens are encode(context + continuation) minus
the context's; the model reads (context + continuation)[-(max_len + 1):][:-1]; an empty context becomes the BOS id.

Batching: rows of similar length are stacked (right-padded: causal attention keeps the padding out of every real
token), each row with the rotary tables of its own length (TeleChat2's NTK rule depends on the sequence length, so
a padded row must not take the tables of the batch width). Requests whose continuation is one token and whose
contexts are equal (the choices " A".." D" of one question) share one row: the context is computed once and every
choice's log-prob is read at its last position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from telechat_ms.special_tokens import BOS_ID

# rows [B, W] int32, gather [B, W, K] int32, lengths [B] -> (log-probs [B, W, K] of the gathered ids, argmax [B, W])
BatchForward = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_token_id: int = BOS_ID) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HFLM._encode_pair splits them."""
    if context == "":
        return [prefix_token_id], encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


@dataclass
class _Row:
    ids: list[int]
    # (request index, [(position, slot)]): the request sums the log-probs gathered at these cells
    reads: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)
    gather: dict[int, list[int]] = field(default_factory=dict)   # position -> token ids to gather there


def plan_rows(requests: Sequence[tuple[list[int], list[int]]], max_len: int, share_context: bool = True) -> list[_Row]:
    """The forward rows that answer every (context ids, continuation ids) request."""
    rows: list[_Row] = []
    shared: dict[tuple[int, ...], _Row] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i}: the continuation has no tokens")
        whole = (list(ctx) + list(cont))[-(max_len + 1):]
        ids = whole[:-1]
        n = len(cont)
        if share_context and n == 1:
            key = tuple(ids)
            row = shared.get(key)
            if row is None:
                row = shared[key] = _Row(ids)
                rows.append(row)
        else:
            row = _Row(ids)
            rows.append(row)
        cells = []
        for j, tok in enumerate(whole[-n:]):
            pos = len(ids) - n + j
            slots = row.gather.setdefault(pos, [])
            if tok not in slots:
                slots.append(tok)
            cells.append((pos, slots.index(tok)))
        row.reads.append((i, cells))
    return rows


@dataclass
class LoglikelihoodScorer:
    """loglikelihood requests -> (sum of log-probs, is_greedy), in batches of `batch_size` rows."""

    forward: BatchForward
    max_len: int
    batch_size: int = 8
    share_context: bool = True
    pad_id: int = 3
    forwards: int = 0              # rows run so far (benchmarks report it)

    def score(self, requests: Sequence[tuple[list[int], list[int]]],
              progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        rows = plan_rows(requests, self.max_len, self.share_context)
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r].ids))       # similar lengths together
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = [rows[r] for r in order[start:start + self.batch_size]]
            width = max(len(r.ids) for r in batch)
            k = max(len(s) for r in batch for s in r.gather.values())
            ids = np.full((len(batch), width), self.pad_id, np.int32)
            gather = np.zeros((len(batch), width, k), np.int32)
            lengths = np.array([len(r.ids) for r in batch], np.int64)
            for b, row in enumerate(batch):
                ids[b, :len(row.ids)] = row.ids
                for pos, toks in row.gather.items():
                    gather[b, pos, :len(toks)] = toks
            logp, argmax = self.forward(ids, gather, lengths)
            self.forwards += len(batch)
            for b, row in enumerate(batch):
                for req, cells in row.reads:
                    total = float(sum(logp[b, p, s] for p, s in cells))
                    greedy = all(int(argmax[b, p]) == int(gather[b, p, s]) for p, s in cells)
                    out[req] = (total, greedy)
                if progress is not None:
                    progress(len(row.reads))
        return out  # type: ignore[return-value]


def local_forward(model) -> BatchForward:
    """BatchForward over a TeleChatForCausalLM in this process: one full forward of right-padded rows, each with
    the rotary tables of its own length; the log-softmax and the gathers run in the model's graph."""
    import mindspore as ms
    from mindspore import nn, ops

    from telechat_ms.positions import causal_mask, tables_for

    cfg = model.config

    class Gathered(nn.Cell):
        def __init__(self, lm):
            super().__init__(auto_prefix=False)
            self.lm = lm

        def construct(self, input_ids, gather, cos, sin, mask):
            logits = self.lm(input_ids, None, cos, sin, mask)
            logp = ops.log_softmax(logits, -1)
            return ops.gather_elements(logp, 2, gather), ops.argmax(logits, -1)

    cell = Gathered(model)
    cell.set_train(False)

    def run(ids: np.ndarray, gather: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b, w = ids.shape
        cos = np.zeros((b, 1, w, cfg.head_dim), np.float32)
        sin = np.zeros_like(cos)
        for i, n in enumerate(lengths):
            c, s = tables_for(cfg, int(n), int(n))
            cos[i, 0, :n], sin[i, 0, :n] = c, s
        mask = np.broadcast_to(causal_mask(w), (b, 1, w, w)).copy()
        logp, argmax = cell(ms.Tensor(ids), ms.Tensor(gather), ms.Tensor(cos), ms.Tensor(sin), ms.Tensor(mask))
        return logp.asnumpy().astype(np.float64), argmax.asnumpy()
    return run
