"""`plan` on the shipped TeleChat2-39B-A12B YAMLs: the published layout fits 64 GB NPUs, expert_parallel must divide
the 16 experts and data_parallel, parameter counts (39.3B total / 12.1B active), FLOPs from the active parameters,
and the comparison with the published 865 tokens/s/NPU (fine-tune) and 36.4 tokens/s (predict on 2 NPUs)."""
from __future__ import annotations

import os

import pytest

from telechat_ms.config import TeleChatConfig
from telechat_ms.job_config import load_job_config
from telechat_ms.parallel.memory import GIB, expert_params, layer_params, routed_slots
from telechat_ms.parallel.plan import Launch, format_plan, make_plan
from tests.conftest import REPO

FINETUNE = os.path.join(REPO, "yaml_configs", "39b_a12b", "finetune_telechat2_39b_a12b.yaml")
PREDICT = os.path.join(REPO, "yaml_configs", "39b_a12b", "predict_telechat2_39b_a12b.yaml")


def test_published_finetune_layout_fits_and_compares_to_865():
    report = make_plan(load_job_config(FINETUNE), Launch(nodes=128, npus_per_node=8))
    assert report.valid and report.fits, format_plan(report)
    assert report.dims.world == 1024 and report.dims.ep == 2
    assert report.peak.total / GIB <= 53.0
    text = format_plan(report)
    assert "39.33B total, 12.15B active per token (4 of 16 experts)" in text
    assert "865 tokens/s per NPU" in text
    cfg = load_job_config(FINETUNE).model_config()
    assert (cfg.capacity_factor, cfg.aux_loss_factor) == (1.2, 0.01)
    # FLOPs from the active parameters: 6 x (layers x (attention + 4 experts + router) + lm_head) + attention
    active = 30 * (layer_params(cfg)[0] + expert_params(cfg, active=True) + 16 * 4096) + 131072 * 4096
    assert report.flops.per_token == 6 * active + 6 * 30 * 8192 * 4096
    # the active matmul parameters + the embedding are the active count less norms and biases (< 0.1%)
    assert abs((active + 131072 * 4096) / cfg.num_parameters(active=True) - 1) < 1e-3
    assert report.flops.per_token < 0.4 * 6 * cfg.num_parameters()  # 12B active, not 39B


def test_expert_memory_follows_expert_parallel():
    job = load_job_config(FINETUNE, overrides=["parallel_config.expert_parallel=4"])
    four = make_plan(job, Launch(nodes=128, npus_per_node=8))
    two = make_plan(load_job_config(FINETUNE), Launch(nodes=128, npus_per_node=8))
    assert four.valid
    # the parallel optimizer shards weights, gradient buffers and states over all dp ranks whatever ep is; the
    # gathered working copies of the experts follow ep (split 4 ways, not 2)
    assert four.stages[0].parts["copies"] < two.stages[0].parts["copies"]
    cfg = TeleChatConfig.preset("telechat2_39b_a12b", capacity_factor=1.2)
    assert routed_slots(cfg) == pytest.approx(4.8)   # k x capacity: the routed tokens the activations hold
    assert routed_slots(cfg.replace(capacity_factor=0.0)) == 16  # no dropping: a slot in every expert


@pytest.mark.parametrize("ep,message", [(3, "expert_parallel 3 does not divide num_experts 16"),
                                        (32, "expert_parallel 32 does not divide num_experts 16")])
def test_plan_rejects_an_expert_parallel_that_does_not_divide(ep, message):
    job = load_job_config(FINETUNE, overrides=[f"parallel_config.expert_parallel={ep}",
                                               "parallel_config.data_parallel=96"])
    report = make_plan(job, Launch(nodes=96, npus_per_node=8))
    assert not report.valid
    assert any(message in i.message for i in report.issues), format_plan(report)


def test_predict_on_two_npus_fits_and_compares_to_36_4():
    report = make_plan(load_job_config(PREDICT), Launch(workers=2))
    assert report.valid and report.fits, format_plan(report)
    text = format_plan(report)
    assert "36.4 tokens/s" in text and "39.33B total" in text
    # bf16 weights of every expert on 2 NPUs: 39.33B x 2 B / 2
    assert report.stages[0].parts["weights"] / 1e9 == pytest.approx(39.33, rel=0.01)
