"""Training the tiny MoE on CPU: the loss falls with the load-balancing loss and router statistics in
metrics.jsonl, the moe_config section is checked, and kill -9 + --resume continues bit-exactly."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from telechat_ms.checkpoint_io import safetensors_entries
from telechat_ms.errors import ConfigError
from telechat_ms.job_config import job_from_dict, load_job_config
from tests.train_helpers import losses, run_train, tiny_job, write_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = {"preset": "tiny_moe", "hidden_size": 64, "n_head": 4, "num_key_value_heads": 2, "ffn_hidden_size": 96,
       "training_seqlen": 32, "base_seqlen": 32}


def _moe_job(data: dict, out: str, **sections) -> dict:
    job = tiny_job(data["data"], out, data["vocab_size"], **sections)
    job["model"]["model_config"] = {**MOE, "vocab_size": data["vocab_size"]}
    job.setdefault("moe_config", {"capacity_factor": 1.0, "aux_loss_types": ["expert"], "aux_loss_factors": [0.01]})
    return job


def _records(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_moe_loss_decreases_with_aux_loss_and_router_stats(demo_data, tmp_path, pynative_after):
    from telechat_ms.train.trainer import train
    job = job_from_dict(_moe_job(demo_data, str(tmp_path / "run"), runner_config={"batch_size": 4, "max_steps": 30},
                                 lr_schedule={"type": "constant", "learning_rate": 3e-3, "warmup_steps": 3}))
    cfg = job.model_config()
    assert (cfg.capacity_factor, cfg.aux_loss_factor) == (1.0, 0.01)
    result = train(job)
    assert np.mean(result.losses[-5:]) < 0.75 * np.mean(result.losses[:5]), result.losses
    records = _records(str(tmp_path / "run"))
    assert len(records) == 30
    tokens = 4 * 64  # batch x seq per micro batch; top-2 over 2 layers
    for r in records:
        assert sum(r["expert_tokens"]) == 2 * 2 * tokens and len(r["expert_tokens"]) == 8
        assert 0 < r["aux_loss"] < 1.0  # 2 layers x 0.01 x E sum(P f), at least 0.02 x (1 / E) x E ... bounded
        assert r["aux_loss"] >= 2 * 0.01 * 0.999  # E * sum(P_e f_e) >= 1 for any routing (Cauchy-Schwarz-free:
        # f is the top-k share, P the mean probability; the balanced optimum is 1 per layer)
        # the capacity rule: each expert keeps ceil(2 * 256 * 1.0 / 8) = 64 choices per layer
        assert r["dropped_tokens"] >= 0 and r["dropped_fraction"] == r["dropped_tokens"] / sum(r["expert_tokens"])
    assert any(r["dropped_tokens"] > 0 for r in records)
    # the final directory is a plain MoE checkpoint: no router statistics among its weights
    names = [e.name for e in safetensors_entries(os.path.join(result.final_dir, "model.safetensors"))]
    assert "model.layers.0.feed_forward.ffn.w1.weight" in names and not any("router_" in n for n in names)


def test_dropped_count_follows_the_capacity_rule(demo_data, tmp_path, pynative_after):
    """One step on one batch: the dropped choices reported are those the rule drops, recomputed from the routing
    of the same weights on the same batch."""
    import mindspore as ms
    from telechat_ms.model.moe import expert_capacity
    from telechat_ms.train.trainer import train
    job = job_from_dict(_moe_job(demo_data, str(tmp_path / "run"), runner_config={"batch_size": 4, "max_steps": 1},
                                 lr_schedule={"type": "constant", "learning_rate": 0.0}, train_dataset={
                                     "data_dir": demo_data["data"], "shuffle": False},
                                 moe_config={"capacity_factor": 0.5, "aux_loss_types": ["expert"],
                                             "aux_loss_factors": [0.01]}))
    result = train(job)
    record = _records(str(tmp_path / "run"))[0]
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.train.loader import BatchLoader
    # lr 0: the weights the step ran with; the job's capacity, so each layer's input is the one training saw
    model = TeleChatForCausalLM.from_pretrained(result.final_dir, config=job.model_config())
    batch = BatchLoader(demo_data["data"], 4, shuffle=False).next_global_batch()[0][0]
    ids = ms.Tensor(batch["input_ids"])
    cap = expert_capacity(job.model_config(), ids.shape[0] * ids.shape[1])
    assert cap == 32  # ceil(2 * 256 * 0.5 / 8)
    h = model.model.tok_embeddings(ids)
    from telechat_ms.positions import training_inputs
    cos, sin, mask = (ms.Tensor(x) for x in training_inputs(model.config, ids.shape[1]))
    dropped, counts = 0, np.zeros(8, np.int64)
    for layer in model.model.layers:
        x = layer.add_attn(h, layer.attention(layer.attention_norm(h), cos, sin, mask))
        _, _, idx = layer.feed_forward.route(layer.ffn_norm(x).reshape(-1, 64))
        per = np.bincount(idx.asnumpy().reshape(-1), minlength=8)
        counts += per
        dropped += int(np.maximum(per - cap, 0).sum())
        h = layer.construct_aux(h, cos, sin, mask)[0]
    assert record["expert_tokens"] == counts.tolist()
    assert record["dropped_tokens"] == dropped > 0


def test_moe_exact_resume_after_kill(demo_data, tmp_path):
    base = _moe_job(demo_data, str(tmp_path / "full"), runner_config={"batch_size": 4, "max_steps": 8},
                    callbacks={"save_interval": 4, "log_interval": 4, "keep_checkpoint_max": 3,
                               "tensorboard": False, "loss_curve": False})
    full = write_yaml(str(tmp_path / "full.yaml"), base)
    run_train(full)
    killed = write_yaml(str(tmp_path / "killed.yaml"), {**base, "output_dir": str(tmp_path / "killed")})
    proc = run_train(killed, env={"TELECHAT_MS_FAULT": "kill_after_step:4"}, check=False)
    assert proc.returncode == 137
    run_train(killed, "--resume=auto")
    a, b = _records(str(tmp_path / "full")), _records(str(tmp_path / "killed"))
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a[4:], b[4:]):
        assert (ra["loss"], ra["aux_loss"], ra["expert_tokens"], ra["dropped_tokens"]) == \
            (rb["loss"], rb["aux_loss"], rb["expert_tokens"], rb["dropped_tokens"]), ra["step"]  # bitwise
    wa = {e.name: e.read() for e in safetensors_entries(str(tmp_path / "full" / "final" / "model.safetensors"))}
    wb = {e.name: e.read() for e in safetensors_entries(str(tmp_path / "killed" / "final" / "model.safetensors"))}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[n], wb[n]) for n in wa)


@pytest.mark.parametrize("section,match", [
    ({"expert_num": 16}, "expert_num' is 16 but the model has 8"),
    ({"num_experts_chosen": 4}, "num_experts_chosen' is 4 but the model has 2"),
    ({"routing_policy": "TopkRouterV1"}, "routing_policy"),
    ({"enable_sdrop": True}, "enable_sdrop"),
    ({"shared_expert_num": 1}, "shared_expert_num"),
    ({"aux_loss_types": ["expert", "device"], "aux_loss_factors": [0.01, 0.01]}, "aux_loss_types"),
    ({"aux_loss_factors": [0.01, 0.02]}, "one factor per"),
    ({"capacity_factor": -1}, "capacity_factor"),
])
def test_moe_config_errors_are_named(demo_data, tmp_path, section, match):
    with pytest.raises(ConfigError, match=match):
        job_from_dict(_moe_job(demo_data, str(tmp_path), moe_config=section)).model_config()


def test_moe_config_on_a_dense_model_is_rejected(demo_data, tmp_path):
    job = tiny_job(demo_data["data"], str(tmp_path), demo_data["vocab_size"], moe_config={"capacity_factor": 1.0})
    with pytest.raises(ConfigError, match="model is dense"):
        job_from_dict(job).model_config()


def test_shipped_tiny_moe_yaml_loads():
    job = load_job_config(os.path.join(REPO, "yaml_configs", "tiny", "finetune_tiny_moe_cpu.yaml"))
    cfg = job.model_config()
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.capacity_factor, cfg.aux_loss_factor) == (8, 2, 1.2, 0.01)
