"""HF exports other engines load (spec 9): every config field and file vLLM's TeleChat2ForCausalLM reads, its weight
names and key_value layout reproduced and run, MindFormers' in-tree TeleChat2 config (the vLLM-MindSpore path) fed
the same file, and our config reading old and new files alike.

vLLM is not installable here (a CUDA wheel; see PLATFORM_NOTES), so its loading steps are re-enacted from its source
(vllm/model_executor/models/telechat2.py, llama.py, config/model.py): they are small and their semantics are spelled
out below, each step named after the vLLM code it mirrors.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from telechat_ms import hf_export
from telechat_ms.cli import main
from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import ConfigError
from telechat_ms.weights import convert_checkpoint

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def exports(tiny_gqa_ckpt, ckpt_factory, tmp_path_factory) -> dict[str, str]:
    """The same tiny GQA model exported three ways: `convert ms2hf` (fp32 and --dtype bfloat16) from a MindSpore
    checkpoint, and model.save_pretrained(fmt='hf'); plus an MHA export (num_key_value_heads = n_head)."""
    pytest.importorskip("mindspore")
    from telechat_ms.model.telechat import TeleChatForCausalLM
    root = tmp_path_factory.mktemp("exports")
    ms_dir = str(root / "ms")
    convert_checkpoint(tiny_gqa_ckpt, ms_dir, "ms", show_progress=False)
    out = {"src": tiny_gqa_ckpt, "ms": ms_dir}
    for name, extra in (("hf", []), ("hf_bf16", ["--dtype", "bfloat16"])):
        out[name] = str(root / name)
        assert main(["convert", "ms2hf", ms_dir, out[name], "--quiet", *extra]) == 0
    out["saved"] = str(root / "saved")
    TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt).save_pretrained(out["saved"], fmt="hf")
    # an MHA checkpoint whose config.json has no num_key_value_heads (missing means MHA): the export states it
    mha = out["mha_src"] = ckpt_factory("mha_null", config={"num_key_value_heads": 4}, seed=3)
    cfg_file = os.path.join(mha, "config.json")
    data = json.load(open(cfg_file))
    del data["num_key_value_heads"]
    json.dump(data, open(cfg_file, "w"))
    out["mha"] = str(root / "mha")
    assert main(["convert", "ms2hf", mha, out["mha"], "--quiet"]) == 0
    return out


def _tensors(path: str) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as fh:
                for key in fh.keys():
                    out[key] = fh.get_tensor(key).float().numpy()
    return out


def _file_dtypes(path: str) -> set[str]:
    dtypes = set()
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            dtypes |= {SAFETENSORS_DTYPES[v["dtype"]] for k, v in header.items() if k != "__metadata__"}
    return dtypes


# --------------------------------------------------------------------------------------------- config.json
@pytest.mark.parametrize("name", ["hf", "hf_bf16", "saved", "mha"])
def test_config_json_has_every_field_vllm_reads(exports, name):
    path = exports[name]
    data = json.load(open(os.path.join(path, "config.json")))
    src = json.load(open(os.path.join(exports["mha_src" if name == "mha" else "src"], "config.json")))
    assert data["architectures"] == ["TeleChat2ForCausalLM"]  # the name vLLM's registry maps to telechat2.py
    assert data["model_type"] == "telechat"
    assert data["auto_map"] == {"AutoConfig": "configuration_telechat2.Telechat2Config"}
    assert os.path.isfile(os.path.join(path, "configuration_telechat2.py"))
    kv = 4 if name == "mha" else 2
    assert type(data["num_key_value_heads"]) is int and data["num_key_value_heads"] == kv  # present, never null
    for key in ("n_layer", "n_head", "hidden_size", "ffn_hidden_size", "layer_norm_epsilon", "vocab_size",
                "seq_length", "training_seqlen", "base_seqlen"):
        assert data[key] == src[key], key
    assert data["tie_word_embeddings"] is False
    assert data["rope_theta"] == 10000.0  # the base the released code hard-codes, stated for Llama-style loaders
    # the dtype vLLM picks with --dtype auto: the one the weights really have
    (dtype,) = _file_dtypes(path)
    assert data["torch_dtype"] == data["dtype"] == dtype == ("bfloat16" if name == "hf_bf16" else "float32")
    for key in ("num_hidden_layers", "num_attention_heads", "intermediate_size", "rms_norm_eps", "n_head_kv",
                "num_kv_heads", "multi_query_group_num", "head_dim", "rope_scaling", "bias", "mlp_bias",
                "attention_bias", "max_position_embeddings"):
        assert key not in data, key  # aliases and Llama switches would shadow or contradict the released fields


def test_autoconfig_answers_what_vllm_model_config_asks(exports):
    import torch
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(exports["hf_bf16"], trust_remote_code=True)
    assert type(cfg).__name__ == "Telechat2Config" and cfg.model_type == "telechat"
    # ModelConfig.get_head_size / get_num_attention_heads / get_total_num_hidden_layers
    assert cfg.hidden_size // cfg.num_attention_heads == 16 and getattr(cfg, "head_dim", None) is None
    assert cfg.num_attention_heads == 4 and cfg.num_hidden_layers == 2
    # ModelConfig.get_total_num_kv_heads: the first attribute of this list that is not None
    kv = next(v for v in (getattr(cfg, a, None) for a in ("n_head_kv", "num_kv_heads", "num_key_value_heads",
                                                          "multi_query_group_num")) if v is not None)
    assert kv == 2 and cfg.num_key_value_heads == 2
    # _get_and_verify_max_len: the smallest of these keys that is set; 2048 if none is
    keys = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
            "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
    assert min(getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None) == 32
    # _find_dtype reads config.dtype (torch_dtype in older vLLM)
    assert cfg.dtype == torch.bfloat16
    # LlamaDecoderLayer: rope base, rope table size, no scaling, untied head, vocab
    assert cfg.rope_theta == 10000.0 and cfg.max_position_embeddings == 32
    assert getattr(cfg, "rope_scaling", None) is None and cfg.tie_word_embeddings is False
    assert cfg.vocab_size == 256 and cfg.eos_token_id == 2
    # TeleChat2Model.__init__ replaces the instance's attribute_map with these four and sets hidden_act / biases
    cfg.attribute_map = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                         "intermediate_size": "ffn_hidden_size", "rms_norm_eps": "layer_norm_epsilon"}
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.rms_norm_eps) == (
        2, 4, 96, 1e-5)
    assert cfg.num_key_value_heads == 2 and cfg.max_position_embeddings == 32 and cfg.rope_theta == 10000.0


def test_mindformers_telechat2_config_reads_the_export(exports):
    """vLLM-MindSpore serves TeleChat2 through MindFormers' in-tree TeleChat2ForCausalLM, configured from this file."""
    import telechat_ms.backend  # noqa: F401  (imports mindformers quietly)
    from mindformers.models.telechat2 import Telechat2Config as MFTelechat2Config
    data = json.load(open(os.path.join(exports["hf_bf16"], "config.json")))
    tc = MFTelechat2Config(**data).convert_to_transformer_config()
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.num_query_groups) == (2, 64, 4, 2)
    assert (tc.ffn_hidden_size, tc.seq_length, tc.vocab_size) == (96, 32, 256)
    assert tc.rotary_base == 10000.0 and tc.layernorm_epsilon == 1e-5
    assert tc.untie_embeddings_and_output_weights and tc.add_mlp_fc2_bias_linear and not tc.add_qkv_bias


def test_our_config_reads_old_and_new_files(exports, meta_dir, tmp_path):
    new = TeleChatConfig.from_pretrained(exports["hf_bf16"])
    old = TeleChatConfig.from_pretrained(exports["src"])
    assert new == old and new.extra == old.extra  # the same model: only the loader keys differ
    assert new.loader["architectures"] == ["TeleChat2ForCausalLM"] and old.loader["architectures"] == [
        "TelechatForCausalLM"]
    assert "torch_dtype" not in new.extra and "dtype" not in new.extra and "rope_theta" not in new.extra
    # the export's weights load back into our model and the export converts back to MindSpore
    assert main(["convert", "hf2ms", exports["hf_bf16"], str(tmp_path / "back"), "--quiet"]) == 0
    back = json.load(open(tmp_path / "back" / "config.json"))
    assert "torch_dtype" not in back  # the file keys describe the export's files, never carried to others
    # an export of the released 115B config keeps every released field except the two vLLM must see changed
    released = json.load(open(meta_dir / "config.json"))
    exported = TeleChatConfig.from_pretrained(meta_dir).to_hf_dict(export_dtype="bfloat16")
    for key, value in released.items():
        if key not in ("architectures", "auto_map"):
            assert exported[key] == value, key
    assert exported["num_key_value_heads"] == 8
    bad = dict(json.load(open(os.path.join(exports["hf"], "config.json"))), rope_theta=500000.0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"bad/config.json: rope_theta 500000.0 is not TeleChat2's"):
        TeleChatConfig.from_pretrained(tmp_path / "bad")


def test_configuration_module_defaults_are_ours():
    """The shipped module repeats our defaults (it cannot import telechat_ms): they must not drift."""
    from telechat_ms.hf_export.configuration_telechat2 import Telechat2Config
    theirs, ours = Telechat2Config(), TeleChatConfig()
    for key, value in ours.to_hf_dict().items():
        if key not in ("architectures", "model_type", "num_key_value_heads"):
            assert getattr(theirs, key) == value, key
    assert theirs.num_key_value_heads == ours.n_head  # null means MHA on both sides
    aliased = Telechat2Config(num_hidden_layers=3, intermediate_size=7, n_head=8, hidden_size=64)
    assert (aliased.n_layer, aliased.ffn_hidden_size, aliased.num_key_value_heads) == (3, 7, 8)


# --------------------------------------------------------------------------------------------- weights
# TeleChat2ForCausalLM.hf_to_vllm_mapper (substrings first, then the prefix), then TeleChat2Model._split_key_value
# and its stacked mapper into QKVParallelLinear / MergedColumnParallelLinear shards (tensor parallel size 1).
_VLLM_SUBSTR = ((".h.", ".layers."), (".self_attention.", ".self_attn."), (".word_embeddings.", ".embed_tokens."),
                (".dense.", ".o_proj."), (".ln_f.", ".norm."))
_VLLM_STACKED = ((".query", ".qkv_proj", "q"), (".key", ".qkv_proj", "k"), (".value", ".qkv_proj", "v"),
                 (".gate_proj", ".gate_up_proj", 0), (".up_proj", ".gate_up_proj", 1))


def _vllm_name(name: str) -> str:
    for old, new in _VLLM_SUBSTR:
        if old in name:
            name = name.replace(old, new, 1)
    return "model." + name[len("transformer."):] if name.startswith("transformer.") else name


def _vllm_split_key_value(weight: np.ndarray, n_head: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM slices 2*head_dim rows per head for every one of n_head heads; past the K kv heads the slices are empty,
    so under GQA it still yields exactly the K key and K value blocks."""
    starts = [i * head_dim * 2 for i in range(n_head)]
    return (np.concatenate([weight[s:s + head_dim] for s in starts]),
            np.concatenate([weight[s + head_dim:s + 2 * head_dim] for s in starts]))


def vllm_load(files: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """The parameters vLLM's TeleChat2ForCausalLM ends up with, built as its loader builds them."""
    n_head, k, d, f = cfg.n_head, cfg.num_key_value_heads, cfg.hidden_size // cfg.n_head, cfg.ffn_hidden_size
    shard_rows = {"q": (0, n_head * d), "k": (n_head * d, k * d), "v": ((n_head + k) * d, k * d), 0: (0, f), 1: (f, f)}
    stream = []
    for name, weight in files.items():
        name = _vllm_name(name)
        if "self_attn.key_value" in name:
            key, value = _vllm_split_key_value(weight, n_head, d)
            stream += [(name.replace("key_value", "key"), key), (name.replace("key_value", "value"), value)]
        else:
            stream.append((name, weight))
    params: dict[str, np.ndarray] = {}
    filled: dict[str, set] = {}
    for name, weight in stream:
        for old, new, shard in _VLLM_STACKED:
            if old in name:
                target = name.replace(old, new)
                start, rows = shard_rows[shard]
                assert weight.shape[0] == rows, (name, weight.shape)  # the shard loader's size check
                total = (n_head + 2 * k) * d if new == ".qkv_proj" else 2 * f
                params.setdefault(target, np.zeros((total, weight.shape[1]), weight.dtype))[start:start + rows] = weight
                assert shard not in filled.setdefault(target, set()), (target, shard)
                filled[target].add(shard)
                break
        else:
            assert name not in params, name
            params[name] = weight
    for target, shards in filled.items():
        assert shards == ({"q", "k", "v"} if "qkv_proj" in target else {0, 1}), target
    return params


def _llama_parameter_names(n_layer: int) -> set[str]:
    """What LlamaForCausalLM (bias=True, mlp_bias=True, qkv/gate_up biases removed as TeleChat2Model does) holds."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        names |= {p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
                                  "mlp.gate_up_proj.weight", "mlp.down_proj.weight", "mlp.down_proj.bias")}
    return names


def llama_forward(params: dict[str, np.ndarray], cfg, ids: np.ndarray) -> np.ndarray:
    """vLLM's LlamaForCausalLM math in float64: plain NeoX RoPE (base rope_theta), GQA, RMSNorm, SiLU-gated MLP."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    n_head, k, eps = cfg.n_head, cfg.num_key_value_heads, cfg.layer_norm_epsilon
    d, t = cfg.hidden_size // n_head, len(ids)
    freqs = np.arange(t)[:, None] / cfg.rope_theta ** (np.arange(0, d, 2) / d)[None]
    cos, sin = np.cos(np.concatenate([freqs, freqs], -1))[:, None], np.sin(np.concatenate([freqs, freqs], -1))[:, None]

    def rope(x):
        return x * cos + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * sin

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    x = p["model.embed_tokens.weight"][ids]
    causal = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}."
        qkv = rms(x, p[pre + "input_layernorm.weight"]) @ p[pre + "self_attn.qkv_proj.weight"].T
        q, kk, v = np.split(qkv, [n_head * d, (n_head + k) * d], -1)
        q, kk, v = rope(q.reshape(t, n_head, d)), rope(kk.reshape(t, k, d)), v.reshape(t, k, d)
        kk, v = np.repeat(kk, n_head // k, axis=1), np.repeat(v, n_head // k, axis=1)  # query head j -> kv j // rep
        scores = np.einsum("thd,shd->hts", q, kk) / np.sqrt(d) + causal
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(t, n_head * d)
        x = x + o @ p[pre + "self_attn.o_proj.weight"].T + p[pre + "self_attn.o_proj.bias"]
        gate, up = np.split(rms(x, p[pre + "post_attention_layernorm.weight"]) @ p[pre + "mlp.gate_up_proj.weight"].T,
                            2, -1)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p[pre + "mlp.down_proj.weight"].T + p[pre + "mlp.down_proj.bias"]
    return rms(x, p["model.norm.weight"]) @ p["lm_head.weight"].T


@pytest.mark.parametrize("name", ["hf", "saved", "mha"])
def test_vllm_loader_yields_our_qkv_and_our_function(exports, name):
    import mindspore as ms
    from transformers import AutoConfig

    from telechat_ms.model.telechat import TeleChatForCausalLM
    path = exports[name]
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
    files = _tensors(path)
    params = vllm_load(files, cfg)
    assert set(params) == _llama_parameter_names(cfg.n_layer)  # every parameter filled, nothing left over
    n_head, k, d = cfg.n_head, cfg.num_key_value_heads, cfg.hidden_size // cfg.n_head
    for i in range(cfg.n_layer):
        kv = files[f"transformer.h.{i}.self_attention.key_value.weight"].reshape(k, 2 * d, -1)  # spec: [k_h; v_h]
        qkv = params[f"model.layers.{i}.self_attn.qkv_proj.weight"]
        np.testing.assert_array_equal(qkv[:n_head * d], files[f"transformer.h.{i}.self_attention.query.weight"])
        np.testing.assert_array_equal(qkv[n_head * d:(n_head + k) * d], kv[:, :d].reshape(k * d, -1))
        np.testing.assert_array_equal(qkv[(n_head + k) * d:], kv[:, d:].reshape(k * d, -1))
    # the vLLM-loaded model computes our model's function (prompt inside training_seqlen: RoPE is plain there)
    ids = np.array([3, 17, 200, 5, 9, 9, 120, 64, 1, 250, 31, 7], dtype=np.int32)
    ours = TeleChatForCausalLM.from_pretrained(path)(ms.Tensor(ids[None])).asnumpy()[0]
    np.testing.assert_allclose(llama_forward(params, cfg, ids), ours, atol=2e-5, rtol=0)
    # and the export holds exactly the source weights (a pure rename: no tensor transposed or re-ordered)
    src = _tensors(exports["mha_src" if name == "mha" else "src"])
    assert set(files) == set(src) and all(np.array_equal(files[n], src[n]) for n in src)


def test_mindformers_split_of_key_value_matches_vllm(exports):
    """MindFormers' TeleChat2 loader reshapes key_value to [K, 2d, H]; vLLM slices per head: same K and V."""
    files = _tensors(exports["hf"])
    kv = files["transformer.h.1.self_attention.key_value.weight"]
    n_head, k, d = 4, 2, 16
    key, value = _vllm_split_key_value(kv, n_head, d)
    blocks = kv.reshape(k, 2 * d, -1)
    np.testing.assert_array_equal(key, blocks[:, :d].reshape(k * d, -1))
    np.testing.assert_array_equal(value, blocks[:, d:].reshape(k * d, -1))
    assert key.shape == value.shape == (k * d, 64)


def test_export_files(exports, tmp_path):
    """What an export directory holds; a tokenizer-less source gives an export without tokenizer files."""
    names = set(os.listdir(exports["hf"]))
    assert {"config.json", "configuration_telechat2.py", "model.safetensors"} <= names
    assert not any(n.startswith("tokenization_") or n == "tokenizer_config.json" for n in names)
    assert set(hf_export.CONFIG_AUTO_MAP) == {"AutoConfig"}
