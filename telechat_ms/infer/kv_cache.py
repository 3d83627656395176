"""Static-shape kv cache and the host-side bookkeeping of incremental decoding (prefill, then one token a step).

Layout: one key and one value Parameter [B, K, L, d] per layer, updated by ScatterNdUpdate at the new slots, so
every decode step has the same shapes (graph mode compiles it once per (batch, L) bucket). A step's cost grows with
the allocated L (attention reads all L slots, masked; the CPU ScatterNdUpdate kernel was measured to copy the whole
cache), not with the position; L is a power-of-two bucket of prompt + max_new_tokens. Rows are left-padded: row i's
S_i prompt tokens sit in slots [P - S_i, P), P = the longest prompt, and decode step t writes slot P + t of every
row. Pads are masked and do NOT count as positions: row i's rotary position of slot j is j - (P - S_i), so a row's
answer does not depend on what it is batched with (the released code counts pads as positions; we do not).

RoPE follows the released incremental rule (spec section 1): the tables of each new token are computed for its
row's new total length (prompt + generated so far) and applied to that token only; cached keys keep the rotation
and mscale they were stored with.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn

from telechat_ms.backend import ms_dtype
from telechat_ms.positions import cache_inputs

MIN_CACHE_LEN = 128     # smallest cache length L
MIN_PREFILL = 32        # smallest prefill width
LINEAR_BUCKETS = 4096   # lengths grow by powers of two up to this, then by multiples of it
_KEEP_SESSIONS = 3      # (batch, L) sessions kept per model, each with its compiled graphs


def bucket(n: int, minimum: int) -> int:
    """Padded length for n tokens: a power of two >= minimum, then multiples of LINEAR_BUCKETS, so that a chat or
    a batch job compiles a handful of graphs (prefill widths, cache lengths) and then reuses them."""
    n = max(int(n), minimum)
    if n <= LINEAR_BUCKETS:
        return 1 << (n - 1).bit_length()
    return -(-n // LINEAR_BUCKETS) * LINEAR_BUCKETS


class KVCache(nn.Cell):
    """Key and value caches of every layer, [B, K, L, d] each; not part of the model's parameters."""

    def __init__(self, n_layer: int, batch: int, n_kv: int, max_len: int, head_dim: int, dtype: str):
        super().__init__(auto_prefix=False)
        shape, np_dtype = (batch, n_kv, max_len, head_dim), np.float32
        zeros = Tensor(np.zeros(shape, np_dtype), dtype=ms_dtype(dtype))
        self.k = ParameterTuple([Parameter(zeros.copy(), name=f"kv_cache.key.{i}", requires_grad=False)
                                 for i in range(n_layer)])
        self.v = ParameterTuple([Parameter(zeros.copy(), name=f"kv_cache.value.{i}", requires_grad=False)
                                 for i in range(n_layer)])


class CachedStep(nn.Cell):
    """One forward of new tokens through the model with its kv cache (PyNative).

    The caches are attributes, not inputs: MindSpore compiles a graph per step cell, and passing Parameters as
    graph inputs was measured to recompile for every new cache anyway (and to run slower).
    """

    def __init__(self, lm, k_caches: ParameterTuple, v_caches: ParameterTuple):
        super().__init__(auto_prefix=False)  # never rename the model's parameters (checkpoint contract)
        self.lm = lm
        self.k_caches = k_caches
        self.v_caches = v_caches

    def construct(self, input_ids, cos, sin, attn_mask, cache_index, last_index):
        return self.lm.forward_with_cache(input_ids, cos, sin, attn_mask, self.k_caches, self.v_caches,
                                          cache_index, last_index)


class JitCachedStep(CachedStep):
    """The same step compiled in graph mode: one graph per distinct input shape (prefill bucket, decode)."""

    @ms.jit
    def construct(self, input_ids, cos, sin, attn_mask, cache_index, last_index):
        return self.lm.forward_with_cache(input_ids, cos, sin, attn_mask, self.k_caches, self.v_caches,
                                          cache_index, last_index)


class CacheStepper:
    """The compiled cached step of one model over a static kv cache of `batch` rows x `max_len` slots.

    `step` is the one interface between host-side schedulers (DecodeSession for generate(), the serving engine's
    continuous batching) and whatever runs the graph: this local stepper, or a model-parallel one under msrun
    (telechat_ms.parallel) with the same signature. Every row has its own slots, positions and total length.
    The last slot (max_len - 1) is the scratch slot: a scheduler sends the columns that carry no token of a row
    there (any number of them in one step); nothing ever attends it, and no real token may be written to it.
    """

    def __init__(self, model, batch: int, max_len: int, use_jit: bool = True):
        cfg = model.config
        self.cfg, self.batch, self.max_len = cfg, batch, max_len
        self.cache = KVCache(cfg.n_layer, batch, cfg.num_key_value_heads, max_len, cfg.head_dim, cfg.compute_dtype)
        self.cell = (JitCachedStep if use_jit else CachedStep)(model, self.cache.k, self.cache.v)

    def step(self, ids: np.ndarray, positions: np.ndarray, totals: np.ndarray, slots: np.ndarray,
             first_slot: np.ndarray, last: int) -> np.ndarray:
        """Write ids [B, n] into the cache at slots [B, n] (rotary positions [B, n], NTK of totals [B]); each row
        attends to its keys in [first_slot, own slot]. Returns fp32 logits [B, V] of column `last`."""
        inp = cache_inputs(self.cfg, positions, totals, slots, first_slot, self.max_len)
        logits = self.cell(Tensor(np.asarray(ids, np.int32)), Tensor(inp.cos), Tensor(inp.sin), Tensor(inp.mask),
                           Tensor(inp.index), Tensor(np.array([last], np.int32)))
        return logits.asnumpy()[:, 0]


class DecodeSession:
    """Host side of one generate() call over a CacheStepper: left-padded prompts, then one slot per step."""

    def __init__(self, model, batch: int, max_len: int, use_jit: bool = True, stepper: CacheStepper | None = None):
        self.stepper = stepper or CacheStepper(model, batch, max_len, use_jit)
        self.cfg, self.batch, self.max_len = model.config, batch, max_len
        self.pad = np.zeros(batch, np.int64)   # left pads of each row
        self.lengths = np.zeros(batch, np.int64)  # tokens of each row in the cache (its total length)
        self.next_slot = 0

    def _run(self, ids: np.ndarray, positions: np.ndarray, totals: np.ndarray, slots: np.ndarray,
             last: int) -> np.ndarray:
        return self.stepper.step(ids, positions, totals, slots, self.pad, last)

    def prefill(self, rows: list[list[int]]) -> np.ndarray:
        """Write the (left-padded) prompts into the cache; logits [B, V] of each row's last prompt token."""
        if len(rows) != self.batch:
            raise ValueError(f"prefill got {len(rows)} rows for a session of batch {self.batch}")
        lengths = np.array([len(r) for r in rows], np.int64)
        if lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        longest = int(lengths.max())
        width = min(bucket(longest, MIN_PREFILL), self.max_len)
        if longest + 2 > self.max_len:  # one slot to decode into, and the scratch slot
            raise ValueError(f"prompt of {longest} tokens does not fit a cache of {self.max_len} slots")
        ids = np.full((self.batch, width), self.cfg.pad_token_id, np.int32)
        self.pad = longest - lengths
        for b, row in enumerate(rows):
            ids[b, self.pad[b]:longest] = row
        slots = np.broadcast_to(np.arange(width), (self.batch, width))
        positions = np.maximum(slots - self.pad[:, None], 0)
        logits = self._run(ids, positions, lengths, slots, longest - 1)
        self.lengths, self.next_slot = lengths, longest
        return logits

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row at the next slot; logits [B, V] for the token after it."""
        slot = self.next_slot
        if slot >= self.max_len - 1:
            raise ValueError(f"kv cache of {self.max_len} slots is full (its last slot is the scratch slot)")
        totals = self.lengths + 1
        ids = np.asarray(tokens, np.int32).reshape(self.batch, 1)
        # the new token's position = the tokens before it; its tables are those of the new total length
        logits = self._run(ids, self.lengths[:, None], totals, np.full((self.batch, 1), slot), 0)
        self.lengths, self.next_slot = totals, slot + 1
        return logits


def use_stepper_factory(model, factory) -> None:
    """Make every later DecodeSession of `model` step through factory(batch, needed_len) (a stepper with at least
    needed_len slots, e.g. telechat_ms.parallel's model-parallel stepper behind rank 0's lockstep) instead of a
    local CacheStepper; None undoes it."""
    model.__dict__.pop("_telechat_decode_sessions", None)
    model.__dict__["_telechat_stepper_factory"] = factory


def session_for(model, batch: int, needed_len: int, use_jit: bool = True) -> DecodeSession:
    """A DecodeSession of at least needed_len slots, reused across calls (and their compiled graphs)."""
    sessions: OrderedDict = model.__dict__.setdefault("_telechat_decode_sessions", OrderedDict())
    factory = model.__dict__.get("_telechat_stepper_factory")
    stepper = factory(batch, needed_len) if factory else None
    max_len = stepper.max_len if stepper is not None else bucket(needed_len, MIN_CACHE_LEN)
    key = (batch, max_len, bool(use_jit))
    session = sessions.pop(key, None) or DecodeSession(model, batch, max_len, use_jit, stepper=stepper)
    sessions[key] = session
    while len(sessions) > _KEEP_SESSIONS:
        sessions.popitem(last=False)
    return session
