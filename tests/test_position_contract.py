"""The shape contract between the position inputs the trainer feeds and the layouts parallelize declares for them.

Under semi_auto_parallel (set on CPU, where it can be set and read back), a shipped Ascend YAML is applied to a
stand-in model with the same heads / kv heads / layers; then for data with and without position_ids, every
primitive that consumes the rotary tables or the mask must have a strategy of the fed tensor's rank whose splits
divide the fed shape. Also: positions.training_inputs is the one builder (shared vs batched layouts agree)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from telechat_ms import positions
from telechat_ms.job_config import load_job_config
from tests.conftest import REPO

YAMLS = ["7b/finetune_telechat2_7b.yaml", "115b/finetune_telechat2_115b.yaml", "7b/finetune_telechat2_7b_32k.yaml"]
SEQ = 128


def _consumers(model, use_flash: bool) -> dict[str, tuple[str, int]]:
    """primitive path -> (which fed tensor, its input index) for layer 0."""
    base = "model.layers.0.attention."
    out = {base + "rotary.mul_cos": ("cos", 1), base + "rotary.mul_sin": ("sin", 1)}
    if use_flash:
        out[base + "flash_attention.flash_attention"] = ("mask", 3)
    else:
        out[base + "mask_mul"] = ("mask", 0)
    return out


@pytest.mark.parametrize("with_positions", [False, True], ids=["causal rows", "packed rows"])
@pytest.mark.parametrize("yaml_path", YAMLS)
def test_fed_position_inputs_match_the_declared_strategies(yaml_path, with_positions):
    import mindspore as ms
    from mindspore.parallel import reset_algo_parameters
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.parallel.ascend import set_semi_auto_context
    from telechat_ms.parallel.parallelize import parallelize
    from telechat_ms.parallel.strategies import recorded_strategies
    from telechat_ms.train.trainer import PositionCache, input_layout

    job = load_job_config(os.path.join(REPO, "yaml_configs", yaml_path),
                          [f"model.model_config.seq_length={SEQ}", "parallel_config.context_parallel=1"]
                          if "32k" in yaml_path else [f"model.model_config.seq_length={SEQ}"])
    cfg = job.model_config()
    cfg = cfg.replace(hidden_size=4 * cfg.n_head, ffn_hidden_size=128, vocab_size=256, training_seqlen=SEQ,
                      base_seqlen=SEQ)
    pc = job.parallel_config
    rows = job.runner_config.batch_size * pc.data_parallel           # full_batch: the whole global micro batch
    ids = np.zeros((rows, SEQ), np.int32)
    batch = {"input_ids": ids, "labels": ids}
    if with_positions:
        batch["position_ids"] = np.concatenate([np.arange(SEQ // 2), np.arange(SEQ // 2)])[None].repeat(rows, 0)
    layout = input_layout("position_ids" in batch, cfg.use_flash_attention, sharded=True)  # as the trainer picks
    try:
        set_semi_auto_context(job.parallel, pc, pc.world_size, job.source)
        model = TeleChatForCausalLM(cfg)
        parallelize(model, pc, job.recompute_config, job.parallel, job.model, SEQ,
                    batched_inputs=layout == positions.BATCHED, source=job.source)
        declared = recorded_strategies(model)
    finally:
        ms.reset_auto_parallel_context()
        reset_algo_parameters()
    cos, sin, mask = PositionCache(cfg, layout)(batch)
    fed = {"cos": cos.shape, "sin": sin.shape, "mask": mask.shape}
    for path, (name, index) in _consumers(model, cfg.use_flash_attention).items():
        strategy, shape = declared[path].inputs[index], fed[name]
        assert len(strategy) == len(shape), f"{path}: strategy {strategy} for a fed {name} of shape {shape}"
        assert all(n % s == 0 for n, s in zip(shape, strategy)), f"{path}: {strategy} does not divide {shape}"
    if with_positions:
        assert layout == positions.BATCHED and len(mask.shape) == 4 and mask.shape[0] == rows


def test_shared_and_batched_layouts_hold_the_same_tables():
    from telechat_ms.config import TeleChatConfig
    cfg = TeleChatConfig.preset("tiny", training_seqlen=16, base_seqlen=16)
    cos, sin, mask = positions.training_inputs(cfg, 24)
    bcos, bsin, bmask = positions.training_inputs(cfg, 24, batch_size=3, layout=positions.BATCHED)
    assert cos.shape == (24, cfg.head_dim) and bcos.shape == (3, 1, 24, cfg.head_dim) and bmask.shape == (3, 1, 24, 24)
    np.testing.assert_array_equal(bcos[2, 0], cos)
    np.testing.assert_array_equal(bsin[1, 0], sin)
    np.testing.assert_array_equal(bmask[0], mask[0])
    # packed rows restart positions: the second sample's first token takes row 0 of the tables
    pos = np.concatenate([np.arange(10), np.arange(14)])[None]
    pcos, _, pmask = positions.training_inputs(cfg, 24, 1, pos, positions.BATCHED)
    np.testing.assert_array_equal(pcos[0, 0, 10], cos[0])
    assert pmask[0, 0, 10, 9] == 1 and pmask[0, 0, 10, 10] == 0 and pmask[0, 0, 9, 0] == 0
    with pytest.raises(ValueError, match="batched or varlen layout"):
        positions.training_inputs(cfg, 24, 1, pos, positions.SHARED)
