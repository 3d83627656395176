"""The MindSpore model computes the same function as the independent torch reference (spec section 1)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ms = pytest.importorskip("mindspore")

from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402
from telechat_ms.reference.parity import run_parity  # noqa: E402
from telechat_ms.reference.torch_model import TeleChatRef  # noqa: E402

TRAINING_SEQLEN = 32  # tiny_config


def _ids(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq)).astype(np.int64)


@pytest.mark.parametrize("ckpt", ["tiny_gqa_ckpt", "tiny_mha_ckpt"])
@pytest.mark.parametrize("seq_len", [8, TRAINING_SEQLEN, 3 * TRAINING_SEQLEN])
def test_logits_and_loss_match_reference(ckpt, seq_len, request):
    result = run_parity(request.getfixturevalue(ckpt), seq_len=seq_len, batch_size=2)
    assert result["max_abs"] <= 1e-4, result
    assert result["loss_delta"] <= 1e-5, result
    assert result["greedy_agreement"] == 1.0


def test_ntk_changes_logits_beyond_training_seqlen(tiny_gqa_ckpt):
    """Sanity that the 3x case exercises NTK: the same prefix gives different logits in a longer sequence."""
    model = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)
    ids = _ids(model.config.vocab_size, 1, 3 * TRAINING_SEQLEN)
    long = model(ms.Tensor(ids.astype(np.int32))).asnumpy()
    short = model(ms.Tensor(ids[:, :TRAINING_SEQLEN].astype(np.int32))).asnumpy()
    assert np.abs(long[:, :TRAINING_SEQLEN] - short).max() > 1e-3


def _ms_grads(model, ids, names):
    params = [p for n, p in model.parameters_and_names() if n in names]
    assert len(params) == len(names)
    ids_t = ms.Tensor(ids.astype(np.int32))
    grad_fn = ms.value_and_grad(lambda x: model(x, x), None, params)
    _, grads = grad_fn(ids_t)
    by_name = {p.name: g.asnumpy() for p, g in zip(params, grads)}
    return [by_name[n] for n in names]


def test_gradients_match_reference(tiny_gqa_ckpt):
    seq = 3 * TRAINING_SEQLEN
    ref = TeleChatRef.from_pretrained(tiny_gqa_ckpt)
    model = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)
    ids = _ids(model.config.vocab_size, 2, seq, seed=3)
    out = ref(torch.from_numpy(ids), labels=torch.from_numpy(ids))
    out.loss.backward()
    sd = dict(ref.named_parameters())
    pairs = [("transformer.word_embeddings.weight", "model.tok_embeddings.embedding_weight"),
             ("transformer.h.0.self_attention.key_value.weight", "model.layers.0.attention.wk_v.weight"),
             ("transformer.h.1.mlp.down_proj.bias", "model.layers.1.feed_forward.w2.bias")]
    grads = _ms_grads(model, ids, [m for _, m in pairs])
    for (hf, _), g in zip(pairs, grads):
        expected = sd[hf].grad.numpy()
        rel = np.abs(g - expected).max() / np.abs(expected).max()
        assert rel <= 1e-4, (hf, rel)


def _rewrite_kv(src: str, dst: str, fn) -> None:
    """Copy an HF checkpoint, applying fn to every key_value weight [2*K*d, H]."""
    from safetensors.numpy import load_file, save_file
    os.makedirs(dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    sd = {k: (fn(v) if k.endswith("key_value.weight") else v) for k, v in sd.items()}
    save_file(sd, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as fh:
        cfg = json.load(fh)
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(cfg, fh)


def test_key_value_is_split_per_head_interleaved(tiny_gqa_ckpt, tmp_path):
    """Zero the VALUE rows as the spec lays them out ([k_h0; v_h0; k_h1; v_h1]): attention must then output
    exactly zero, i.e. logits equal a model whose whole key_value is zero. A K-block/V-block split would read
    k_h1 rows as values and give different logits."""
    with open(os.path.join(tiny_gqa_ckpt, "config.json")) as fh:
        cfg = json.load(fh)
    d = cfg["hidden_size"] // cfg["n_head"]
    k = cfg["num_key_value_heads"]

    def zero_values(w):
        w = w.copy().reshape(k, 2, d, -1)
        w[:, 1] = 0.0
        return w.reshape(2 * k * d, -1)

    _rewrite_kv(tiny_gqa_ckpt, str(tmp_path / "v0"), zero_values)
    _rewrite_kv(tiny_gqa_ckpt, str(tmp_path / "all0"), np.zeros_like)
    ids = ms.Tensor(_ids(cfg["vocab_size"], 1, 16).astype(np.int32))
    a = TeleChatForCausalLM.from_pretrained(str(tmp_path / "v0"))(ids).asnumpy()
    b = TeleChatForCausalLM.from_pretrained(str(tmp_path / "all0"))(ids).asnumpy()
    full = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)(ids).asnumpy()
    assert np.abs(a - b).max() <= 1e-6
    assert np.abs(a - full).max() > 1e-3  # the zeroing did change the model


def test_parity_cli_exit_code(tiny_gqa_ckpt, capsys):
    from telechat_ms.cli import main
    assert main(["parity", tiny_gqa_ckpt, "--seq-len", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["parity", tiny_gqa_ckpt, "--seq-len", "8", "--atol", "0"]) == 1


def test_ascend_path_constructs_with_the_same_parameters():
    """The Ascend configuration (flash attention, fused RMSNorm, bf16 compute, fp32 params) builds from the same
    model file with the same checkpoint names and shapes; only the kernels differ (they have no CPU kernels)."""
    from telechat_ms.config import TeleChatConfig
    from telechat_ms.model.layers import TeleChatAttention
    cpu = TeleChatForCausalLM(TeleChatConfig.preset("tiny", vocab_size=64))
    ascend = TeleChatForCausalLM(TeleChatConfig.preset("tiny", vocab_size=64, use_flash_attention=True,
                                                       fused_rms_norm=True, compute_dtype="bfloat16"))
    shapes = lambda m: {p.name: (tuple(p.shape), str(p.dtype)) for p in m.get_parameters()}  # noqa: E731
    assert shapes(cpu) == shapes(ascend)
    attn = ascend.model.layers[0].attention
    assert isinstance(attn, TeleChatAttention) and hasattr(attn, "flash_attention")
    assert not hasattr(cpu.model.layers[0].attention, "flash_attention")
    assert ascend.model.layers[0].attention_norm.self_define is False  # the fused RmsNorm kernel
    assert cpu.model.layers[0].attention_norm.self_define is True
