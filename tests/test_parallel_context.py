"""Context setup (stand_alone / data_parallel checks, the semi-auto context read back on CPU) and the pipeline
layout (stage per layer, offsets, interleave, per-stage recompute counts) against MindFormers' LayerSetting."""
from __future__ import annotations

import os

import pytest

from telechat_ms.errors import ConfigError
from telechat_ms.job_config import load_job_config
from telechat_ms.parallel.layout import per_stage_layers, stage_layout
from tests.conftest import REPO

Y115 = os.path.join(REPO, "yaml_configs", "115b", "finetune_telechat2_115b.yaml")
Y7_32K = os.path.join(REPO, "yaml_configs", "7b", "finetune_telechat2_7b_32k.yaml")
OFFSET_115B = [[-1, -1, 0, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, -1]]


@pytest.mark.parametrize("n_layer,pp,v,offset", [
    (96, 8, 3, OFFSET_115B), (64, 4, 1, [-1, 1, 1, -1]), (30, 1, 1, None), (10, 4, 1, [1, 1, 0, 0]),
    (24, 2, 2, [[1, 0], [0, -1]])])
def test_stage_layout_matches_mindformers_layer_setting(n_layer, pp, v, offset):
    import mindspore as ms
    from telechat_ms import backend  # noqa: F401  (MindFormers imported quietly, its log out of ./output)
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig
    from mindformers.parallel_core.training_graph.transformer.utils import LayerSetting

    ms.set_auto_parallel_context(pipeline_config={"pipeline_interleave": v > 1, "pipeline_scheduler": "1f1b"})
    try:
        pc = TransformerOpParallelConfig(data_parallel=1, model_parallel=1, pipeline_stage=pp, micro_batch_num=pp)
        ref = LayerSetting(n_layer, offset if offset is not None else 0, pc, v)
    finally:
        ms.reset_auto_parallel_context()
    ours = stage_layout(n_layer, pp, v, offset)
    assert ours.stage_of == [int(s) for s in ref.pp_ids]
    assert ours.chunk_of == [int(c) for c in ref.interleave_ids]


def test_stage_layout_rejects_bad_offsets_naming_the_field():
    with pytest.raises(ConfigError, match=r"model.pipeline_offset.*sum to 1.*64 % 4 = 0"):
        stage_layout(64, 4, 1, [-1, 1, 1, 0])
    with pytest.raises(ConfigError, match="3 offsets for 4 pipeline stages"):
        stage_layout(64, 4, 1, [0, 0, 0])
    with pytest.raises(ConfigError, match="leave a pipeline chunk with 0 layers"):
        stage_layout(8, 4, 1, [-2, 2, 0, 0])
    with pytest.raises(ConfigError, match="cannot fill 8 stages x 3 chunks"):
        stage_layout(16, 8, 3)


def test_per_stage_recompute_counts_spread_over_interleave_chunks():
    layout = stage_layout(96, 8, 3, OFFSET_115B)
    chosen = per_stage_layers([8, 8, 10, 11, 10, 7, 5, 4], layout, 8, "select_comm_recompute")
    assert len(chosen) == 63
    on_stage0 = sorted(i for i in chosen if layout.stage_of[i] == 0)
    assert on_stage0 == [0, 1, 2, 30, 31, 32, 61, 62]          # round-robin over the 3 chunks, first layers first
    assert per_stage_layers(True, layout, 8, "x") == set(range(96)) and not per_stage_layers(False, layout, 8, "x")
    with pytest.raises(ConfigError, match="list of 8 per-stage layer counts"):
        per_stage_layers([1, 2], layout, 8, "recompute_config.recompute")


def test_semi_auto_context_from_the_115b_yaml_is_set_and_read_back_on_cpu():
    import mindspore as ms
    from mindspore.parallel import reset_algo_parameters
    from telechat_ms.parallel.ascend import set_semi_auto_context

    job = load_job_config(Y115)
    try:
        kwargs = set_semi_auto_context(job.parallel, job.parallel_config, 64, job.source)
        get = ms.get_auto_parallel_context
        assert get("parallel_mode") == "semi_auto_parallel" and get("search_mode") == "sharding_propagation"
        assert get("device_num") == 64 and get("full_batch") is True and get("pipeline_stages") == 8
        assert get("enable_parallel_optimizer") is True
        assert get("pipeline_interleave") is True and get("pipeline_scheduler") == "1f1b"
        assert get("strategy_ckpt_config")["save_file"] == "./output/strategy/ckpt_strategy.ckpt"
        assert kwargs["parallel_optimizer_config"]["parallel_optimizer_threshold"] == 64
        assert get("enable_alltoall") is False
    finally:
        ms.reset_auto_parallel_context()
        reset_algo_parameters()
    assert ms.get_auto_parallel_context("parallel_mode") == "stand_alone"


def test_semi_auto_context_rejects_a_world_size_mismatch_and_enables_alltoall_for_ulysses():
    from telechat_ms.parallel.ascend import semi_auto_context_kwargs

    with pytest.raises(ConfigError, match=r"16 workers launched but parallel_config needs .* = 64"):
        job115 = load_job_config(Y115)
        semi_auto_context_kwargs(job115.parallel, job115.parallel_config, 16, job115.source)
    job = load_job_config(Y7_32K, overrides=["parallel.parallel_mode=semi_auto_parallel"])
    kwargs = semi_auto_context_kwargs(job.parallel, job.parallel_config, 8, job.source)
    assert kwargs["enable_alltoall"] is True and "pipeline_config" not in kwargs


def test_data_parallel_mode_refuses_model_splits_and_dp_mismatch():
    from telechat_ms.parallel.context import check_data_parallel

    tiny = os.path.join(REPO, "yaml_configs", "tiny", "finetune_tiny_cpu_dp2.yaml")

    def check(job, size):
        check_data_parallel(job.parallel_config, size, job.source)

    check(load_job_config(tiny), 2)
    with pytest.raises(ConfigError, match="data_parallel' is 2 but 4 workers"):
        check(load_job_config(tiny), 4)
    with pytest.raises(ConfigError, match="model_parallel' is 2 but parallel.parallel_mode data_parallel"):
        check(load_job_config(tiny, overrides=["parallel_config.model_parallel=2"]), 2)


def test_ascend_switches_on_in_ascend_yamls_off_in_cpu_yamls():
    import glob
    for path in glob.glob(os.path.join(REPO, "yaml_configs", "*", "*.yaml")):
        job = load_job_config(path)
        cfg = job.model_config()
        on = job.context.device_target == "Ascend"
        assert (cfg.use_flash_attention, cfg.fused_rms_norm, cfg.compute_dtype == "bfloat16") == (on, on, on), path
        if on and job.run_mode != "predict":
            assert cfg.param_dtype == "float32" and job.parallel.parallel_mode == "semi_auto_parallel", path
            assert job.parallel.enable_parallel_optimizer and job.parallel.full_batch, path
        if not on:
            assert job.parallel.parallel_mode in ("stand_alone", "data_parallel"), path


def test_training_wrappers_one_step_and_pipeline(monkeypatch):
    """pp 1: MindFormers' one-step cell (builds on CPU); pp > 1: a PipelineCell of micro_batch_num micro batches
    inside MFPipelineWithLossScaleCell (which needs Ascend communication groups: its arguments are checked)."""
    from mindspore import nn
    import mindformers.wrapper.wrapper as mfw
    from telechat_ms.config import TeleChatConfig
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.parallel.ascend import wrap_train_step

    model = TeleChatForCausalLM(TeleChatConfig.preset("tiny", n_layer=1, vocab_size=256))
    opt = nn.AdamWeightDecay(model.trainable_params(), 1e-3)
    job7 = load_job_config(os.path.join(REPO, "yaml_configs", "7b", "finetune_telechat2_7b.yaml"))
    step = wrap_train_step(model, opt, job7.parallel_config, job7.runner_wrapper)
    assert type(step).__name__ == "MFTrainOneStepCell"
    seen = {}
    monkeypatch.setattr(mfw, "MFPipelineWithLossScaleCell", lambda net, o, **kw: seen.update(net=net, **kw) or net)
    job35 = load_job_config(os.path.join(REPO, "yaml_configs", "35b", "finetune_telechat2_35b.yaml"))
    wrap_train_step(model, opt, job35.parallel_config, job35.runner_wrapper)
    assert type(seen["net"]).__name__ == "PipelineCell" and seen["net"].micro_size == 32
    assert seen["micro_batch_num"] == 32 and seen["use_clip_grad"] is True and seen["scale_sense"] == 1.0
