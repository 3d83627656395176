"""Model-parallel serving over the paged kv cache: the paged step (telechat_ms.infer.paged) of a TeleChatForCausalLM
under the paged predict strategies (strategies.paged_predict_strategy_table), and its construction from a predict
job on Ascend (semi-auto parallel, msrun, one rank per NPU). `serve --config` runs the PagedEngine over it, rank 0
leading the others in lockstep (parallel.lockstep.PagedLeaderStepper).

The paged caches [num_blocks * block_size, K, d] are split by whole kv heads, as the static caches are: each rank
holds every block, with the kv heads its slice of wk_v projects. Unlike the static cache's ScatterNdUpdate (whose
indexed kv-head dimension MindSpore cannot split, hence ScatterNdAdd and slot clearing there), the paged write is a
ScatterUpdate of whole slots: its indices address only the slot dimension, so MindSpore splits it as declared and
nothing needs clearing (a rewritten slot is simply overwritten, on every rank, with its own heads).

On CPU nothing here compiles under semi-auto parallel: the same stepper runs stand-alone (strategies ignored) and
computes exactly what the local PagedStepper computes; a numpy emulation of its shards (tests/paged_emulator.py)
checks the declared strategies against the unsharded step.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor

from telechat_ms.infer.paged import PagedStepper, kernels_for_device
from telechat_ms.parallel.parallelize import AppliedPredict
from telechat_ms.parallel.predict import ModelParallelSession, load_parallel_session, unloaded_parallel_model
from telechat_ms.positions import paged_inputs


class ModelParallelPagedStepper(PagedStepper):
    """The paged step of a model prepared by parallelize_predict(..., paged=True), over num_blocks x block_size."""

    def __init__(self, model, num_blocks: int, block_size: int, applied: AppliedPredict, use_jit: bool = True,
                 jit_config=None, kernels: bool = False):
        if any(layer.attention.cache_write_by_add for layer in model.model.layers):
            raise ValueError("ModelParallelPagedStepper needs a model prepared by parallelize_predict(paged=True)")
        if kernels != ("model.layers.0.attention.reshape_and_cache" in applied.table):
            raise ValueError(f"kernels={kernels}: prepare the model with parallelize_predict(paged=True, "
                             f"kernels={kernels})")
        super().__init__(model, num_blocks, block_size, use_jit, kernels, head_major=False)  # heads split on axis 1
        self.applied = applied
        if jit_config is not None:
            self.cell.set_jit_config(jit_config)

    @property
    def cache_splits(self) -> dict[str, tuple]:
        """Split of every cache parameter: that of the paged write's input (whole kv heads)."""
        table = self.applied.table
        if self.kernels:
            return {p.name: tuple(table[f"model.layers.{i}.attention.reshape_and_cache"].inputs[2 + j])
                    for j, caches in enumerate((self.cache.k, self.cache.v)) for i, p in enumerate(caches)}
        return {p.name: tuple(table[f"model.layers.{i}.attention.paged_write_{kind}"].inputs[0])
                for kind, caches in (("k", self.cache.k), ("v", self.cache.v)) for i, p in enumerate(caches)}

    def check(self, ids: np.ndarray, slots: np.ndarray, block_tables: np.ndarray, last: int) -> None:
        """Raise ValueError for a call this stepper cannot run (a leader checks before it broadcasts it)."""
        ids, slots, tables = np.asarray(ids), np.asarray(slots), np.asarray(block_tables)
        if ids.ndim != 2 or slots.shape != ids.shape:
            raise ValueError(f"ids {list(ids.shape)} and slots {list(slots.shape)} must be [rows, n] alike")
        if tables.ndim != 2 or tables.shape[0] != ids.shape[0]:
            raise ValueError(f"block tables {list(tables.shape)} must have one row per row of ids {list(ids.shape)}")
        if slots.min() < 0 or slots.max() >= self.num_blocks * self.block_size:
            raise ValueError(f"slots must lie in [0, {self.num_blocks * self.block_size})")
        if tables.min() < 0 or tables.max() >= self.num_blocks:
            raise ValueError(f"block ids must lie in [0, {self.num_blocks})")
        if not -1 <= last < ids.shape[1]:
            raise ValueError(f"last {last} is not a column of the {ids.shape[1]} new tokens (or -1: every column)")

    def example_inputs(self, rows: int = 1, width: int = 1, blocks: int = 1) -> tuple:
        """Inputs of one call (for compiling without running): padding writes into the null block."""
        tables = np.zeros((rows, blocks), np.int32)
        ctx = (tables[:, :, None] * self.block_size + np.arange(self.block_size, dtype=np.int32)).reshape(rows, -1)
        inp = paged_inputs(self.cfg, np.zeros((rows, width), np.int64), np.ones((rows, width), np.int64),
                           ctx.shape[1])
        return (Tensor(np.zeros((rows, width), np.int32)), Tensor(inp.cos), Tensor(inp.sin), Tensor(inp.mask),
                Tensor(np.zeros(rows * width, np.int32)), Tensor(tables if self.kernels else ctx),
                Tensor(np.array([width - 1], np.int32)))

    def compile(self) -> dict:
        """Compile the decode call without running it; under semi-auto parallel this lays out (and slices) every
        parameter. Returns MindSpore's parameter layout {name: [dev_matrix, tensor_map, slice_shape, ...]}."""
        self.cell.compile(*self.example_inputs())
        return dict(getattr(self.cell, "parameter_layout_dict", {}) or {})


def build_model_parallel_paged(job, num_blocks: int, block_size: int, use_jit: bool = True) -> ModelParallelSession:
    """On every msrun rank (Ascend): semi-auto context, the model built without initialising its weights, the paged
    predict strategies, the decode call compiled (laying out and slicing every parameter and the paged caches),
    then this rank's slice of every checkpoint tensor (parallel.predict.build_model_parallel for the paged cache)."""
    from telechat_ms.parallel.parallelize import parallelize_predict
    run, model = unloaded_parallel_model(job, "serving")
    kernels = kernels_for_device()    # Ascend: ReshapeAndCache / PagedAttention (never run here)
    applied = parallelize_predict(model, job.parallel_config, job.source, paged=True, kernels=kernels)
    stepper = ModelParallelPagedStepper(model, num_blocks, block_size, applied,
                                        use_jit and job.context.mode != "GRAPH_MODE", jit_config=run.jit_config(),
                                        kernels=kernels)
    return load_parallel_session(job, run, model, applied, stepper)
