"""Model-parallel inference: the cached prefill / decode step of a TeleChatForCausalLM under the predict strategies,
behind CacheStepper's interface `step(ids, positions, totals, slots, first_slot, last) -> logits [B, V]`, and its
construction from a predict job on Ascend (semi-auto parallel, msrun, one rank per NPU).

The kv caches [B, K, L, d] are split by whole kv heads (strategies.predict_strategy_table). MindSpore cannot split
the dimensions a ScatterNdUpdate indexes, so the model writes the caches with ScatterNdAdd (which it can split) into
slots this stepper keeps at zero: a step that writes slot s of a row first clears that row's slots >= s when they
hold keys of an earlier step (a cache row is a prefix: rewriting slot s makes every later key stale). Clearing is a
separate small graph (cache x keep, assigned in place) that runs only when a row is rewritten, e.g. a new prompt in
a reused row; decode steps write fresh slots and cost no more than ScatterNdUpdate.

On CPU nothing here compiles under semi-auto parallel; the same stepper runs stand-alone (strategies ignored) and
computes exactly what the local CacheStepper computes (tests), and `lockstep` drives it from rank 0 under msrun.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn
from mindspore.common.initializer import initializer
from mindspore.ops import operations as P

from telechat_ms.backend import ms_dtype
from telechat_ms.checkpoint_io import checkpoint_entries
from telechat_ms.errors import CheckpointError, ConfigError
from telechat_ms.infer.kv_cache import CachedStep, JitCachedStep
from telechat_ms.parallel.parallelize import AppliedPredict
from telechat_ms.parallel.strategies import Shard, apply_strategies, cache_clear_strategies
from telechat_ms.positions import cache_inputs
from telechat_ms.weights import model_tensors


class ClearSlots(nn.Cell):
    """Zero the masked slots of every cache in place: cache = cache x keep, keep [B, 1, L, 1] in {0, 1}."""

    def __init__(self, k_caches: ParameterTuple, v_caches: ParameterTuple):
        super().__init__(auto_prefix=False)
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.keep_mul = P.Mul()
        self.assign = P.Assign()

    def construct(self, keep):
        for i in range(len(self.k_caches)):
            self.assign(self.k_caches[i], self.keep_mul(self.k_caches[i], keep))
            self.assign(self.v_caches[i], self.keep_mul(self.v_caches[i], keep))
        return keep


class JitClearSlots(ClearSlots):
    @ms.jit
    def construct(self, keep):
        for i in range(len(self.k_caches)):
            self.assign(self.k_caches[i], self.keep_mul(self.k_caches[i], keep))
            self.assign(self.v_caches[i], self.keep_mul(self.v_caches[i], keep))
        return keep


def _caches(cfg, batch: int, max_len: int, kind: str) -> ParameterTuple:
    """Zero caches [B, K, L, d] from an initializer, so semi-auto parallel materialises only each rank's slice."""
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    return ParameterTuple([Parameter(initializer("zeros", shape, ms_dtype(cfg.compute_dtype)),
                                     name=f"kv_cache.{kind}.{i}", requires_grad=False) for i in range(cfg.n_layer)])


class ModelParallelStepper:
    """The cached step of a model prepared by parallelize_predict, over static caches of `batch` x `max_len`."""

    def __init__(self, model, batch: int, max_len: int, applied: AppliedPredict, use_jit: bool = True,
                 jit_config=None):
        cfg = model.config
        if not all(layer.attention.cache_write_by_add for layer in model.model.layers):
            raise ValueError("ModelParallelStepper needs a model prepared by parallelize_predict")
        self.cfg, self.batch, self.max_len, self.applied = cfg, batch, max_len, applied
        self.k_caches, self.v_caches = _caches(cfg, batch, max_len, "key"), _caches(cfg, batch, max_len, "value")
        self.cell = (JitCachedStep if use_jit else CachedStep)(model, self.k_caches, self.v_caches)
        self.clear = (JitClearSlots if use_jit else ClearSlots)(self.k_caches, self.v_caches)
        self.clear_table = cache_clear_strategies(applied.dims)
        apply_strategies(self.clear, self.clear_table)
        if jit_config is not None:
            self.cell.set_jit_config(jit_config)
            self.clear.set_jit_config(jit_config)
        self.written = np.zeros((batch, max_len), bool)   # slots holding a key of an earlier step
        self.scratch = max_len - 1   # CacheStepper's scratch slot: writes there are zeroed (layers: not_scratch)
        self.clears = 0

    @property
    def cache_splits(self) -> dict[str, tuple]:
        """Split of every cache parameter: that of the cache write's input (whole kv heads)."""
        table = self.applied.table
        return {p.name: tuple(table[f"model.layers.{i}.attention.cache_add"].inputs[0])
                for caches in (self.k_caches, self.v_caches) for i, p in enumerate(caches)}

    def check(self, ids: np.ndarray, slots: np.ndarray, last: int) -> None:
        """Raise ValueError for a step this stepper cannot run (a leader checks before it broadcasts the step)."""
        ids, slots = np.asarray(ids), np.asarray(slots)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"step got ids of shape {list(ids.shape)}; this stepper has {self.batch} rows")
        if slots.shape != ids.shape:
            raise ValueError(f"slots {list(slots.shape)} and ids {list(ids.shape)} differ in shape")
        if slots.min() < 0 or slots.max() >= self.max_len:
            raise ValueError(f"slots must lie in [0, {self.max_len}): the kv cache has {self.max_len} slots")
        ordered = np.sort(np.where(slots == self.scratch, -1 - np.arange(slots.shape[1]), slots), axis=1)
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise ValueError("a step writes a slot of a row twice (only the scratch slot may take several)")
        if not 0 <= last < ids.shape[1]:
            raise ValueError(f"last {last} is not a column of the {ids.shape[1]} new tokens")

    def stale_keep(self, slots: np.ndarray) -> np.ndarray | None:
        """keep [B, 1, L, 1] that clears, in every row rewriting an occupied slot, its slots from the first one
        written on; None when every slot of the step is fresh. Updates the bookkeeping."""
        rows = np.arange(self.batch)[:, None]
        rewritten = (self.written[rows, slots] & (slots != self.scratch)).any(axis=1)
        if not rewritten.any():
            return None
        keep = np.ones((self.batch, 1, self.max_len, 1), np.float32)
        for b in np.flatnonzero(rewritten):
            first = int(slots[b].min())
            keep[b, 0, first:, 0] = 0.0
            self.written[b, first:] = False
        return keep

    def step(self, ids: np.ndarray, positions: np.ndarray, totals: np.ndarray, slots: np.ndarray,
             first_slot: np.ndarray, last: int) -> np.ndarray:
        """CacheStepper.step: write ids [B, n] at slots [B, n] (rotary positions [B, n], NTK of totals [B]);
        each row attends to [first_slot, own slot]. Returns fp32 logits [B, V] of column `last`."""
        ids = np.asarray(ids, np.int32)
        slots = np.asarray(slots, np.int64)
        self.check(ids, slots, int(last))
        keep = self.stale_keep(slots)
        if keep is not None:
            self.clear(Tensor(keep, dtype=ms_dtype(self.cfg.compute_dtype)))
            self.clears += 1
        inp = cache_inputs(self.cfg, positions, totals, slots, first_slot, self.max_len)
        logits = self.cell(Tensor(ids), Tensor(inp.cos), Tensor(inp.sin), Tensor(inp.mask), Tensor(inp.index),
                           Tensor(np.array([last], np.int32)))
        self.written[np.arange(self.batch)[:, None], slots] = True
        self.written[:, self.scratch] = False   # its writes are zeroed in the graph: it never holds a key
        return logits.asnumpy()[:, 0]

    def example_inputs(self, n: int = 1) -> tuple:
        """Inputs of an n-token step (for compiling without running)."""
        b = self.batch
        slots = np.broadcast_to(np.arange(n), (b, n))
        inp = cache_inputs(self.cfg, slots, np.full(b, n), slots, np.zeros(b, np.int64), self.max_len)
        return (Tensor(np.zeros((b, n), np.int32)), Tensor(inp.cos), Tensor(inp.sin), Tensor(inp.mask),
                Tensor(inp.index), Tensor(np.array([n - 1], np.int32)))

    def compile(self) -> dict:
        """Compile the decode step without running it; under semi-auto parallel this lays out (and slices) every
        parameter. Returns MindSpore's parameter layout {name: [dev_matrix, tensor_map, slice_shape, ...]}."""
        self.cell.compile(*self.example_inputs(1))
        return dict(getattr(self.cell, "parameter_layout_dict", {}) or {})


class RowPadder:
    """A session of fewer rows than the stepper: dummy rows mirror row 0's slots (fresh slots, no extra clears)."""

    def __init__(self, stepper, batch: int):
        self.stepper, self.batch, self.max_len, self.cfg = stepper, batch, stepper.max_len, stepper.cfg

    def step(self, ids, positions, totals, slots, first_slot, last) -> np.ndarray:
        extra = self.stepper.batch - self.batch

        def pad(a, fill=None):
            a = np.asarray(a)
            tail = np.full((extra,) + a.shape[1:], fill, a.dtype) if fill is not None else np.repeat(a[:1], extra, 0)
            return np.concatenate([a, tail])

        logits = self.stepper.step(pad(ids, self.cfg.pad_token_id), pad(positions), pad(totals), pad(slots),
                                   pad(first_slot), last)
        return logits[:self.batch]


def stepper_factory(stepper) -> Callable[[int, int], object]:
    """factory(batch, needed_len) for infer.kv_cache.use_stepper_factory: one fixed stepper (one kv cache, one set
    of compiled graphs) serves every generation that fits it."""
    def factory(batch: int, needed_len: int):
        if batch > stepper.batch or needed_len > stepper.max_len:
            raise ConfigError(f"a generation of {batch} row(s) x {needed_len} tokens (prompt + max_new_tokens) does "
                              f"not fit the model-parallel kv cache of {stepper.batch} x {stepper.max_len} "
                              "(runner_config.batch_size x model.model_config.seq_length)")
        return stepper if batch == stepper.batch else RowPadder(stepper, batch)
    return factory


# ---------------------------------------------------------------- loading a checkpoint slice by slice
def split_block(full: np.ndarray, split: tuple, rank: int) -> np.ndarray:
    """The part of a full tensor that `rank` holds under a declared split (model parallel only: every split
    dimension is cut mp ways and rank r holds block r; unsplit dimensions are whole)."""
    if len(split) != full.ndim:
        raise ValueError(f"split {split} does not match a tensor of shape {list(full.shape)}")
    index = []
    for n, parts in zip(full.shape, split):
        if n % parts:
            raise ValueError(f"dimension {n} of shape {list(full.shape)} is not divisible by {parts}")
        i = rank % parts
        index.append(slice(i * n // parts, (i + 1) * n // parts))
    return full[tuple(index)]


def layout_split(dev_matrix, tensor_map) -> tuple:
    """Ways each tensor dimension is cut under MindSpore's layout (tensor_map counts device axes from the right)."""
    dev = list(dev_matrix)
    return tuple(1 if m == -1 else int(dev[len(dev) - 1 - m]) for m in tensor_map)


def check_layouts(layout: dict, splits: dict[str, tuple]) -> None:
    """MindSpore's compiled layout of every parameter must be the declared split (else the loader would slice
    wrongly): raise ConfigError naming the first parameter that differs."""
    for name, split in splits.items():
        entry = layout.get(name)
        if entry is None:
            continue
        got = layout_split(entry[0], entry[1])
        if got != tuple(split):
            raise ConfigError(f"MindSpore laid out parameter {name} as {got}, the predict strategies declare "
                              f"{tuple(split)}")


def load_sharded_checkpoint(model, path: str, splits: dict[str, tuple], rank: int) -> None:
    """Fill a model whose parameters are this rank's slices, one full tensor read (and cut) at a time."""
    params = {p.name: p for p in model.get_parameters()}
    for name, full, entry in model_tensors(checkpoint_entries(path), model.config):
        param = params.get(name)
        if param is None:
            raise CheckpointError(f"{entry.file}: tensor '{entry.name}' has no parameter '{name}' in the model")
        part = split_block(full, splits[name], rank)
        if tuple(param.shape) != part.shape:
            raise CheckpointError(f"{entry.file}: parameter {name} has shape {list(param.shape)} on rank {rank}, "
                                  f"its declared split {splits[name]} gives {list(part.shape)}")
        param.set_data(Tensor(np.ascontiguousarray(part), dtype=param.dtype))


@dataclass
class ModelParallelSession:
    """What one rank holds after build_model_parallel."""

    model: object
    stepper: ModelParallelStepper
    rank: int
    world_size: int


def build_model_parallel(job, use_jit: bool = True) -> ModelParallelSession:
    """On every msrun rank (Ascend): semi-auto context, the model built without initialising its weights, the
    predict strategies, the decode step compiled (which lays out and slices every parameter), then this rank's
    slice of every checkpoint tensor. `job` is a parallel.predict_job.PredictJob; use_jit matters in PyNative
    mode only (in GRAPH_MODE every cell compiles)."""
    from telechat_ms.parallel.parallelize import parallelize_predict
    run, model = unloaded_parallel_model(job, "inference")
    applied = parallelize_predict(model, job.parallel_config, job.source)
    stepper = ModelParallelStepper(model, job.batch_size, job.model_config.seq_length, applied,
                                   use_jit and job.context.mode != "GRAPH_MODE", jit_config=run.jit_config())
    return load_parallel_session(job, run, model, applied, stepper)


def unloaded_parallel_model(job, what: str):
    """(run context, model) of a model-parallel build: the semi-auto context set up and the model built without
    initialising its weights (they are sliced and loaded after its step is compiled). `what` names the use."""
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.parallel.context import setup_context
    if not job.model_parallel:
        raise ConfigError(f"{job.source}: parallel.parallel_mode is {job.parallel.parallel_mode}; model-parallel "
                          f"{what} needs semi_auto_parallel")
    run = setup_context(job.context, job.parallel, job.parallel_config, job.source, job.output_dir)
    try:
        from mindspore.nn.utils import no_init_parameters
    except ImportError:  # pragma: no cover - removed after MindSpore 2.9: weights are then initialised first
        no_init_parameters = contextlib.nullcontext
    with no_init_parameters():
        model = TeleChatForCausalLM(job.model_config)
    return run, model


def load_parallel_session(job, run, model, applied, stepper) -> ModelParallelSession:
    """Compile the stepper (laying out every parameter and cache), check the layouts against the declared splits,
    load this rank's slice of every checkpoint tensor."""
    layout = stepper.compile()
    check_layouts(layout, {**applied.param_splits, **stepper.cache_splits})
    load_sharded_checkpoint(model, job.load_checkpoint, applied.param_splits, run.rank)
    model.name_or_path = job.load_checkpoint   # generation_config.json is read from there
    return ModelParallelSession(model, stepper, run.rank, run.world_size)


def run_lockstep(session: ModelParallelSession, work: Callable, channel=None, paged: bool = False):
    """Run work(model, stepper) on rank 0 with a stepper that broadcasts every step, while the other ranks replay
    them; returns work's result on rank 0 (None elsewhere). This is how `generate --config` runs, and how a serving
    engine plugs in: its rank-0 process (HTTP port included) calls work with the leader as its stepper (or
    `stepper_factory(leader)` for DecodeSession-based code) and calls leader.keepalive() while idle. paged: the
    session's stepper is a paged one (parallel.paged_predict), led by a PagedLeaderStepper."""
    from telechat_ms.parallel.lockstep import BroadcastChannel, LeaderStepper, PagedLeaderStepper, lead_or_follow
    return lead_or_follow(session.rank, session.stepper, channel or BroadcastChannel(),
                          lambda leader: work(session.model, leader),
                          leader_cls=PagedLeaderStepper if paged else LeaderStepper)


def strategies_of(stepper: ModelParallelStepper) -> dict[str, Shard]:
    """Every strategy the stepper's graphs carry: the model's table and the clearing step's."""
    return {**stepper.applied.table, **{f"clear.{k}": v for k, v in stepper.clear_table.items()}}
