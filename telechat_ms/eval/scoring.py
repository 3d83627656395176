"""Log-likelihood requests on the MindSpore model, batched: sum of the natural-log probabilities of a continuation's
tokens after a context, and whether greedy decoding would have produced it (lm-eval's `loglikelihood`).

Tokenisation and truncation follow lm-eval 0.4.13's HF model, so scores compare with `lm_eval --model hf`: trailing
spaces of the context move to the continuation; the continuation's tokens are encode(context + continuation) minus
the context's; the model reads (context + continuation)[-(max_len + 1):][:-1]; an empty context becomes the BOS id.

Batching: rows of similar length are stacked (right-padded: causal attention keeps the padding out of every real
token), each row with the rotary tables of its own length (TeleChat2's NTK rule depends on the sequence length, so
a padded row must not take the tables of the batch width). Requests whose continuation is one token and whose
contexts are equal (the choices " A".." D" of one question) share one row: the context is computed once and every
choice's log-prob is read at its last position. Rows that start with one long prefix (a subject's few-shot
exemplars) compute it once when the scorer has a `prefix` forward (eval/prefix.py) and run only their own tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Sequence

import numpy as np

from telechat_ms.special_tokens import BOS_ID

# rows [B, W] int32, positions [B, P] int32 (the cells read, -1 none), gather [B, P, K] int32 (ids read), lengths [B]
#   -> (log-probs [B, P, K] of the gathered ids, argmax [B, P]); the LM head runs on the read positions only
BatchForward = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

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


class PrefixForward(Protocol):
    """A shared context computed once (eval/prefix.py): `key(total)` equal for rows that may share a prefix,
    `prefix(ids, total)` its state, `suffix(state, ids, positions, gather, lengths)` a BatchForward of the rows'
    tokens after it (positions relative to the suffix start)."""

    def key(self, total_len: int) -> Hashable: ...

    def prefix(self, ids: list[int], total_len: int) -> Any: ...

    def suffix(self, state: Any, ids: np.ndarray, positions: np.ndarray, gather: np.ndarray,
               lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _first_read(row: _Row) -> int:
    return min(row.gather)


def _best_split(lcp: list[int], lo: int, hi: int, min_prefix: int) -> list[tuple[int, int, int]]:
    """Groups (start, end, prefix) of the sorted rows lo..hi (lcp[i]: tokens rows i and i + 1 may share) that save
    the most tokens: a group of m rows with prefix p saves (m - 1) p - min_prefix (its extra forward); each range
    either stays one group (prefix = its least lcp) or splits where that least lcp is. Iterative (no recursion
    limit on long tasks)."""
    best: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]] = {}
    stack = [(lo, hi, False)]
    while stack:
        a, b, ready = stack.pop()
        if b - a < 2:
            best[(a, b)] = (0, [])
            continue
        cut = min(range(a, b - 1), key=lambda i: lcp[i])
        if not ready:
            stack += [(a, b, True), (a, cut + 1, False), (cut + 1, b, False)]
            continue
        p = lcp[cut]
        whole = (b - a - 1) * p - min_prefix if p >= min_prefix else 0
        left, right = best.pop((a, cut + 1)), best.pop((cut + 1, b))
        split = left[0] + right[0]
        best[(a, b)] = (whole, [(a, b, p)]) if whole > split else (split, left[1] + right[1])
    return best[(lo, hi)][1]


def group_prefixes(rows: list[_Row], key: Callable[[int], Hashable], min_prefix: int
                   ) -> tuple[list[tuple[int, list[_Row]]], list[_Row]]:
    """Rows that start with one long common prefix, as (prefix length, rows) groups, and the rest. Rows sorted by
    (tables key, ids) sit next to the rows they share most with; runs sharing >= min_prefix tokens are split into
    the groups that save the most tokens (an outlier does not shorten a subject's shared exemplars). Rows of other
    tables keys never share; a prefix ends before every cell a row reads (those are computed with the row)."""
    order = sorted(rows, key=lambda r: (key(len(r.ids)), r.ids))
    keys = [key(len(r.ids)) for r in order]
    lcp = [min(_common(order[i].ids, order[i + 1].ids), _first_read(order[i]), _first_read(order[i + 1]))
           if keys[i] == keys[i + 1] else 0 for i in range(len(order) - 1)]
    groups: list[tuple[int, list[_Row]]] = []
    start = 0
    for end in range(1, len(order) + 1):          # runs cut where nothing worth sharing is shared
        if end == len(order) or lcp[end - 1] < min_prefix:
            groups += [(p, order[a:b]) for a, b, p in _best_split(lcp, start, end, min_prefix)]
            start = end
    grouped = {id(r) for _, m in groups for r in m}
    return groups, [r for r in order if id(r) not in grouped]


@dataclass
class LoglikelihoodScorer:
    """loglikelihood requests -> (sum of log-probs, is_greedy), in batches of `batch_size` rows. With `prefix`,
    rows that start with a long common prefix (>= min_prefix tokens: a subject's few-shot exemplars) compute it
    once and run only their own tokens against it, more rows a forward (`suffix_rows`)."""

    forward: BatchForward
    max_len: int
    batch_size: int = 8
    share_context: bool = True
    pad_id: int = 3
    prefix: PrefixForward | None = None
    min_prefix: int = 32
    forwards: int = 0              # rows run so far (benchmarks report it)

    def score(self, requests: Sequence[tuple[list[int], list[int]]],
              progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        rows = plan_rows(requests, self.max_len, self.share_context)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: list[tuple[int, list[_Row]]] = []
        if self.prefix is not None and self.share_context:
            groups, rows = group_prefixes(rows, self.prefix.key, self.min_prefix)
        for p, members in groups:
            state = self.prefix.prefix(members[0].ids[:p], len(members[0].ids))
            fwd = functools.partial(self.prefix.suffix, state)
            self._run(fwd, sorted(members, key=lambda r: -len(r.ids)), p, out, progress,
                      self.suffix_rows(max(len(r.ids) for r in members), p))
        self._run(self.forward, sorted(rows, key=lambda r: -len(r.ids)), 0, out, progress,  # similar lengths together
                  self.batch_size)
        return out  # type: ignore[return-value]

    def suffix_rows(self, longest: int, prefix_len: int) -> int:
        """Rows a forward after a shared prefix: as many as hold the tokens of batch_size whole rows (the memory
        --batch-size bounds: activations and attention scores grow with rows x suffix tokens), at most 8x."""
        room = self.batch_size * longest // max(1, longest - prefix_len)
        return max(self.batch_size, min(room, 8 * self.batch_size))

    def _run(self, forward: BatchForward, rows: list[_Row], skip: int, out: list, progress, batch_rows: int
             ) -> None:
        """Rows in batches through `forward`, each row's first `skip` tokens left out (a prefix computed before)."""
        for start in range(0, len(rows), batch_rows):
            batch = rows[start:start + batch_rows]
            width = max(len(r.ids) for r in batch) - skip
            cells = [sorted(r.gather) for r in batch]
            npos = max(len(c) for c in cells)
            k = max(len(s) for r in batch for s in r.gather.values())
            ids = np.full((len(batch), width), self.pad_id, np.int32)
            positions = np.full((len(batch), npos), -1, np.int32)       # -1: no cell (rows read fewer)
            gather = np.zeros((len(batch), npos, k), np.int32)
            lengths = np.array([len(r.ids) - skip for r in batch], np.int64)
            for b, row in enumerate(batch):
                ids[b, :len(row.ids) - skip] = row.ids[skip:]
                positions[b, :len(cells[b])] = np.asarray(cells[b]) - skip
                for p, pos in enumerate(cells[b]):
                    gather[b, p, :len(row.gather[pos])] = row.gather[pos]
            logp, argmax = forward(ids, positions, gather, lengths)
            self.forwards += len(batch)
            for b, row in enumerate(batch):
                where = {pos: p for p, pos in enumerate(cells[b])}
                for req, reads in row.reads:
                    total = float(sum(logp[b, where[pos], s] for pos, s in reads))
                    greedy = all(int(argmax[b, where[pos]]) == int(gather[b, where[pos], s]) for pos, s in reads)
                    out[req] = (total, greedy)
                if progress is not None:
                    progress(len(row.reads))


def local_forward(model) -> BatchForward:
    """BatchForward over a TeleChatForCausalLM in this process: one full forward of right-padded rows, each with
    the rotary tables of its own length; the LM head, log-softmax and gathers run on the positions read only."""
    import mindspore as ms
    from mindspore import nn, ops

    from telechat_ms.positions import causal_mask, tables_for

    cfg = model.config

    class Gathered(nn.Cell):
        def __init__(self, lm):
            super().__init__(auto_prefix=False)
            self.lm = lm

        def construct(self, input_ids, positions, gather, cos, sin, mask):
            hidden = self.lm.model(input_ids, cos, sin, mask)                       # [B, W, H]
            idx = ops.broadcast_to(positions.expand_dims(-1), (positions.shape[0], positions.shape[1],
                                                               hidden.shape[-1]))
            picked = ops.gather_elements(hidden, 1, idx)                           # [B, P, H]
            logits = ops.cast(self.lm.lm_head(picked), ms.float32)
            logp = ops.log_softmax(logits, -1)
            return ops.gather_elements(logp, 2, gather), ops.argmax(logits, -1)

    cell = Gathered(model)
    cell.set_train(False)

    def run(ids: np.ndarray, positions: np.ndarray, gather: np.ndarray, lengths: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
        b, w = ids.shape
        cos = np.zeros((b, 1, w, cfg.head_dim), np.float32)
        sin = np.zeros_like(cos)
        for i, n in enumerate(lengths):
            c, s = tables_for(cfg, int(n), int(n))
            cos[i, 0, :n], sin[i, 0, :n] = c, s
        mask = np.broadcast_to(causal_mask(w), (b, 1, w, w)).copy()
        positions = np.maximum(positions, 0).astype(np.int32)
        logp, argmax = cell(ms.Tensor(ids), ms.Tensor(positions), ms.Tensor(gather), ms.Tensor(cos), ms.Tensor(sin),
                            ms.Tensor(mask))
        return logp.asnumpy().astype(np.float64), argmax.asnumpy()
    return run


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def stepper_forward(stepper, pad_id: int = 3) -> BatchForward:
    """BatchForward through a kv-cache stepper with CacheStepper.step's signature: the local one, the model-parallel
    stepper under the predict strategies (whose build has no full forward), or its single-process emulation.

    Every row is prefilled right-aligned into its own slots 0..n-1 with the rotary tables of its total n, the
    tables the full forward gives it, so the logits of a column equal the full forward's; a step returns one column
    (the same for every row), so the rows are stepped once per distinct distance of a read cell from the row's end:
    once for one-token continuations (multiple choice), k times for k-token ones. Idle rows write the scratch slot.
    """
    rows, max_len = stepper.batch, stepper.max_len
    scratch = max_len - 1

    def run(ids: np.ndarray, positions: np.ndarray, gather: np.ndarray, lengths: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
        b, w = ids.shape
        if b > rows:
            raise ValueError(f"{b} rows do not fit the stepper's {rows} (use --batch-size <= {rows})")
        if w > scratch:
            raise ValueError(f"a row of {w} tokens does not fit the kv cache's {scratch} slots")
        step_ids = np.full((rows, w), pad_id, np.int32)
        pos = np.zeros((rows, w), np.int64)
        slots = np.full((rows, w), scratch, np.int64)
        totals = np.ones(rows, np.int64)
        for i in range(b):
            n = int(lengths[i])
            step_ids[i, w - n:] = ids[i, :n]
            pos[i, w - n:] = np.arange(n)
            slots[i, w - n:] = np.arange(n)
            totals[i] = n
        by_offset: dict[int, list[tuple[int, int]]] = {}
        for i in range(b):
            for j in range(positions.shape[1]):
                if positions[i, j] >= 0:
                    by_offset.setdefault(int(lengths[i]) - 1 - int(positions[i, j]), []).append((i, j))
        logp = np.zeros(gather.shape, np.float64)
        argmax = np.zeros(positions.shape, np.int64)
        for k, cells in sorted(by_offset.items()):
            logits = np.asarray(stepper.step(step_ids, pos, totals, slots, np.zeros(rows, np.int64), w - 1 - k))
            lp = _log_softmax(logits)
            for i, j in cells:
                logp[i, j] = lp[i, gather[i, j]]
                argmax[i, j] = int(np.argmax(logits[i]))
        return logp, argmax
    return run
