"""Set up MindSpore from a job's `context` and `parallel` sections: stand_alone / data_parallel (CPU or Ascend)
and, on Ascend, semi_auto_parallel with sharding propagation, full_batch, pipeline and the parallel optimizer.

Uses the MindSpore 2.9 replacements of the deprecated set_context keys: `mindspore.set_device` (device target and
id), `mindspore.runtime.set_memory` (max_device_memory, memory_optimize_level), the MS_DEV_SAVE_GRAPHS
environment variables (save_graphs), and a per-cell JitConfig for jit_level (applied by the step runners).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from telechat_ms.errors import ConfigError
from telechat_ms.job_config import ContextConfig, ParallelConfig, ParallelContext

MEMORY_DEFAULTS = {"max_size": "1024GB", "optimize_level": "O0"}   # mindspore.runtime.set_memory's own


@dataclass
class RunContext:
    """What the launch gave this process, and how its step cells compile."""

    rank: int = 0
    world_size: int = 1
    parallel_mode: str = "stand_alone"
    device_target: str = "CPU"
    jit_level: str = "O0"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def jit_config(self):
        """The JitConfig every compiled step cell gets (context.jit_level)."""
        from mindspore import JitConfig
        return JitConfig(jit_level=self.jit_level)


def launched_world_size() -> int:
    """Workers started by msrun (MS_WORKER_NUM) or 1 for a plain process."""
    return int(os.environ.get("MS_WORKER_NUM", os.environ.get("RANK_SIZE", "1")))


def check_data_parallel(pc: ParallelConfig, size: int, source: str) -> None:
    """data_parallel mode replicates the model: refuse model/pipeline/context parallel degrees or a dp mismatch."""
    for name in ("model_parallel", "pipeline_stage", "context_parallel"):
        if getattr(pc, name) != 1:
            raise ConfigError(f"{source}: 'parallel_config.{name}' is {getattr(pc, name)} but "
                              "parallel.parallel_mode data_parallel cannot split the model; use semi_auto_parallel "
                              "(Ascend)")
    if pc.data_parallel not in (1, size):
        raise ConfigError(f"{source}: 'parallel_config.data_parallel' is {pc.data_parallel} but {size} workers "
                          "were launched")


def memory_kwargs(ctx: ContextConfig) -> dict[str, str]:
    """mindspore.runtime.set_memory arguments the YAML asks for (empty when it keeps MindSpore's defaults)."""
    kwargs = {}
    if ctx.max_device_memory:
        kwargs["max_size"] = ctx.max_device_memory
    if ctx.memory_optimize_level != MEMORY_DEFAULTS["optimize_level"]:
        kwargs["optimize_level"] = ctx.memory_optimize_level
    return kwargs


def graph_dump_env(ctx: ContextConfig, output_dir: str) -> dict[str, str]:
    """Environment that makes MindSpore save the compiled graphs (context.save_graphs) under output_dir/graphs."""
    if not ctx.save_graphs:
        return {}
    return {"MS_DEV_SAVE_GRAPHS": "1", "MS_DEV_SAVE_GRAPHS_PATH": os.path.join(os.path.abspath(output_dir), "graphs")}


def _set_device(ctx: ContextConfig) -> None:
    """mindspore.set_device, skipped when the process already runs on that device (it may be set only once)."""
    import mindspore as ms
    device_id = None
    if ctx.device_target != "CPU":
        env = os.environ.get("DEVICE_ID")
        device_id = int(env) if env is not None else (None if launched_world_size() > 1 else ctx.device_id)
    current = ms.get_current_device()
    if current.device_target != ctx.device_target or (device_id is not None and current.device_id != device_id):
        ms.set_device(ctx.device_target, device_id)


def _set_memory(ctx: ContextConfig, source: str) -> None:
    """mindspore.runtime.set_memory for a non-default max_device_memory / memory_optimize_level (once a process)."""
    import mindspore as ms
    kwargs = memory_kwargs(ctx)
    if not kwargs:
        return
    try:
        ms.runtime.set_memory(**kwargs)
    except RuntimeError as exc:  # MindSpore allows one call per process
        raise ConfigError(f"{source}: context.max_device_memory / memory_optimize_level: {exc}") from None


def setup_context(ctx: ContextConfig, par: ParallelContext, pc: ParallelConfig, source: str,
                  output_dir: str = ".") -> RunContext:
    """Apply the context and parallel sections; initialise communication when more than one worker runs."""
    import mindspore as ms
    if ctx.device_target == "CPU" and ctx.jit_level != "O0":
        raise ConfigError(f"{source}: 'context.jit_level' {ctx.jit_level} is Ascend-only; CPU compiles at O0")
    os.environ.update(graph_dump_env(ctx, output_dir))
    ms.set_context(mode=ms.GRAPH_MODE if ctx.mode == "GRAPH_MODE" else ms.PYNATIVE_MODE)
    _set_device(ctx)
    _set_memory(ctx, source)
    run = RunContext(device_target=ctx.device_target, jit_level=ctx.jit_level, parallel_mode=par.parallel_mode)
    world = launched_world_size()
    if par.parallel_mode == "stand_alone":
        if world > 1:
            raise ConfigError(f"{source}: parallel.parallel_mode is stand_alone but {world} workers were "
                              "launched; use data_parallel (CPU/Ascend) or semi_auto_parallel (Ascend)")
        return run
    if par.parallel_mode in ("semi_auto_parallel", "auto_parallel") and ctx.device_target == "CPU":
        raise ConfigError(f"{source}: parallel.parallel_mode {par.parallel_mode} needs Ascend; MindSpore "
                          "cannot run it on CPU (use data_parallel)")
    from mindspore.communication import get_group_size, get_rank, init
    init()
    run.rank, run.world_size = get_rank(), get_group_size()
    if par.parallel_mode == "data_parallel":
        check_data_parallel(pc, run.world_size, source)
        if par.gradients_mean:
            raise ConfigError(f"{source}: 'parallel.gradients_mean' must be false in data_parallel mode: the loss is "
                              "already the token mean over the global batch (gradients are summed across workers)")
        ms.reset_auto_parallel_context()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=False,
                                     device_num=run.world_size)
    else:
        from telechat_ms.parallel.ascend import set_semi_auto_context
        set_semi_auto_context(par, pc, run.world_size, source)
    return run
