"""A paged kv cache: fixed-size blocks of slots shared by every sequence, read back through per-row block tables.

Layout: one key and one value Parameter [num_blocks * block_size, K, d] per layer. A step writes each new token's
key and value at its slot (ScatterUpdate of whole rows) and each row attends over the blocks of its table only,
gathered into [R, K, C, d] (C = the table's blocks x block_size, a bucket of the live context): a step costs what
its rows' live contexts cost, not what the cache could hold, and the cache is sized by a block count or a memory
budget, not by rows x max length. Block 0 is the null block: table entries past a row's blocks point at it and
padding tokens write into it; the mask hides it (its context indices are past every query's position).

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
    """Key and value slots of every layer, [num_blocks * block_size, K, d] each; not model parameters."""

    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int, dtype: str,
                 blocked: bool = False):
        super().__init__(auto_prefix=False)
        # initializer: no host copy of the zeros (a numpy array per Parameter was measured to cost 1.7x the cache)
        # blocked: [num_blocks, block_size, K, d], the Ascend kernels' layout (the same slots, block-major)
        shape = (num_blocks, block_size, n_kv, head_dim) if blocked else (num_blocks * block_size, n_kv, head_dim)
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
                 compile_cache: str | None = None):
        if num_blocks < 2:
            raise ValueError(f"a paged cache needs >= 2 blocks (block 0 is the null block), got {num_blocks}")
        cfg = model.config
        self.cfg, self.num_blocks, self.block_size = cfg, int(num_blocks), int(block_size)
        self.kernels = kernels_for_device() if kernels is None else bool(kernels)
        for layer in model.model.layers:
            layer.attention.paged_kernels = self.kernels
        self.cache = PagedKVCache(cfg.n_layer, self.num_blocks, self.block_size, cfg.num_key_value_heads,
                                  cfg.head_dim, cfg.compute_dtype, blocked=self.kernels)
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
                self.cfg, self.num_blocks, self.block_size, self.kernels, level))
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
        with self._cache_for(shape + (len(last_index),)):
            logits = self.cell(Tensor(np.asarray(ids, np.int32)), Tensor(inp.cos), Tensor(inp.sin),
                               Tensor(inp.mask), Tensor(np.asarray(slots, np.int32).reshape(-1)), Tensor(ctx),
                               Tensor(last_index))
        self.shapes.add(shape)
        return logits.asnumpy()

