"""HF <-> MindSpore weights: the name map, bit-exact round trips, index validation, loading, clear errors."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from telechat_ms.checkpoint_io import checkpoint_entries, convert_dtype
from telechat_ms.cli import main
from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import CheckpointError, ConfigError
from telechat_ms.weights import convert_checkpoint, hf_to_ms, ms_to_hf, validate_index


def _tensors(path: str) -> dict[str, tuple[str, bytes]]:
    return {e.name: (e.dtype, e.read().tobytes()) for e in checkpoint_entries(path)}


def test_name_map_is_a_bijection():
    cfg = TeleChatConfig.preset("tiny", n_layer=3, embed_layernorm=True)
    hf_names = list(cfg.parameter_shapes())
    ms_names = [hf_to_ms(n) for n in hf_names]
    assert len(set(ms_names)) == len(hf_names)
    assert [ms_to_hf(n) for n in ms_names] == hf_names
    assert hf_to_ms("transformer.h.2.self_attention.key_value.weight") == "model.layers.2.attention.wk_v.weight"
    assert hf_to_ms("transformer.h.0.mlp.gate_proj.weight") == "model.layers.0.feed_forward.w1.weight"
    assert hf_to_ms("transformer.h.0.mlp.up_proj.weight") == "model.layers.0.feed_forward.w3.weight"
    assert hf_to_ms("transformer.word_embeddings.weight") == "model.tok_embeddings.embedding_weight"


def test_model_parameter_names_follow_the_map():
    pytest.importorskip("mindspore")
    from telechat_ms.model.telechat import TeleChatForCausalLM
    cfg = TeleChatConfig.preset("tiny", vocab_size=64, n_layer=2, embed_layernorm=True)
    model = TeleChatForCausalLM(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.parameters_and_names()}
    assert shapes == {hf_to_ms(n): s for n, s in cfg.parameter_shapes().items()}


def test_validate_real_115b_index(meta_dir):
    cfg = TeleChatConfig.from_pretrained(meta_dir)
    report = validate_index(str(meta_dir / "model.safetensors.index.json"), cfg)
    assert report["tensors"] == 963 and report["naming"] == "hf"
    assert report["parameters"] == 113_282_916_352 and report["dtype"] == "float32"
    assert len({m for _, m in report["map"]}) == 963


def test_validate_index_rejects_a_wrong_config(meta_dir, tmp_path):
    cfg = TeleChatConfig.from_pretrained(meta_dir).replace(ffn_hidden_size=40960 + 128)
    with pytest.raises(CheckpointError, match="total_size"):
        validate_index(str(meta_dir / "model.safetensors.index.json"), cfg)
    index = json.loads((meta_dir / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("transformer.h.95.mlp.down_proj.bias")
    (tmp_path / "idx.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing 1 tensor"):
        validate_index(str(tmp_path / "idx.json"), TeleChatConfig.from_pretrained(meta_dir))


@pytest.mark.parametrize("dtype,fmt,shards", [("float32", "safetensors", 1), ("float16", "safetensors", 3),
                                              ("bfloat16", "safetensors", 2), ("float32", "bin", 2),
                                              ("bfloat16", "bin", 1), ("float16", "bin", 1)])
def test_round_trip_is_bit_exact(ckpt_factory, tmp_path, dtype, fmt, shards):
    src = ckpt_factory(f"src_{dtype}_{fmt}", dtype=dtype, fmt=fmt, num_shards=shards)
    convert_checkpoint(src, str(tmp_path / "ms"), "ms", max_shard_size="40KB", show_progress=False)
    ms_side = _tensors(str(tmp_path / "ms"))
    assert all(n.startswith("model.") or n == "lm_head.weight" for n in ms_side)
    assert len(set(json.loads((tmp_path / "ms" / "model.safetensors.index.json").read_text())[
        "weight_map"].values())) > 1  # the output really is sharded
    convert_checkpoint(str(tmp_path / "ms"), str(tmp_path / "hf"), "hf", show_progress=False)
    before, after = _tensors(src), _tensors(str(tmp_path / "hf"))
    assert before.keys() == after.keys()
    for name in before:
        assert before[name] == after[name], name  # same dtype, same bytes
        assert ms_side[hf_to_ms(name)] == before[name]
    assert TeleChatConfig.from_pretrained(tmp_path / "hf") == TeleChatConfig.from_pretrained(src)


def test_dtype_conversion_is_exact_where_representable():
    x = np.array([1.0, -2.5, 3.140625, 65504.0, 1e-3, np.inf], dtype=np.float32)
    bf = convert_dtype(x, "float32", "bfloat16")
    assert bf.dtype == np.uint16
    back = convert_dtype(bf, "bfloat16", "float32")
    assert back[:3].tolist() == [1.0, -2.5, 3.140625] and np.isinf(back[5])
    torch = pytest.importorskip("torch")
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert bf.tolist() == ref.tolist()  # round-to-nearest-even like torch


def test_convert_to_another_dtype(tiny_gqa_ckpt, tmp_path):
    convert_checkpoint(tiny_gqa_ckpt, str(tmp_path / "bf"), "ms", dtype="bfloat16", show_progress=False)
    entries = checkpoint_entries(str(tmp_path / "bf"))
    assert {e.dtype for e in entries} == {"bfloat16"}
    src = {e.name: e for e in checkpoint_entries(tiny_gqa_ckpt)}
    e = next(e for e in entries if e.name == "lm_head.weight")
    f32 = convert_dtype(e.read(), "bfloat16", "float32")
    assert np.abs(f32 - src["lm_head.weight"].read()).max() < 1e-3


def test_from_pretrained_hf_ms_and_port_ckpt_agree(tiny_gqa_ckpt, tmp_path):
    ms = pytest.importorskip("mindspore")
    from telechat_ms.model.telechat import TeleChatForCausalLM
    convert_checkpoint(tiny_gqa_ckpt, str(tmp_path / "ms"), "ms", show_progress=False)
    ids = ms.Tensor(np.arange(12, dtype=np.int32).reshape(1, 12))
    a = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)
    b = TeleChatForCausalLM.from_pretrained(str(tmp_path / "ms"))
    la, lb = a(ids).asnumpy(), b(ids).asnumpy()
    assert np.array_equal(la, lb)
    # a checkpoint of the public MindSpore port: .ckpt with the port's names, optimizer state beside it
    port = tmp_path / "port"
    port.mkdir()
    ms.save_checkpoint(a, str(port / "telechat.ckpt"),
                       append_dict={"global_step": 7, "adam_m.lm_head.weight": ms.Tensor(np.zeros((2, 2), np.float32))})
    shutil.copy(os.path.join(tiny_gqa_ckpt, "config.json"), port / "config.json")
    c = TeleChatForCausalLM.from_pretrained(str(port))
    assert np.array_equal(c(ids).asnumpy(), la)
    assert main(["convert", "ms2hf", str(port), str(tmp_path / "port_hf"), "--quiet"]) == 0
    assert _tensors(str(tmp_path / "port_hf")) == _tensors(tiny_gqa_ckpt)


def test_save_pretrained_both_namings(tiny_gqa_ckpt, tmp_path):
    pytest.importorskip("mindspore")
    from telechat_ms.model.telechat import TeleChatForCausalLM
    model = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)
    model.save_pretrained(str(tmp_path / "hf"), fmt="hf")
    assert _tensors(str(tmp_path / "hf")) == _tensors(tiny_gqa_ckpt)
    model.save_pretrained(str(tmp_path / "ms"))
    assert "model.layers.0.attention.wk_v.weight" in _tensors(str(tmp_path / "ms"))


# ------------------------------------------------------------------------------------------- bad input
def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _no_output(tmp_path) -> bool:
    return not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _rewrite(path: str, fn) -> None:
    from safetensors.numpy import load_file, save_file
    file = os.path.join(path, "model.safetensors")
    save_file(fn(load_file(file)), file)


def test_wrong_shape_names_tensor_and_file(tiny_gqa_ckpt, tmp_path):
    bad = _copy(tiny_gqa_ckpt, tmp_path / "bad")
    _rewrite(bad, lambda sd: {**sd, "transformer.h.1.mlp.up_proj.weight": np.zeros((95, 64), np.float32)})
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(bad, str(tmp_path / "out"), "ms", show_progress=False)
    assert "model.safetensors" in str(err.value) and "'transformer.h.1.mlp.up_proj.weight'" in str(err.value)
    assert "[95, 64]" in str(err.value) and "[96, 64]" in str(err.value)
    assert _no_output(tmp_path)


def test_unknown_and_missing_tensors(tiny_gqa_ckpt, tmp_path):
    bad = _copy(tiny_gqa_ckpt, tmp_path / "extra")
    _rewrite(bad, lambda sd: {**sd, "transformer.h.0.self_attention.rotary.inv_freq": np.zeros(8, np.float32)})
    with pytest.raises(CheckpointError, match=r"unknown tensor 'transformer.h.0.self_attention.rotary.inv_freq'"):
        convert_checkpoint(bad, str(tmp_path / "out"), "ms", show_progress=False)
    bad2 = _copy(tiny_gqa_ckpt, tmp_path / "missing")
    _rewrite(bad2, lambda sd: {k: v for k, v in sd.items() if k != "transformer.ln_f.weight"})
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\).*'transformer.ln_f.weight'"):
        convert_checkpoint(bad2, str(tmp_path / "out"), "ms", show_progress=False)
    assert _no_output(tmp_path)


def test_truncated_safetensors(tiny_gqa_ckpt, tmp_path):
    bad = _copy(tiny_gqa_ckpt, tmp_path / "trunc")
    file = os.path.join(bad, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated file: tensor '.*' needs bytes"):
        convert_checkpoint(bad, str(tmp_path / "out"), "ms", show_progress=False)
    with open(file, "r+b") as fh:
        fh.truncate(5)
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        convert_checkpoint(bad, str(tmp_path / "out"), "ms", show_progress=False)
    assert _no_output(tmp_path)


def test_missing_or_contradictory_config(tiny_gqa_ckpt, tmp_path):
    bad = _copy(tiny_gqa_ckpt, tmp_path / "cfg")
    cfg_file = os.path.join(bad, "config.json")
    data = json.load(open(cfg_file))
    data["num_hidden_layers"] = data["n_layer"] + 1
    json.dump(data, open(cfg_file, "w"))
    with pytest.raises(ConfigError, match="contradictory fields n_layer=2, num_hidden_layers=3"):
        convert_checkpoint(bad, str(tmp_path / "out"), "ms", show_progress=False)
    os.remove(cfg_file)
    with pytest.raises(ConfigError, match="no config.json"):
        convert_checkpoint(bad, str(tmp_path / "out"), "ms", show_progress=False)
    assert _no_output(tmp_path)


def test_unwritable_output_and_existing_output(tiny_gqa_ckpt, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(["convert", "hf2ms", tiny_gqa_ckpt, str(blocker / "out"), "--quiet"]) == 2
    assert "cannot write output here" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    assert main(["convert", "hf2ms", tiny_gqa_ckpt, str(existing), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (existing / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_crash_mid_write_leaves_no_output(tiny_gqa_ckpt, tmp_path, monkeypatch, dtype):
    import telechat_ms.checkpoint_io as cio
    import telechat_ms.weights as weights
    calls = {"n": 0}

    def failing(real):
        def inner(*args):
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError("disk full")
            return real(*args)
        return inner

    monkeypatch.setattr(cio, "copy_range", failing(cio.copy_range))          # same-dtype path: byte copies
    monkeypatch.setattr(weights, "convert_dtype", failing(weights.convert_dtype))  # converting path
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(tiny_gqa_ckpt, str(tmp_path / "out"), "ms", dtype=dtype, show_progress=False)
    assert _no_output(tmp_path)


def test_cli_convert_and_validate(tiny_gqa_ckpt, tmp_path, meta_dir, capsys):
    src = _copy(tiny_gqa_ckpt, tmp_path / "src")
    shutil.copy(meta_dir / "tokenizer.model", os.path.join(src, "tokenizer.model"))
    shutil.copy(meta_dir / "generation_config.json", os.path.join(src, "generation_config.json"))
    assert main(["convert", "hf2ms", src, str(tmp_path / "ms"), "--dtype", "float16", "--quiet"]) == 0
    assert "wrote 23 tensors" in capsys.readouterr().out
    for name in ("tokenizer.model", "generation_config.json"):  # tokenizer files travel with the weights
        assert (tmp_path / "ms" / name).read_bytes() == (meta_dir / name).read_bytes()
    assert main(["validate-index", str(meta_dir / "model.safetensors.index.json")]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == 963
