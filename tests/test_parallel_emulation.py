"""Emulation in one process (numpy, float64): cut the weights into the shards the declared strategies imply,
compute every rank's attention and MLP separately, combine the partial results as the collectives would
(all-reduce = sum, all-gather = concat, reduce-scatter = sum then split), and compare with the unsharded layer.
The same for the sequence split of context parallel: ring attention over sequence chunks with the global
NTK + mscale rope rows, and Ulysses' head all-to-all."""
from __future__ import annotations

import numpy as np
import pytest

from telechat_ms.config import TeleChatConfig
from telechat_ms.positions import rope_tables
from telechat_ms.parallel.layout import ParallelDims, check_layout
from telechat_ms.parallel.strategies import layer_strategies

EPS = 1e-6


# ---------------------------------------------------------------- the unsharded layer (spec section 1)
def rms(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def attend(q, k, v, q_pos, k_pos):
    """softmax(q k^T / sqrt(d) + causal) v; q [B, n, Sq, d], k/v [B, n, Sk, d] (already repeated)."""
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    scores = np.where(k_pos[None, :] > q_pos[:, None], -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def silu(x):
    return x / (1 + np.exp(-x))


def attention_heads(h, wq, wkv, n_heads, n_kv, d, cos, sin):
    """q, k, v [B, heads, S, d] for the heads these (possibly sharded) weights produce; kv rows [k_h; v_h]."""
    b, s, _ = h.shape
    q = (h @ wq.T).reshape(b, s, n_heads, d).transpose(0, 2, 1, 3)
    kv = (h @ wkv.T).reshape(b, s, n_kv, 2 * d)
    k, v = kv[..., :d].transpose(0, 2, 1, 3), kv[..., d:].transpose(0, 2, 1, 3)
    return rope(q, cos, sin), rope(k, cos, sin), v


def layer(x, w, cfg, cos, sin):
    n, k, d = cfg.n_head, cfg.num_key_value_heads, cfg.head_dim
    pos = np.arange(x.shape[1])
    q, kk, v = attention_heads(rms(x, w["ln1"]), w["wq"], w["wkv"], n, k, d, cos, sin)
    o = attend(q, np.repeat(kk, n // k, axis=1), np.repeat(v, n // k, axis=1), pos, pos)
    x = x + o.transpose(0, 2, 1, 3).reshape(x.shape) @ w["wo"].T + w["bo"]
    h = rms(x, w["ln2"])
    return x + (silu(h @ w["w1"].T) * (h @ w["w3"].T)) @ w["w2"].T + w["b2"]


def weights(cfg, rng):
    h, f, kd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_key_value_heads * cfg.head_dim
    r = lambda *shape: rng.standard_normal(shape) / np.sqrt(shape[-1])   # noqa: E731
    return {"wq": r(h, h), "wkv": r(2 * kd, h), "wo": r(h, h), "bo": r(h), "w1": r(f, h), "w3": r(f, h),
            "w2": r(h, f), "b2": r(h), "ln1": 1 + 0.1 * r(h), "ln2": 1 + 0.1 * r(h)}


# ---------------------------------------------------------------- the sharded emulation
def block(a: np.ndarray, split: tuple, index: tuple) -> np.ndarray:
    """The block of `a` at `index` when dimension i is cut into split[i] equal parts (a shard strategy)."""
    sl = []
    for n, parts, i in zip(a.shape, split, index):
        assert n % parts == 0, f"dimension {n} not divisible by {parts}"
        sl.append(slice(i * n // parts, (i + 1) * n // parts))
    return a[tuple(sl)]


def sharded_layer(x, w, cfg, dims, cos, sin):
    """One layer computed rank by rank from the declared strategies (dp = cp = 1), sequence parallel if dims.sp."""
    st = layer_strategies(cfg, dims)
    mp, d = dims.mp, cfg.head_dim
    n_local, k_local = cfg.n_head // mp, cfg.num_key_value_heads // mp
    wq_split = st["attention.wq.matmul"].inputs[1]
    wkv_split = st["attention.wk_v.matmul"].inputs[1]
    wo_split = st["attention.wo.matmul"].inputs[1]
    w1_split, w3_split = st["feed_forward.w1.matmul"].inputs[1], st["feed_forward.w3.matmul"].inputs[1]
    w2_split = st["feed_forward.w2.matmul"].inputs[1]
    assert wq_split == wkv_split == w1_split == w3_split == (mp, 1) and wo_split == w2_split == (1, mp)
    seq_split = st["add_attn"].inputs[0][1]                 # residual stream: split along the sequence with sp
    pos = np.arange(x.shape[1])
    # the residual stream lives in sequence chunks; norms run on the chunk, then all-gather (concat)
    chunks = [block(x, (1, seq_split, 1), (0, r, 0)) for r in range(seq_split)]
    h = np.concatenate([rms(c, w["ln1"]) for c in chunks], axis=1)
    partials = []
    for r in range(mp):
        q, k, v = attention_heads(h, block(w["wq"], wq_split, (r, 0)), block(w["wkv"], wkv_split, (r, 0)),
                                  n_local, k_local, d, cos, sin)
        rep = cfg.n_rep
        o = attend(q, np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1), pos, pos)   # local kv repeat
        o = o.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], n_local * d)
        partials.append(o @ block(w["wo"], wo_split, (0, r)).T)
    attn = sum(partials)                                      # all-reduce, or reduce-scatter below
    chunks = [c + block(attn, (1, seq_split, 1), (0, i, 0)) + w["bo"] for i, c in enumerate(chunks)]
    h = np.concatenate([rms(c, w["ln2"]) for c in chunks], axis=1)
    partials = []
    for r in range(mp):
        g = silu(h @ block(w["w1"], w1_split, (r, 0)).T) * (h @ block(w["w3"], w3_split, (r, 0)).T)
        partials.append(g @ block(w["w2"], w2_split, (0, r)).T)
    mlp = sum(partials)
    chunks = [c + block(mlp, (1, seq_split, 1), (0, i, 0)) + w["b2"] for i, c in enumerate(chunks)]
    return np.concatenate(chunks, axis=1)


CASES = [  # (n_head, kv heads, mp)
    (8, 8, 2), (8, 8, 4), (8, 8, 8),        # MHA, including 8 heads / 8 kv heads with mp 8
    (64, 8, 2), (64, 8, 4), (64, 8, 8),     # the 115B GQA ratio, including mp 8 (one kv head per rank)
    (8, 2, 2),                              # GQA, 4 query heads per kv head
]


@pytest.mark.parametrize("sp", [False, True], ids=["allreduce", "seq_parallel"])
@pytest.mark.parametrize("n_head,n_kv,mp", CASES)
def test_mp_shards_recombine_to_the_unsharded_layer(n_head, n_kv, mp, sp):
    d = 4
    cfg = TeleChatConfig(hidden_size=n_head * d, n_head=n_head, num_key_value_heads=n_kv, ffn_hidden_size=96,
                         n_layer=1, vocab_size=64, training_seqlen=8, base_seqlen=8, seq_length=16)
    dims = ParallelDims(mp=mp, sp=sp)
    assert not [i for i in check_layout(cfg, dims, 16) if i.level == "error"]
    rng = np.random.default_rng(n_head * 100 + n_kv * 10 + mp)
    w = weights(cfg, rng)
    x = rng.standard_normal((2, 16, cfg.hidden_size))
    cos, sin = (t.astype(np.float64) for t in rope_tables(16, 16, d, cfg.training_seqlen, cfg.base_seqlen))
    want = layer(x, w, cfg, cos, sin)
    got = sharded_layer(x, w, cfg, dims, cos, sin)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_fused_key_value_must_be_split_by_whole_interleaved_heads():
    """Negative control (the emulation has teeth): the same mp=2 split of a key_value weight whose rows are in
    [all K; all V] order (the layout the spec warns about) does not reproduce the layer."""
    d, n, k, mp = 4, 8, 4, 2
    cfg = TeleChatConfig(hidden_size=n * d, n_head=n, num_key_value_heads=k, ffn_hidden_size=32, n_layer=1,
                         vocab_size=64, training_seqlen=8, base_seqlen=8, seq_length=8)
    rng = np.random.default_rng(7)
    w = weights(cfg, rng)
    x = rng.standard_normal((1, 8, cfg.hidden_size))
    cos, sin = (t.astype(np.float64) for t in rope_tables(8, 8, d, 8, 8))
    want = layer(x, w, cfg, cos, sin)
    # the rows re-ordered to [k_0..k_{K-1}; v_0..v_{K-1}]
    kd = k * d
    wrong = w["wkv"].reshape(k, 2, d, -1).transpose(1, 0, 2, 3).reshape(2 * kd, -1)
    bad = sharded_layer(x, dict(w, wkv=wrong), cfg, ParallelDims(mp=mp), cos, sin)
    assert np.abs(bad - want).max() > 1e-2


def test_mp_that_would_split_a_kv_head_is_rejected():
    cfg = TeleChatConfig.preset("115b")
    errors = [i for i in check_layout(cfg, ParallelDims(mp=16), 8192) if i.level == "error"]
    assert any("num_key_value_heads 8 is not divisible" in i.message and "fused key_value" in i.message
               for i in errors)
    assert not [i for i in check_layout(cfg, ParallelDims(mp=8), 8192) if i.level == "error"]


# ---------------------------------------------------------------- context parallel
def ring_attention(q, k, v, cr):
    """Each query chunk visits the kv chunks around the ring (its own first), merging with an online softmax."""
    s = q.shape[2]
    c = s // cr
    outs = []
    for i in range(cr):
        qi = q[:, :, i * c:(i + 1) * c]
        m = np.full(qi.shape[:-1] + (1,), -np.inf)
        l = np.zeros_like(m)
        acc = np.zeros_like(qi)
        for step in range(cr):
            j = (i - step) % cr                          # kv chunk that reaches rank i at this ring step
            if j > i:
                continue                                 # entirely in the causal future
            kj, vj = k[:, :, j * c:(j + 1) * c], v[:, :, j * c:(j + 1) * c]
            sc = qi @ np.swapaxes(kj, -1, -2) / np.sqrt(q.shape[-1])
            if j == i:
                sc = np.where(np.arange(c)[None, :] > np.arange(c)[:, None], -np.inf, sc)
            m_new = np.maximum(m, sc.max(-1, keepdims=True))
            scale = np.exp(m - m_new)
            p = np.exp(sc - m_new)
            l = l * scale + p.sum(-1, keepdims=True)
            acc = acc * scale + p @ vj
            m = m_new
        outs.append(acc / l)
    return np.concatenate(outs, axis=2)


def _cp_inputs(seed=3, b=2, n=4, s=64, d=8):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, n, s, d)) for _ in range(3))
    # tables for the full length: L = 64 > training_seqlen 16 -> NTK alpha 7 and mscale 1 + 0.1 ln 4
    cos, sin = (t.astype(np.float64) for t in rope_tables(s, s, d, 16, 16))
    return q, k, v, cos, sin


def test_ring_attention_over_chunks_with_global_rope_rows_equals_full_attention():
    q, k, v, cos, sin = _cp_inputs()
    s = q.shape[2]
    pos = np.arange(s)
    want = attend(rope(q, cos, sin), rope(k, cos, sin), v, pos, pos)
    cfg = TeleChatConfig(hidden_size=32, n_head=4, num_key_value_heads=4, ffn_hidden_size=32, n_layer=1,
                         vocab_size=64, use_flash_attention=True)
    dims = ParallelDims(cp=4)
    st = layer_strategies(cfg, dims, batched_inputs=False)
    table_split = st["attention.rotary.mul_cos"].inputs[1]      # (cr, 1): rows of the global table per chunk
    act_split = st["attention.rotary.mul_cos"].inputs[0]        # (dp, heads, cr, 1)
    cr = table_split[0]
    assert cr == 4 and act_split[2] == cr
    assert st["attention.flash_attention.flash_attention"].inputs[1][2] == cr   # kv chunks travel the ring
    qr = np.concatenate([rope(block(q, act_split, (0, 0, i, 0)), block(cos, table_split, (i, 0)),
                              block(sin, table_split, (i, 0))) for i in range(cr)], axis=2)
    kr = np.concatenate([rope(block(k, act_split, (0, 0, i, 0)), block(cos, table_split, (i, 0)),
                              block(sin, table_split, (i, 0))) for i in range(cr)], axis=2)
    np.testing.assert_allclose(ring_attention(qr, kr, v, cr), want, atol=1e-5, rtol=0)
    # negative control: each chunk rotated by LOCAL positions 0..15 gives a different function
    local = lambda x: np.concatenate([rope(block(x, act_split, (0, 0, i, 0)), cos[:16], sin[:16])  # noqa: E731
                                      for i in range(cr)], axis=2)
    assert np.abs(ring_attention(local(q), local(k), v, cr) - want).max() > 1e-3


def test_ulysses_all_to_all_equals_full_attention():
    q, k, v, cos, sin = _cp_inputs(seed=5)
    b, n, s, d = q.shape
    pos = np.arange(s)
    qr, kr = rope(q, cos, sin), rope(k, cos, sin)
    want = attend(qr, kr, v, pos, pos)
    cp = 4
    cfg = TeleChatConfig(hidden_size=n * d, n_head=n, num_key_value_heads=n, ffn_hidden_size=32, n_layer=1,
                         vocab_size=64, use_flash_attention=True)
    st = layer_strategies(cfg, ParallelDims(cp=cp, cp_ulysses=cp))
    inner = st["attention.flash_attention.flash_attention"].inputs[0]
    assert inner == (1, cp, 1, 1)                     # heads split by the Ulysses degree, full sequence
    # before: rank r holds sequence chunk r of every head; all-to-all: rank r gets heads block r, all positions
    seq_chunks = [[block(t, (1, 1, cp, 1), (0, 0, r, 0)) for r in range(cp)] for t in (qr, kr, v)]
    outs = []
    for r in range(cp):
        qh, kh, vh = (np.concatenate([block(c, (1, cp, 1, 1), (0, r, 0, 0)) for c in chunks], axis=2)
                      for chunks in seq_chunks)
        outs.append(attend(qh, kh, vh, pos, pos))
    out = np.concatenate(outs, axis=1)               # all-to-all back: heads re-joined
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
