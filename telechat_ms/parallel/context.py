"""Set up MindSpore's context from a job: stand_alone / data_parallel (CPU or Ascend) and, on Ascend,
semi_auto_parallel with sharding propagation, full_batch, pipeline and the parallel optimizer."""
from __future__ import annotations

import os
from dataclasses import dataclass

from telechat_ms.errors import ConfigError


@dataclass
class RunContext:
    rank: int = 0
    world_size: int = 1
    parallel_mode: str = "stand_alone"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """Workers started by msrun (MS_WORKER_NUM) or 1 for a plain process."""
    return int(os.environ.get("MS_WORKER_NUM", os.environ.get("RANK_SIZE", "1")))


def check_data_parallel(job, size: int) -> None:
    """data_parallel mode replicates the model: refuse model/pipeline/context parallel degrees or a dp mismatch."""
    pc = job.parallel_config
    for name in ("model_parallel", "pipeline_stage", "context_parallel"):
        if getattr(pc, name) != 1:
            raise ConfigError(f"{job.source}: 'parallel_config.{name}' is {getattr(pc, name)} but "
                              "parallel.parallel_mode data_parallel cannot split the model; use semi_auto_parallel "
                              "(Ascend)")
    if pc.data_parallel not in (1, size):
        raise ConfigError(f"{job.source}: 'parallel_config.data_parallel' is {pc.data_parallel} but {size} workers "
                          "were launched")


def setup_context(job) -> RunContext:
    """Apply job.context and job.parallel; initialise communication when more than one worker runs."""
    import mindspore as ms
    ctx = job.context
    mode = ms.GRAPH_MODE if ctx.mode == "GRAPH_MODE" else ms.PYNATIVE_MODE
    kwargs = {"mode": mode, "device_target": ctx.device_target}
    if ctx.device_target != "CPU":
        kwargs["device_id"] = int(os.environ.get("DEVICE_ID", ctx.device_id))
        if ctx.max_device_memory:
            kwargs["max_device_memory"] = ctx.max_device_memory
    ms.set_context(**kwargs)
    if ctx.device_target != "CPU":
        ms.set_context(jit_config={"jit_level": ctx.jit_level})
    par = job.parallel
    world = launched_world_size()
    if par.parallel_mode == "stand_alone":
        if world > 1:
            raise ConfigError(f"{job.source}: parallel.parallel_mode is stand_alone but {world} workers were "
                              "launched; use data_parallel (CPU/Ascend) or semi_auto_parallel (Ascend)")
        return RunContext()
    if par.parallel_mode in ("semi_auto_parallel", "auto_parallel") and ctx.device_target == "CPU":
        raise ConfigError(f"{job.source}: parallel.parallel_mode {par.parallel_mode} needs Ascend; MindSpore "
                          "cannot run it on CPU (use data_parallel)")
    from mindspore.communication import get_group_size, get_rank, init
    init()
    rank, size = get_rank(), get_group_size()
    if par.parallel_mode == "data_parallel":
        check_data_parallel(job, size)
        ms.reset_auto_parallel_context()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=par.gradients_mean,
                                     device_num=size)
    else:
        from telechat_ms.parallel.ascend import set_semi_auto_context
        set_semi_auto_context(job, size)
    return RunContext(rank=rank, world_size=size, parallel_mode=par.parallel_mode)
