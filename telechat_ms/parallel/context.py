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


@dataclass
class ContextSettings:
    """Everything setup_context will apply, computed and validated before anything is applied."""

    mode: str
    device_target: str
    device_id: int | None
    memory: dict[str, str]
    env: dict[str, str]
    jit_level: str
    parallel_mode: str
    world_size: int
    auto_parallel: dict | None      # set_auto_parallel_context kwargs (data_parallel or semi-auto); None: none


def context_settings(ctx: ContextConfig, par: ParallelContext, pc: ParallelConfig, source: str,
                     output_dir: str = ".", world: int | None = None) -> ContextSettings:
    """What the context / parallel sections ask of MindSpore for a launch of `world` workers (default: msrun's)."""
    world = launched_world_size() if world is None else world
    if ctx.device_target == "CPU" and ctx.jit_level != "O0":
        raise ConfigError(f"{source}: 'context.jit_level' {ctx.jit_level} is Ascend-only; CPU compiles at O0")
    device_id = None
    if ctx.device_target != "CPU":
        env = os.environ.get("DEVICE_ID")
        device_id = int(env) if env is not None else (None if world > 1 else ctx.device_id)
    auto = None
    if par.parallel_mode == "stand_alone":
        if world > 1:
            raise ConfigError(f"{source}: parallel.parallel_mode is stand_alone but {world} workers were "
                              "launched; use data_parallel (CPU/Ascend) or semi_auto_parallel (Ascend)")
    elif par.parallel_mode == "data_parallel":
        check_data_parallel(pc, world, source)
        if par.gradients_mean:
            raise ConfigError(f"{source}: 'parallel.gradients_mean' must be false in data_parallel mode: the loss is "
                              "already the token mean over the global batch (gradients are summed across workers)")
        auto = {"parallel_mode": "data_parallel", "gradients_mean": False, "device_num": world}
    else:
        if ctx.device_target == "CPU":
            raise ConfigError(f"{source}: parallel.parallel_mode {par.parallel_mode} needs Ascend; MindSpore "
                              "cannot run it on CPU (use data_parallel)")
        from telechat_ms.parallel.ascend import semi_auto_context_kwargs
        auto = semi_auto_context_kwargs(par, pc, world, source)
    return ContextSettings(mode=ctx.mode, device_target=ctx.device_target, device_id=device_id,
                           memory=memory_kwargs(ctx), env=graph_dump_env(ctx, output_dir), jit_level=ctx.jit_level,
                           parallel_mode=par.parallel_mode, world_size=world, auto_parallel=auto)


def setup_context(ctx: ContextConfig, par: ParallelContext, pc: ParallelConfig, source: str,
                  output_dir: str = ".") -> RunContext:
    """Apply the context and parallel sections; initialise communication when more than one worker runs."""
    import mindspore as ms
    settings = context_settings(ctx, par, pc, source, output_dir)
    os.environ.update(settings.env)
    ms.set_context(mode=ms.GRAPH_MODE if settings.mode == "GRAPH_MODE" else ms.PYNATIVE_MODE)
    current = ms.get_current_device()  # set_device may be called once: skip it when already there
    if current.device_target != settings.device_target or \
            (settings.device_id is not None and current.device_id != settings.device_id):
        ms.set_device(settings.device_target, settings.device_id)
    if settings.memory:
        try:
            ms.runtime.set_memory(**settings.memory)
        except RuntimeError as exc:  # MindSpore allows one call per process
            raise ConfigError(f"{source}: context.max_device_memory / memory_optimize_level: {exc}") from None
    run = RunContext(device_target=settings.device_target, jit_level=settings.jit_level,
                     parallel_mode=settings.parallel_mode)
    if settings.auto_parallel is None:
        return run
    from mindspore.communication import get_group_size, get_rank, init
    init()
    run.rank, run.world_size = get_rank(), get_group_size()
    if run.world_size != settings.world_size:
        raise ConfigError(f"{source}: {run.world_size} workers joined but the launch announced {settings.world_size}")
    if settings.parallel_mode == "data_parallel":
        ms.reset_auto_parallel_context()
        ms.set_auto_parallel_context(**{**settings.auto_parallel, "parallel_mode": ms.ParallelMode.DATA_PARALLEL})
    else:
        from telechat_ms.parallel.ascend import apply_semi_auto_context
        apply_semi_auto_context(settings.auto_parallel)
    return run
