"""TeleChatConfig: presets, exact parameter counts, HF config.json fidelity and clear errors."""
from __future__ import annotations

import json

import pytest

from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import ConfigError


@pytest.mark.parametrize("name,count", [("3b", 3_070_528_512), ("7b", 7_617_351_680), ("35b", 35_435_059_200),
                                        ("115b", 113_282_916_352)])
def test_preset_parameter_counts(name, count):
    assert TeleChatConfig.preset(name).num_parameters() == count


def test_real_115b_config(meta_dir):
    cfg = TeleChatConfig.from_pretrained(meta_dir)
    assert (cfg.n_layer, cfg.hidden_size, cfg.n_head, cfg.num_key_value_heads) == (96, 8192, 64, 8)
    assert cfg.layer_norm_epsilon == 1e-8 and cfg.head_dim == 128 and cfg.n_rep == 8
    assert cfg.num_parameters() * 4 == json.load(open(meta_dir / "model.safetensors.index.json"))["metadata"][
        "total_size"]
    assert cfg.extra["pretraining_tp"] == 2  # unknown keys survive


def test_aliases_and_mha_default():
    cfg = TeleChatConfig.from_dict(dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                        intermediate_size=96, vocab_size=100, num_key_value_heads=None))
    assert (cfg.n_layer, cfg.n_head, cfg.ffn_hidden_size, cfg.num_key_value_heads) == (2, 4, 96, 4)


def test_save_pretrained_round_trip(tmp_path, meta_dir):
    cfg = TeleChatConfig.from_pretrained(meta_dir)
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((meta_dir / "config.json").read_text())
    for key, value in original.items():
        assert data[key] == value, key  # every released field is written back as it was
    assert "compute_dtype" not in data  # run-time switches stay out of the HF file
    assert TeleChatConfig.from_pretrained(tmp_path) == cfg


@pytest.mark.parametrize("data,message", [
    (dict(n_layer=2, n_head=4, vocab_size=10, ffn_hidden_size=8), "missing required field 'hidden_size'"),
    (dict(n_layer=2, num_hidden_layers=3, n_head=4, hidden_size=64, vocab_size=10, ffn_hidden_size=8),
     "contradictory fields n_layer=2, num_hidden_layers=3"),
    (dict(n_layer=2, n_head=5, hidden_size=64, vocab_size=10, ffn_hidden_size=8), "not divisible by n_head"),
    (dict(n_layer=2, n_head=4, num_key_value_heads=3, hidden_size=64, vocab_size=10, ffn_hidden_size=8),
     "not divisible by num_key_value_heads"),
    (dict(n_layer="2", n_head=4, hidden_size=64, vocab_size=10, ffn_hidden_size=8), "'n_layer' must be a positive"),
])
def test_bad_config_errors(tmp_path, data, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        TeleChatConfig.from_pretrained(tmp_path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_invalid_json_names_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n"n_layer": 2,\n oops}')
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 3"):
        TeleChatConfig.from_pretrained(tmp_path)
