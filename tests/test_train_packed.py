"""Packed, isolated rows in training: one step on packs equals one step on the same records one per row (CPU path),
and the Ascend flash-attention path gets the samples' boundaries (TND actual_seq_len) that describe the same mask."""
from __future__ import annotations

import numpy as np
import pytest

from telechat_ms.positions import (BATCHED, SHARED, VARLEN, actual_seq_lengths, compressed_causal_mask, packed_mask,
                                   training_inputs, varlen_mask)

SEQ = 256


@pytest.fixture(scope="module")
def packed_data(demo_data, tmp_path_factory):
    """The demo SFT mix through process-data with --no-cross-attention at 256 tokens, and a random checkpoint."""
    from telechat_ms.data.process import ProcessOptions, process_data
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    from tests.data_fixtures import DEMO
    tmp = tmp_path_factory.mktemp("packed")
    process_data(ProcessOptions(data_mix=str(DEMO / "demo_mix.json"), tokenizer=demo_data["tokenizer"],
                                out=str(tmp / "data"), max_seq_len=SEQ, cross_attention=False, num_workers=1,
                                progress=False))
    ckpt = str(tmp / "ckpt")
    write_random_hf_checkpoint(ckpt, tiny_config(vocab_size=demo_data["vocab_size"]), seed=11, qk_scale=4.0)
    return str(tmp / "data"), ckpt


def _unpack(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every sample of the packed rows alone in its own row, right-padded (no position_ids: plain causal rows)."""
    ids, labels = [], []
    for row_ids, row_labels, row_pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        starts = np.flatnonzero(row_pos == 0)
        for a, b in zip(starts, np.append(starts[1:], SEQ)):
            if (row_ids[a:b] == 3).all():
                continue  # the pads' own segment
            ids.append(np.concatenate([row_ids[a:b], np.full(SEQ - (b - a), 3)]))
            labels.append(np.concatenate([row_labels[a:b], np.full(SEQ - (b - a), -100)]))
    return {"input_ids": np.stack(ids).astype(np.int32), "labels": np.stack(labels).astype(np.int32)}


def _loss_and_grads(model, params, batch, layout):
    """The trainer's per-step math: sum(nll) and its gradients, over the global number of targets."""
    import mindspore as ms
    from telechat_ms.train.step import LossAndGrads, LossSum
    from telechat_ms.train.trainer import PositionCache
    cos, sin, mask = PositionCache(model.config, layout)(batch)
    loss, grads = LossAndGrads(LossSum(model), params)(ms.Tensor(batch["input_ids"]), ms.Tensor(batch["labels"]),
                                                       cos, sin, mask, ms.Tensor(np.float32(1.0)))
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    return float(loss.asnumpy()) / tokens, [g.asnumpy() / tokens for g in grads], tokens


def test_one_step_on_isolated_packs_equals_one_step_unpacked(packed_data):
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.train.loader import BatchLoader
    data, ckpt = packed_data
    loader = BatchLoader(data, batch_size=4, seed=5)
    assert loader.seq_length == SEQ and loader.column_names == ["input_ids", "labels", "position_ids"]
    packed = loader.next_global_batch()[0][0]
    unpacked = _unpack(packed)
    assert unpacked["input_ids"].shape[0] > 2 * packed["input_ids"].shape[0]  # several records per packed row
    model = TeleChatForCausalLM.from_pretrained(ckpt)
    params = list(model.trainable_params())
    loss_p, grads_p, tokens_p = _loss_and_grads(model, params, packed, BATCHED)
    loss_u, grads_u, tokens_u = _loss_and_grads(model, params, unpacked, SHARED)
    assert tokens_p == tokens_u > 0
    assert abs(loss_p - loss_u) <= 1e-6, (loss_p, loss_u)
    for p, gp, gu in zip(params, grads_p, grads_u):
        scale = float(np.abs(gu).max())
        assert scale > 0, p.name
        np.testing.assert_allclose(gp, gu, rtol=1e-5, atol=1e-5 * scale, err_msg=p.name)
    # negative control: the same rows without the per-sample masks and positions are a different computation
    plain = {k: v for k, v in packed.items() if k != "position_ids"}
    loss_x, grads_x, _ = _loss_and_grads(model, params, plain, SHARED)
    assert abs(loss_x - loss_u) > 1e-5  # 10x the tolerance above
    assert max(np.abs(gx - gu).max() / np.abs(gu).max() for gx, gu in zip(grads_x, grads_u)) > 1e-2


def test_trainer_runs_on_packed_compact_rows(packed_data, tmp_path, pynative_after, demo_data):
    from telechat_ms.job_config import job_from_dict
    from telechat_ms.train.trainer import train
    from tests.train_helpers import tiny_job
    data, _ = packed_data
    job = job_from_dict(tiny_job(data, str(tmp_path / "run"), demo_data["vocab_size"],
                                 runner_config={"batch_size": 2, "max_steps": 3}))
    result = train(job)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))


def test_input_layout_for_packed_rows():
    from telechat_ms.train.trainer import input_layout
    assert input_layout(False) == SHARED and input_layout(False, flash_attention=True) == SHARED
    assert input_layout(True) == BATCHED
    assert input_layout(True, flash_attention=True) == VARLEN
    assert input_layout(True, flash_attention=True, sharded=True) == BATCHED  # strategies split explicit masks


def test_actual_seq_len_describes_the_packed_mask():
    pos = np.array([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0],
                    [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    lens = actual_seq_lengths(pos, max_segments=5)
    assert lens.tolist() == [3, 5, 9, 10, 10, 16, 20, 20, 20, 20]  # cumulative over the flattened batch, padded
    assert np.array_equal(varlen_mask(lens, 2, 10), packed_mask(pos))
    assert actual_seq_lengths(pos).shape == (8,)  # without a fixed K: the batch's most samples, to a power of 2
    with pytest.raises(ValueError, match="more than the 2 entries"):
        actual_seq_lengths(pos, max_segments=2)
    cm = compressed_causal_mask()
    assert cm.shape == (2048, 2048) and cm[0, 1] == 1 and cm[1, 0] == 0 and cm.trace() == 0


class _KernelStandIn:
    """Records what the TND flash-attention kernel would get and computes it on CPU from actual_seq_len alone."""

    def __init__(self, n_head: int, scale: float):
        import mindspore as ms
        from mindspore import nn

        calls = self.calls = []

        class Cell(nn.Cell):
            def construct(self, query, key, value, attn_mask=None, alibi_mask=None, prefix=None, padding_mask=None,
                          actual_seq_qlen=None, actual_seq_kvlen=None):
                q, k, v = query.asnumpy(), key.asnumpy(), value.asnumpy()
                lens = actual_seq_qlen.asnumpy()
                calls.append({"q": q.shape, "k": k.shape, "mask": attn_mask.shape, "lens": lens,
                              "kvlens": actual_seq_kvlen.asnumpy()})
                ends = np.unique(lens)
                seg = np.searchsorted(ends, np.arange(q.shape[0]), side="right")
                allowed = (seg[:, None] == seg[None, :]) & np.tril(np.ones((q.shape[0],) * 2, dtype=bool))
                rep = n_head // k.shape[1]
                kk, vv = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
                scores = np.einsum("tnd,snd->nts", q, kk) * scale
                scores = np.where(allowed[None], scores, -np.inf)
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                return ms.Tensor(np.einsum("nts,snd->tnd", probs, vv).astype(q.dtype))

        self.cell = Cell()


def test_flash_attention_path_gets_the_sample_boundaries(tiny_gqa_ckpt):
    """use_flash_attention builds the TND kernel for packed rows (sparse_mode 3, next_tokens 0, compressed mask);
    on CPU a stand-in for the kernel, fed exactly its arguments, reproduces the CPU path's logits."""
    import mindspore as ms
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.train.trainer import PositionCache
    cpu = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)
    flash = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt, use_flash_attention=True)
    attn = flash.model.layers[0].attention
    fa = attn.flash_attention_varlen
    assert (fa.input_layout, fa.sparse_mode, fa.use_actual_seqlen) == ("TND", 3, True)
    prim = fa.flash_attention  # the FlashAttentionScore primitive itself
    assert (prim.next_tokens, prim.sparse_mode, prim.head_num) == (0, 3, cpu.config.n_head)
    assert np.array_equal(attn.compressed_mask.asnumpy(), compressed_causal_mask())
    rng = np.random.default_rng(3)
    seq, cfg = 24, cpu.config
    pos = np.array([np.concatenate([np.arange(7), np.arange(9), np.arange(8)]),
                    np.concatenate([np.arange(13), np.arange(11)])], dtype=np.int32)
    batch = {"input_ids": rng.integers(4, 200, size=(2, seq)).astype(np.int32), "position_ids": pos}
    cos, sin, lens = PositionCache(cfg, VARLEN, max_segments=4)(batch)
    assert tuple(cos.shape) == (2, 1, seq, cfg.head_dim) and lens.asnumpy().tolist() == [7, 16, 24, 24,
                                                                                         37, 48, 48, 48]
    stand_in = _KernelStandIn(cfg.n_head, 1.0 / np.sqrt(cfg.head_dim))
    for layer in flash.model.layers:
        layer.attention.flash_attention_varlen = stand_in.cell
    got = flash.lm_head(flash.model(ms.Tensor(batch["input_ids"]), cos, sin, lens)).asnumpy()
    call = stand_in.calls[0]
    assert call["q"] == (2 * seq, cfg.n_head, cfg.head_dim) and call["k"] == (2 * seq, cfg.num_key_value_heads,
                                                                            cfg.head_dim)
    assert call["mask"] == (2048, 2048) and np.array_equal(call["lens"], call["kvlens"])
    assert len(stand_in.calls) == cfg.n_layer
    want_inputs = training_inputs(cfg, seq, 2, pos, BATCHED)
    want = cpu.lm_head(cpu.model(ms.Tensor(batch["input_ids"]), *map(ms.Tensor, want_inputs))).asnumpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
