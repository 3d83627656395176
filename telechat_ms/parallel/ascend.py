"""Ascend-only parallel setup: semi-auto parallel context (sharding propagation, full batch, pipeline stages and
interleave, parallel optimizer, strategy checkpoint) and the pipeline training wrappers.

MindSpore cannot compile any of this on CPU ("Invalid backend: CPU"); the context *values* can be set and read
back on CPU, which is what the tests check. The wrappers are built only on Ascend, by the trainer.
"""
from __future__ import annotations

from typing import Any

from telechat_ms.errors import ConfigError
from telechat_ms.job_config import ParallelConfig, ParallelContext, RunnerWrapper


def semi_auto_context_kwargs(par: ParallelContext, pc: ParallelConfig, world_size: int,
                             source: str) -> dict[str, Any]:
    """Arguments for mindspore.set_auto_parallel_context, from the job's `parallel` and `parallel_config`."""
    if par.parallel_mode not in ("semi_auto_parallel", "auto_parallel"):
        raise ConfigError(f"{source}: 'parallel.parallel_mode' is {par.parallel_mode}, not a semi/auto mode")
    if world_size != pc.world_size:
        raise ConfigError(f"{source}: {world_size} workers launched but parallel_config needs data_parallel x "
                          f"model_parallel x pipeline_stage x context_parallel = {pc.data_parallel} x "
                          f"{pc.model_parallel} x {pc.pipeline_stage} x {pc.context_parallel} = {pc.world_size}")
    ulysses = pc.context_parallel > 1 and pc.context_parallel_algo in ("ulysses_cp", "hybrid_cp")
    kwargs: dict[str, Any] = {
        "parallel_mode": par.parallel_mode,
        "search_mode": par.search_mode,
        "device_num": world_size,
        "gradients_mean": par.gradients_mean,
        "full_batch": par.full_batch,
        "enable_parallel_optimizer": par.enable_parallel_optimizer,
        "enable_alltoall": ulysses,     # Ulysses' head/sequence exchange as AllToAll, not AllGather + Split
        "pipeline_stages": pc.pipeline_stage,
        "strategy_ckpt_config": {"save_file": par.strategy_ckpt_save_file, "only_trainable_params": False},
    }
    if par.enable_parallel_optimizer:
        # accumulation buffers (pipeline stages) sharded like the optimizer state, as plan counts them
        kwargs["parallel_optimizer_config"] = {"gradient_accumulation_shard": True,
                                               "parallel_optimizer_threshold": par.parallel_optimizer_threshold}
    if pc.pipeline_stage > 1:
        kwargs["pipeline_config"] = {"pipeline_interleave": par.pipeline_interleave,
                                     "pipeline_scheduler": par.pipeline_scheduler}
    return kwargs


def apply_semi_auto_context(kwargs: dict[str, Any]) -> None:
    """Apply semi_auto_context_kwargs (called by setup_context after communication.init())."""
    import mindspore as ms
    from mindspore.parallel import set_algo_parameters

    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(**kwargs)
    # MindFormers' choice for semi-auto: element-wise ops follow their neighbours' strategy, use every device.
    set_algo_parameters(elementwise_op_strategy_follow=True, fully_use_devices=True)
    try:
        from mindspore.parallel._cost_model_context import _set_multi_subgraphs
        _set_multi_subgraphs()
    except ImportError:  # pragma: no cover - private helper moved in another MindSpore version
        pass


def set_semi_auto_context(par: ParallelContext, pc: ParallelConfig, world_size: int, source: str) -> dict[str, Any]:
    """Validate and apply the semi-auto parallel context; returns the arguments it set."""
    kwargs = semi_auto_context_kwargs(par, pc, world_size, source)
    apply_semi_auto_context(kwargs)
    return kwargs


def loss_scale_sense(rw: RunnerWrapper):
    """scale_sense for MindFormers' wrappers: 1.0, a static value, or a dynamic loss-scale update cell."""
    if rw.loss_scale == "none":
        return 1.0
    if rw.loss_scale == "static":
        return float(rw.loss_scale_value)
    from mindspore import nn
    return nn.DynamicLossScaleUpdateCell(loss_scale_value=rw.loss_scale_value, scale_factor=rw.scale_factor,
                                         scale_window=rw.scale_window)


def wrap_train_step(network_with_loss, optimizer, pc: ParallelConfig, rw: RunnerWrapper):
    """The Ascend training step: a pipeline of micro batches (pipeline_stage > 1) or MindFormers' one-step cell.

    `network_with_loss(input_ids, labels, ...)` returns the scalar loss. Needs semi_auto_parallel on Ascend.
    """
    from telechat_ms import backend  # noqa: F401  (MindFormers imported quietly first)
    from mindformers.wrapper.wrapper import MFPipelineWithLossScaleCell, MFTrainOneStepCell

    if pc.pipeline_stage > 1:
        from mindspore.parallel.nn import PipelineCell
        net = PipelineCell(network_with_loss, micro_size=pc.micro_batch_num)
        return MFPipelineWithLossScaleCell(net, optimizer, use_clip_grad=rw.use_clip_grad,
                                           max_grad_norm=rw.max_grad_norm, scale_sense=loss_scale_sense(rw),
                                           micro_batch_num=pc.micro_batch_num)
    return MFTrainOneStepCell(network_with_loss, optimizer, use_clip_grad=rw.use_clip_grad,
                              max_grad_norm=rw.max_grad_norm, scale_sense=loss_scale_sense(rw))
