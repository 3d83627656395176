"""A paged kv cache: fixed-size blocks of slots shared by every sequence, read back through per-row block tables.

Layout: one key and one value Parameter per layer. In one process it is head-major, [K * num_slots, d] (row
h * num_slots + slot: kv head h of a slot), so the gather of a row's context indices [R, K, C] lands in the
[R, K, C, d] the attention takes, with no transpose (on CPU the two transposes per layer were a fifth of a decode
step's kernel time). Model parallel keeps [num_slots, K, d] (slot-major: whole kv heads split across ranks on axis
1). A step writes each new token's key and value at its slot (ScatterUpdate of whole rows) and each row attends
over the blocks of its table only, gathered into [R, K, C, d] (C = the table's blocks x block_size, a bucket of
the live context): a step costs what its rows' live contexts cost, not what the cache could hold, and the cache
is sized by a block count or a memory budget, not by rows x max length. Block 0 is the null block: table entries
past a row's blocks point at it and padding tokens write into it; the mask hides it (its context indices are past
every query's position).

On CPU this is the gather above. The host-side bookkeeping (which blocks a sequence owns, prefix sharing) lives in
telechat_ms.serve.blocks; the scheduler in telechat_ms.serve.paged_engine.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn
from mindspore.common.initializer import initializer

from telechat_ms.backend import ms_dtype
from telechat_ms.infer.paged_budget import (ATTN_CONTEXT, DEFAULT_KV_CACHE_BYTES, DTYPE_BYTES,  # noqa: F401
                                            call_activation_bytes, chunk_area, kv_bytes_per_token,
                                            plan_num_blocks, step_activation_bytes)
from telechat_ms.positions import paged_inputs

NULL_BLOCK = 0          # never allocated: padding writes go here, past-the-end table entries point here


class PagedKVCache(nn.Cell):
    """Key and value slots of every layer; not model parameters. Layouts: slot-major [num_blocks * block_size, K, d],
    head-major [K * num_blocks * block_size, d] (head_major), or blocked [num_blocks, block_size, K, d]."""

    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int, dtype: str,
                 blocked: bool = False, head_major: bool = False):
        super().__init__(auto_prefix=False)
        if blocked and head_major:
            raise ValueError("a paged cache is blocked (the Ascend kernels' layout) or head-major, not both")
        # initializer: no host copy of the zeros (a numpy array per Parameter was measured to cost 1.7x the cache)
        # blocked: [num_blocks, block_size, K, d], the Ascend kernels' layout (the same slots, block-major)
        slots = num_blocks * block_size
        shape = (num_blocks, block_size, n_kv, head_dim) if blocked else \
            (n_kv * slots, head_dim) if head_major else (slots, n_kv, head_dim)
        ms_type = ms_dtype(dtype)
        self.k = ParameterTuple([Parameter(initializer("zeros", shape, ms_type), name=f"paged_cache.key.{i}",
                                           requires_grad=False) for i in range(n_layer)])
        self.v = ParameterTuple([Parameter(initializer("zeros", shape, ms_type), name=f"paged_cache.value.{i}",
                                           requires_grad=False) for i in range(n_layer)])


class PagedStep(nn.Cell):
    """One forward of new tokens through the model over the paged cache (PyNative); caches are attributes."""

    def __init__(self, lm, k_caches: ParameterTuple, v_caches: ParameterTuple):
        super().__init__(auto_prefix=False)  # never rename the model's parameters (checkpoint contract)
        self.lm = lm
        self.k_caches = k_caches
        self.v_caches = v_caches

    def construct(self, input_ids, cos, sin, attn_mask, write_slots, block_table, last_index):
        return self.lm.forward_paged(input_ids, cos, sin, attn_mask, self.k_caches, self.v_caches, write_slots,
                                     block_table, last_index)


class JitPagedStep(PagedStep):
    """The same step in graph mode: one graph per (rows, width, context blocks) shape."""

    @ms.jit
    def construct(self, input_ids, cos, sin, attn_mask, write_slots, block_table, last_index):
        return self.lm.forward_paged(input_ids, cos, sin, attn_mask, self.k_caches, self.v_caches, write_slots,
                                     block_table, last_index)


def kernels_for_device() -> bool:
    """Whether the paged step takes Ascend's ReshapeAndCache / PagedAttention kernels: on device_target Ascend."""
    return ms.get_context("device_target") == "Ascend"


class PagedStepper:
    """The compiled paged step of one model over `num_blocks` blocks of `block_size` slots (block 0: null).

    kernels (default: on device_target Ascend, kernels_for_device): the caches in the kernels' block-major layout,
    writes through ReshapeAndCache and decode attention through PagedAttention (TeleChatAttention._paged_kernels);
    the scheduler's slots and block tables are the same. Written for Ascend and never run there: on CPU the
    kernels have no implementation and the same wiring is checked with numpy stand-ins (tests)."""

    def __init__(self, model, num_blocks: int, block_size: int, use_jit: bool = True, kernels: bool | None = None,
                 compile_cache: str | None = None, head_major: bool | None = None):
        if num_blocks < 2:
            raise ValueError(f"a paged cache needs >= 2 blocks (block 0 is the null block), got {num_blocks}")
        cfg = model.config
        self.cfg, self.num_blocks, self.block_size = cfg, int(num_blocks), int(block_size)
        self.kernels = kernels_for_device() if kernels is None else bool(kernels)
        for layer in model.model.layers:
            layer.attention.paged_kernels = self.kernels
        # head-major (default off the kernels): the gather path's caches read without a transpose (module doc)
        self.head_major = (not self.kernels) if head_major is None else bool(head_major)
        self.cache = PagedKVCache(cfg.n_layer, self.num_blocks, self.block_size, cfg.num_key_value_heads,
                                  cfg.head_dim, cfg.compute_dtype, blocked=self.kernels, head_major=self.head_major)
        # head-major row of kv head h at a slot: h * num_slots + slot
        self._head_offsets = np.arange(cfg.num_key_value_heads, dtype=np.int32) * (self.num_blocks * self.block_size)
        self.cell = (JitPagedStep if use_jit else PagedStep)(model, self.cache.k, self.cache.v)
        self.shapes: set[tuple[int, int, int]] = set()   # (rows, width, context blocks) run so far
        self.compile_cache_dir = compile_cache if use_jit else None     # infer.compile_cache: graphs on disk
        self._compile_cache = None
        self._compiled: set[tuple[int, int, int, int]] = set()     # ... and logit columns: one graph each

    def _cache_for(self, shape: tuple[int, int, int, int]):
        """The compile-cache context of a first call at `shape` (a null context without a cache or once compiled)."""
        import contextlib
        if self.compile_cache_dir is None or shape in self._compiled:
            return contextlib.nullcontext()
        self._compiled.add(shape)
        if self._compile_cache is None:     # keyed at first use: the factory may set the jit config after __init__
            from telechat_ms.infer.compile_cache import CompileCache, paged_graph_key
            level = (getattr(self.cell, "_jit_config_dict", None) or {}).get("jit_level")
            self._compile_cache = CompileCache(self.compile_cache_dir, paged_graph_key(
                self.cfg, self.num_blocks, self.block_size, self.kernels, level, self.head_major))
        return self._compile_cache.compiling(shape)

    def step(self, ids: np.ndarray, positions: np.ndarray, totals: np.ndarray, slots: np.ndarray,
             block_tables: np.ndarray, last: int) -> np.ndarray:
        """Write ids [R, n] at slots [R, n] (rotary positions [R, n], each token's NTK total [R, n]); row r
        attends over the blocks block_tables[r] [nb] up to each query's position. fp32 logits [R, V] of column
        `last`."""
        return self._call(ids, positions, totals, slots, block_tables, np.array([last], np.int32))[:, 0]

    def step_columns(self, ids: np.ndarray, positions: np.ndarray, totals: np.ndarray, slots: np.ndarray,
                     block_tables: np.ndarray) -> np.ndarray:
        """step() returning the logits of every column, [R, n, V] (prompt scoring: log-probs of each token)."""
        return self._call(ids, positions, totals, slots, block_tables, np.arange(np.shape(ids)[1], dtype=np.int32))

    def _call(self, ids, positions, totals, slots, block_tables, last_index: np.ndarray) -> np.ndarray:
        tables = np.asarray(block_tables, np.int32)
        bsz = self.block_size
        ctx_slots = (tables[:, :, None] * bsz + np.arange(bsz, dtype=np.int32)).reshape(tables.shape[0], -1)
        inp = paged_inputs(self.cfg, positions, totals, ctx_slots.shape[1])
        shape = (ids.shape[0], ids.shape[1], tables.shape[1])
        ctx = tables if self.kernels else ctx_slots      # the kernels read block tables, the gather path slots
        write = np.asarray(slots, np.int32).reshape(-1)
        if self.head_major:   # the rows of every kv head: writes [R * n, K], context [R, K, C]
            write = write[:, None] + self._head_offsets
            ctx = ctx_slots[:, None, :] + self._head_offsets[None, :, None]
        with self._cache_for(shape + (len(last_index),)):
            logits = self.cell(Tensor(np.asarray(ids, np.int32)), Tensor(inp.cos), Tensor(inp.sin),
                               Tensor(inp.mask), Tensor(write), Tensor(ctx), Tensor(last_index))
        self.shapes.add(shape)
        return logits.asnumpy()

