"""Tests of the torch TeleChat2 reference: NTK RoPE, layout, kv-cache rule, loading, loss and sampling."""
import json
import math
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from telechat_ms.reference.random_checkpoint import (  # noqa: E402
    random_state_dict, tiny_config, write_random_hf_checkpoint, write_state_dict)
from telechat_ms.reference.torch_model import (  # noqa: E402
    RefConfig, TeleChatRef, apply_repetition_penalty, apply_top_k, apply_top_p, ntk_params, ntk_rope,
    process_logits)

QK = 6.0  # query/key scale so attention is sharp and positions matter


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny fp32 safetensors checkpoint shared by the read-only tests."""
    return write_random_hf_checkpoint(str(tmp_path_factory.mktemp("ref")), tiny_config(), qk_scale=QK)


@pytest.fixture(scope="module")
def model(ckpt):
    return TeleChatRef.from_pretrained(ckpt)


def _ids(n, seed=1, vocab=256):
    return torch.randint(4, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ NTK RoPE
@pytest.mark.parametrize("length, alpha, base, mscale", [
    (100, 1, 10000.0, 1.0), (8192, 1, 10000.0, 1.0), (8193, 3, 30527.7, None), (16384, 3, 30527.7, 1.0693),
    (32768, 7, 72195.9, 1.1386), (65536, 15, None, None)])
def test_ntk_worked_values(length, alpha, base, mscale):
    a, b, m = ntk_params(length, 128, 8192, 8192)
    assert a == alpha
    if base is not None:
        assert b == pytest.approx(base, abs=0.1)
    if mscale is not None:
        assert m == pytest.approx(mscale, abs=1e-4)


def test_ntk_uses_base_seqlen_for_alpha_and_training_seqlen_for_mscale():
    # short input but training_seqlen 8192 over base 4096: alpha from L' = 8192 -> ctx 2 -> alpha 3, mscale 1
    assert ntk_params(10, 128, 8192, 4096) == (3, pytest.approx(10000 * 3 ** (128 / 126)), 1.0)


def test_ntk_rope_tables():
    _, base, m = ntk_params(16384, 128, 8192, 8192)
    cos, sin = ntk_rope(16384, 128, 8192, 8192, [0, 1, 5000])
    assert cos.shape == (3, 128) and cos.dtype == torch.float32
    assert torch.allclose(cos[0], torch.full((128,), m)) and torch.all(sin[0] == 0)
    i = torch.arange(64, dtype=torch.float64)
    ang = 5000 * base ** (-2 * i / 128)
    assert torch.allclose(cos[2, :64].double(), m * torch.cos(ang), atol=2e-3)
    assert torch.equal(cos[2, :64], cos[2, 64:]) and torch.allclose(sin[2, 64:].double(), m * torch.sin(ang),
                                                                     atol=2e-3)


def test_config_aliases_and_defaults():
    c = RefConfig.from_hf_dict(dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=None, ffn_hidden_size=96, vocab_size=10))
    assert (c.n_layer, c.n_head, c.num_key_value_heads, c.layer_norm_epsilon) == (3, 4, 4, 1e-5)
    assert (c.training_seqlen, c.base_seqlen, c.embed_layernorm, c.head_dim) == (8192, 8192, False, 16)
    with pytest.raises(ValueError, match="vocab_size"):
        RefConfig.from_hf_dict(dict(hidden_size=64, n_layer=1, n_head=4, ffn_hidden_size=8))


# ------------------------------------------------------------------ whole model vs explicit float64 maths
def _explicit_logits(cfg: dict, sd: dict, ids: list[int]) -> torch.Tensor:
    """The spec written out per head and per rotation pair in float64, as independent of the model as possible."""
    w = {k: v.double() for k, v in sd.items()}
    h_, nh, nk, eps = cfg["hidden_size"], cfg["n_head"], cfg["num_key_value_heads"], cfg["layer_norm_epsilon"]
    d, s = h_ // nh, len(ids)
    big = max(s, cfg["training_seqlen"])
    alpha = max(2 ** math.ceil(math.log2(big / cfg["base_seqlen"]) + 1) - 1, 1)
    base = 10000 * alpha ** (d / (d - 2))
    ms = 1.0 if big <= cfg["training_seqlen"] else 0.1 * math.log(big / cfg["training_seqlen"]) + 1

    def rms(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # x [S, d]; pair (i, i + d/2) rotated by angle p * base^(-2i/d), times mscale
        out = torch.empty_like(x)
        for p in range(s):
            for i in range(d // 2):
                a = p * base ** (-2 * i / d)
                out[p, i] = ms * (x[p, i] * math.cos(a) - x[p, i + d // 2] * math.sin(a))
                out[p, i + d // 2] = ms * (x[p, i + d // 2] * math.cos(a) + x[p, i] * math.sin(a))
        return out

    x = w["transformer.word_embeddings.weight"][ids]
    causal = torch.ones(s, s).tril().bool()
    for layer in range(cfg["n_layer"]):
        p = f"transformer.h.{layer}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = h @ w[p + "self_attention.query.weight"].T
        kv = h @ w[p + "self_attention.key_value.weight"].T
        heads = []
        for j in range(nh):
            g = j // (nh // nk)
            qj = rope(q[:, j * d:(j + 1) * d])
            kg = rope(kv[:, g * 2 * d:g * 2 * d + d])
            vg = kv[:, g * 2 * d + d:(g + 1) * 2 * d]
            sc = (qj @ kg.T / math.sqrt(d)).masked_fill(~causal, -math.inf)
            heads.append(torch.softmax(sc, -1) @ vg)
        x = x + torch.cat(heads, -1) @ w[p + "self_attention.dense.weight"].T + w[p + "self_attention.dense.bias"]
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        ff = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + ff @ w[p + "mlp.down_proj.weight"].T + w[p + "mlp.down_proj.bias"]
    return rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("seq_len, kv_heads", [(10, 2), (14, 1)])
def test_model_matches_explicit_float64_maths(tmp_path, seq_len, kv_heads):
    cfg = tiny_config(training_seqlen=8, base_seqlen=8, num_key_value_heads=kv_heads)  # 14 > 8: NTK + mscale
    write_random_hf_checkpoint(str(tmp_path), cfg, qk_scale=QK, seed=3)
    ids = _ids(seq_len, seed=seq_len)
    got = TeleChatRef.from_pretrained(str(tmp_path))(ids).logits[0].double()
    want = _explicit_logits(cfg, random_state_dict(cfg, seed=3, qk_scale=QK), ids[0].tolist())
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_key_value_layout_is_per_head_interleaved(tmp_path, model):
    ids = _ids(16)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    k, d, h = 2, 16, 64
    for name in [n for n in sd if n.endswith("key_value.weight")]:
        per_head = sd[name].view(k, 2 * d, h)          # [k_h0; v_h0; k_h1; v_h1] -> [k_h0; k_h1; v_h0; v_h1]
        sd[name] = torch.cat((per_head[:, :d].reshape(k * d, h), per_head[:, d:].reshape(k * d, h)))
    swapped = TeleChatRef(model.cfg)
    swapped.load_state_dict(sd)
    with torch.no_grad():
        diff = (swapped(ids).logits - model(ids).logits).abs().max()
    assert diff > 1e-2


# --------------------------------------------------------------------------------------- kv cache
@torch.no_grad()
def _incremental_logits(model, ids, prefill):
    logits, past = model.forward_step(ids[:, :prefill])
    steps = [logits[:, -1]]
    for t in range(prefill, ids.shape[1]):
        logits, past = model.forward_step(ids[:, t:t + 1], past, t)
        steps.append(logits[:, -1])
    return torch.stack(steps[:-1], 1), past          # predictions for positions prefill-1 .. S-2


def test_kv_cache_equals_full_forward_within_training_seqlen(model):
    ids = _ids(32)                                    # total length == training_seqlen
    inc, _ = _incremental_logits(model, ids, 5)
    with torch.no_grad():
        full = model(ids).logits[:, 4:-1]
    assert torch.allclose(inc, full, atol=1e-5)


@torch.no_grad()
def test_kv_cache_follows_released_rule_beyond_training_seqlen(model):
    ids = _ids(44)
    inc, past = _incremental_logits(model, ids, 30)
    full = model(ids).logits[:, 29:-1]
    assert torch.allclose(inc[:, 2], model(ids[:, :32]).logits[:, -1], atol=1e-5)  # total 32: still equal
    assert (inc[:, -1] - full[:, -1]).abs().max() > 1e-3  # deliberately not the same function
    _, prefill = model.forward_step(ids[:, :30])
    assert torch.equal(past[0][0][:, :, :30], prefill[0][0])  # cached keys keep their first rotation
    # the key of position 43 was rotated with the tables of total length 44 (alpha 3, mscale > 1)
    attn = model.transformer.h[0].self_attention
    hid = model.transformer.h[0].input_layernorm(model.transformer.word_embeddings(ids[:, 43:44]))
    raw_k = attn.key_value(hid).view(1, 1, 2, 32)[..., :16].transpose(1, 2)
    cos, sin = ntk_rope(44, 16, 32, 32, [43])
    rot = torch.cat((-raw_k[..., 8:], raw_k[..., :8]), -1)
    assert torch.allclose(past[0][0][:, :, 43:44], raw_k * cos + rot * sin, atol=1e-6)


@torch.no_grad()
def test_padding_mask_hides_pad_tokens(model):
    ids = torch.cat((torch.tensor([[3, 3, 3]]), _ids(8)), 1)
    other = ids.clone()
    other[0, :3] = torch.tensor([7, 99, 150])
    mask = torch.tensor([[0, 0, 0] + [1] * 8])
    a, b = model(ids, attention_mask=mask).logits, model(other, attention_mask=mask).logits
    assert torch.allclose(a[:, 3:], b[:, 3:], atol=1e-6)


# ----------------------------------------------------------------------------------- loss and loading
@torch.no_grad()
def test_loss_is_shifted_ce_ignoring_minus_100(model):
    ids = _ids(12)
    labels = ids.clone()
    labels[0, [0, 3, 4, 11]] = -100
    out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits[0].double(), -1)
    terms = [-logp[t - 1, labels[0, t]] for t in range(1, 12) if labels[0, t] != -100]
    assert len(terms) == 8
    assert out.loss.item() == pytest.approx(float(sum(terms) / len(terms)), abs=1e-5)


@pytest.mark.parametrize("fmt, shards", [("bin", 1), ("safetensors", 3), ("bin", 2)])
def test_formats_give_identical_logits(tmp_path, model, fmt, shards):
    write_random_hf_checkpoint(str(tmp_path), tiny_config(), fmt=fmt, num_shards=shards, qk_scale=QK)
    if shards > 1:
        stem = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
        index = json.load(open(tmp_path / f"{stem}.index.json"))
        assert len(set(index["weight_map"].values())) == shards
        assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in model.state_dict().values())
    ids = _ids(20)
    with torch.no_grad():
        assert torch.equal(TeleChatRef.from_pretrained(str(tmp_path))(ids).logits, model(ids).logits)


@torch.no_grad()
def test_bf16_checkpoint_loads(tmp_path, model):
    write_random_hf_checkpoint(str(tmp_path), tiny_config(), dtype="bfloat16", qk_scale=QK)
    ids = _ids(20)
    as_fp32 = TeleChatRef.from_pretrained(str(tmp_path))(ids).logits
    assert (as_fp32 - model(ids).logits).abs().max() < 0.05
    as_bf16 = TeleChatRef.from_pretrained(str(tmp_path), dtype=torch.bfloat16)(ids).logits
    assert as_bf16.dtype == torch.bfloat16 and (as_bf16.float() - as_fp32).abs().max() < 0.1


@pytest.mark.parametrize("change, words", [
    ("missing", ["lm_head.weight", "lacks"]), ("unexpected", ["extra.bias", "model.safetensors"]),
    ("shape", ["transformer.ln_f.weight", "model.safetensors", "(63,)"])])
def test_strict_loading(tmp_path, change, words):
    cfg = tiny_config()
    write_random_hf_checkpoint(str(tmp_path), cfg)
    sd = random_state_dict(cfg)
    if change == "missing":
        del sd["lm_head.weight"]
    elif change == "unexpected":
        sd["extra.bias"] = torch.zeros(3)
    else:
        sd["transformer.ln_f.weight"] = torch.ones(63)
    os.remove(tmp_path / "model.safetensors")
    write_state_dict(str(tmp_path), sd)
    with pytest.raises(ValueError) as err:
        TeleChatRef.from_pretrained(str(tmp_path))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_embed_layernorm_and_mha(tmp_path):
    write_random_hf_checkpoint(str(tmp_path), tiny_config(embed_layernorm=True, num_key_value_heads=None))
    m = TeleChatRef.from_pretrained(str(tmp_path))
    assert m.cfg.num_key_value_heads == 4 and m.transformer.word_embeddings_layernorm.weight.shape == (64,)
    assert json.load(open(tmp_path / "config.json"))["embed_layernorm"] is True


# ------------------------------------------------------------------------------------ generation
def test_logits_processors_hand_computed():
    x = torch.tensor([[2.0, -1.0, 0.5, 0.0, 1.0]])
    pen = apply_repetition_penalty(x, torch.tensor([[0, 1, 1, 3]]), 2.0)
    assert pen.tolist() == [[1.0, -2.0, 0.5, 0.0, 1.0]]
    inf = float("-inf")
    assert apply_top_k(torch.tensor([[1.0, 3.0, 2.0, 0.5]]), 2).tolist() == [[inf, 3.0, 2.0, inf]]
    assert apply_top_k(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 1).tolist() == [[inf, 2.0, 2.0, inf]]
    lp = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))
    kept = {p: torch.isfinite(apply_top_p(lp, p))[0].tolist() for p in (0.0, 0.01, 0.4, 0.7, 0.85, 0.99)}
    assert kept[0.0] == kept[0.01] == kept[0.4] == [False, True, False, False]
    assert kept[0.7] == [False, True, False, True] and kept[0.85] == [True, True, False, True]
    assert kept[0.99] == [True] * 4
    y = torch.tensor([[2.0, 4.0, 1.0]])
    assert process_logits(y, torch.tensor([[1]]), False, 0.3, 1, 0.1, 1.0).tolist() == y.tolist()
    sampled = process_logits(y, torch.tensor([[1]]), True, 2.0, 2, 1.0, 2.0)
    assert sampled.tolist() == [[1.0, 1.0, inf]]


@torch.no_grad()
def test_greedy_generate_matches_full_forward_argmax(model):
    ids = _ids(8)
    out = model.generate(ids, 10, eos_token_id=None, return_step_logits=True, repetition_penalty=1.03)
    seq = ids
    for step in range(10):
        logits = model(seq).logits[:, -1]
        assert torch.allclose(out.step_logits[step], logits, atol=1e-5)
        nxt = process_logits(logits, seq, repetition_penalty=1.03).argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), 1)
    assert torch.equal(out.sequences, seq)


@torch.no_grad()
def test_generate_stops_at_eos_and_sampling_is_seeded(model):
    ids = _ids(6)
    greedy = model.generate(ids, 3, eos_token_id=None).sequences
    first = int(greedy[0, 6])
    stopped = model.generate(ids, 5, eos_token_id=first).sequences
    assert stopped.shape == (1, 7) and int(stopped[0, -1]) == first
    kw = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, eos_token_id=None)
    a = model.generate(ids, 8, seed=7, **kw).sequences
    assert torch.equal(a, model.generate(ids, 8, seed=7, **kw).sequences)
    assert not torch.equal(a, model.generate(ids, 8, seed=8, **kw).sequences)
