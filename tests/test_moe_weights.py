"""TeleChat2-39B-A12B checkpoints: the HF release layout (mlp.router, mlp.local_experts.E.*) <-> MindSpore stacked
experts, bit-exact both ways; the NPU release's MindSpore .ckpt layouts load to the same logits; index validation."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from telechat_ms.checkpoint_io import checkpoint_entries
from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import CheckpointError
from telechat_ms.weights import convert_checkpoint, hf_to_ms, ms_layout, ms_to_hf_names, validate_index

ms = pytest.importorskip("mindspore")
from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402

STATS = ("router_tokens", "router_dropped", "router_aux")  # router statistics: model state, never checkpoint weights


def _tensors(path: str) -> dict[str, tuple[str, tuple, bytes]]:
    return {e.name: (e.dtype, tuple(e.shape), e.read().tobytes()) for e in checkpoint_entries(path)}


def test_moe_name_map():
    assert hf_to_ms("transformer.h.3.mlp.router.weight") == "model.layers.3.feed_forward.router.dense.weight"
    assert hf_to_ms("transformer.h.3.mlp.local_experts.11.gate_proj.weight") == \
        "model.layers.3.feed_forward.ffn.w1.weight"
    assert hf_to_ms("transformer.h.3.mlp.local_experts.0.up_proj.weight") == "model.layers.3.feed_forward.ffn.w3.weight"
    assert hf_to_ms("transformer.h.3.mlp.local_experts.2.down_proj.bias") == "model.layers.3.feed_forward.ffn.w2.bias"
    assert ms_to_hf_names("model.layers.1.feed_forward.ffn.w2.weight", 3) == [
        f"transformer.h.1.mlp.local_experts.{e}.down_proj.weight" for e in range(3)]
    cfg = TeleChatConfig.preset("telechat2_39b_a12b")
    layout = {n: s for n, s, _ in ms_layout(cfg)}
    assert layout["model.layers.0.feed_forward.ffn.w1.weight"] == (16, 6144, 4096)
    assert layout["model.layers.0.feed_forward.ffn.w2.weight"] == (16, 4096, 6144)
    assert layout["model.layers.0.feed_forward.ffn.w2.bias"] == (1, 16, 1, 4096)
    assert layout["model.layers.0.feed_forward.router.dense.weight"] == (16, 4096)
    assert len(layout) == 2 + 1 + 30 * (6 + 5)  # embedding, lm_head, final norm; per layer attention+norms, MoE


def test_model_parameters_are_the_stacked_layout():
    cfg = TeleChatConfig.preset("tiny_moe", vocab_size=64, hidden_size=32, ffn_hidden_size=48)
    model = TeleChatForCausalLM(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.parameters_and_names() if not n.endswith(STATS)}
    assert shapes == {n: s for n, s, _ in ms_layout(cfg)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_round_trip_is_bit_exact(tmp_path, dtype):
    from telechat_ms.reference.random_checkpoint import tiny_moe_config, write_random_hf_checkpoint
    src = write_random_hf_checkpoint(str(tmp_path / "src"), tiny_moe_config(), dtype=dtype, num_shards=3, seed=4)
    convert_checkpoint(src, str(tmp_path / "ms"), "ms", max_shard_size="100KB", show_progress=False)
    ms_side = _tensors(str(tmp_path / "ms"))
    assert ms_side["model.layers.1.feed_forward.ffn.w1.weight"][1] == (8, 96, 64)
    assert ms_side["model.layers.1.feed_forward.ffn.w2.bias"][1] == (1, 8, 1, 64)
    assert not any("local_experts" in n for n in ms_side)
    convert_checkpoint(str(tmp_path / "ms"), str(tmp_path / "hf"), "hf", show_progress=False)
    before, after = _tensors(src), _tensors(str(tmp_path / "hf"))
    assert before.keys() == after.keys()
    for name in before:
        assert before[name] == after[name], name
    # the stacked MindSpore tensor holds expert e's bytes at [e]
    cfg = TeleChatConfig.from_pretrained(src)
    stacked = {e.name: e for e in checkpoint_entries(str(tmp_path / "ms"))}["model.layers.0.feed_forward.ffn.w3.weight"]
    assert stacked.read()[5].tobytes() == before["transformer.h.0.mlp.local_experts.5.up_proj.weight"][2]
    assert TeleChatConfig.from_pretrained(tmp_path / "hf") == cfg
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_cfg["num_experts"], hf_cfg["num_experts_per_tok"], hf_cfg["norm_topk_prob"]) == (8, 2, True)


def _write_npu_ckpt(src: str, out: str, gmm: bool) -> None:
    """The NPU release's MindSpore checkpoint: port names, experts stacked (convert_weight.py), optionally
    transposed for grouped matmul (convert_gmm.py), one .ckpt file next to config.json."""
    cfg = TeleChatConfig.from_pretrained(src)
    entries = {e.name: e for e in checkpoint_entries(src)}
    params = []
    for name, shape, hf_names in ms_layout(cfg):
        arr = np.stack([entries[n].read() for n in hf_names]).reshape(shape) if len(hf_names) > 1 else \
            entries[hf_names[0]].read()
        if gmm and ".ffn.w" in name and name.endswith("weight"):
            arr = np.ascontiguousarray(arr.transpose(0, 2, 1))
        params.append({"name": name, "data": ms.Tensor(arr)})
    os.makedirs(out)
    ms.save_checkpoint(params, os.path.join(out, "telechat_39b_a12b.ckpt"))
    shutil.copy(os.path.join(src, "config.json"), out)


@pytest.mark.parametrize("gmm", [False, True])
def test_npu_release_layout_loads_to_the_same_logits(tiny_moe_ckpt, tmp_path, gmm):
    _write_npu_ckpt(tiny_moe_ckpt, str(tmp_path / "npu"), gmm)
    ids = ms.Tensor(np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32))
    ref = TeleChatForCausalLM.from_pretrained(tiny_moe_ckpt)(ids).asnumpy()
    got = TeleChatForCausalLM.from_pretrained(str(tmp_path / "npu"))(ids).asnumpy()
    np.testing.assert_array_equal(got, ref)
    convert_checkpoint(str(tmp_path / "npu"), str(tmp_path / "hf"), "hf", show_progress=False)
    before, after = _tensors(tiny_moe_ckpt), _tensors(str(tmp_path / "hf"))
    assert before == after  # the release's NPU checkpoint exports to the HF release layout exactly


def test_save_pretrained_hf_is_the_release_layout(tiny_moe_ckpt, tmp_path):
    model = TeleChatForCausalLM.from_pretrained(tiny_moe_ckpt)
    model.save_pretrained(str(tmp_path / "hf"), fmt="hf")
    assert _tensors(tiny_moe_ckpt) == _tensors(str(tmp_path / "hf"))
    model.save_pretrained(str(tmp_path / "ms"), fmt="ms")
    assert "model.layers.0.feed_forward.ffn.w1.weight" in _tensors(str(tmp_path / "ms"))


def test_validate_index_knows_the_moe_names(tmp_path):
    from telechat_ms.reference.random_checkpoint import tiny_moe_config, write_random_hf_checkpoint
    src = write_random_hf_checkpoint(str(tmp_path / "src"), tiny_moe_config(), num_shards=2, seed=4)
    cfg = TeleChatConfig.from_pretrained(src)
    report = validate_index(os.path.join(src, "model.safetensors.index.json"), cfg)
    assert report["naming"] == "hf" and report["parameters"] == cfg.num_parameters()
    assert report["tensors"] == len(cfg.parameter_shapes())
    convert_checkpoint(src, str(tmp_path / "ms"), "ms", max_shard_size="100KB", show_progress=False)
    report = validate_index(str(tmp_path / "ms" / "model.safetensors.index.json"), cfg)
    assert report["naming"] == "ms" and report["dtype"] == "float32"
    assert report["tensors"] == len(ms_layout(cfg))
    index = json.loads((tmp_path / "ms" / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("model.layers.1.feed_forward.ffn.w3.weight")
    (tmp_path / "bad.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing 8 tensor"):
        validate_index(str(tmp_path / "bad.json"), cfg)
    dense = cfg.replace(num_experts=0, num_experts_per_tok=0)
    with pytest.raises(CheckpointError, match="unknown tensor|not a weight"):
        validate_index(os.path.join(src, "model.safetensors.index.json"), dense)


def test_wrong_expert_count_is_a_clear_error(tiny_moe_ckpt, tmp_path):
    convert_checkpoint(tiny_moe_ckpt, str(tmp_path / "ms"), "ms", show_progress=False)
    cfg = json.loads((tmp_path / "ms" / "config.json").read_text())
    cfg["num_experts"] = 4
    (tmp_path / "ms" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"feed_forward.*has shape \[8, .*implies \[4, "):
        TeleChatForCausalLM.from_pretrained(str(tmp_path / "ms"))
