"""kv-cache generation in MindSpore against the torch reference, the full forward, and itself (batch, seeds)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ms = pytest.importorskip("mindspore")

from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402
from telechat_ms.reference.torch_model import TeleChatRef  # noqa: E402

T = 32          # training_seqlen of the tiny checkpoints
NEW = 32        # new tokens per generation
NO_STOP = dict(eos_token_id=None)


@pytest.fixture(scope="module")
def sharp_ckpt(ckpt_factory) -> str:
    """GQA 4/2 heads, training_seqlen 32, q/k weights x8: attention is sharp enough that RoPE mistakes show."""
    return ckpt_factory("infer_qk8", qk_scale=8.0, seed=1)


@pytest.fixture(scope="module")
def models(sharp_ckpt):
    return TeleChatForCausalLM.from_pretrained(sharp_ckpt), TeleChatRef.from_pretrained(sharp_ckpt)


def _prompt(n: int, seed: int, vocab: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(9, vocab, size=(1, n))


def _ref_generate(ref, ids, n=NEW, **kw):
    out = ref.generate(torch.from_numpy(ids), n, eos_token_id=None, return_step_logits=True, **kw)
    return out.sequences[0].tolist(), [s.numpy() for s in out.step_logits]


@pytest.mark.parametrize("prompt_len", [6, 20, 40])  # ends at 38 (crosses T), 52 (crosses T), 72 (crosses 2T)
def test_greedy_matches_torch_reference_token_for_token(models, prompt_len):
    model, ref = models
    ids = _prompt(prompt_len, prompt_len)
    out = model.generate(ids, max_new_tokens=NEW, return_step_logits=True, **NO_STOP)
    ref_seq, ref_logits = _ref_generate(ref, ids)
    assert out.sequences[0] == ref_seq
    assert len(out.new_tokens[0]) == NEW and out.finish_reasons == ["length"]
    for step, (a, b) in enumerate(zip(out.step_logits, ref_logits)):
        assert np.abs(a - b).max() <= 1e-4, (prompt_len, step)


def test_cached_logits_equal_full_forward_within_training_seqlen(models):
    model, _ = models
    ids = _prompt(6, 1)
    out = model.generate(ids, max_new_tokens=T - 6, return_step_logits=True, **NO_STOP)
    seq = np.array(out.sequences[0])
    assert len(seq) == T
    full = model(ms.Tensor(seq[None].astype(np.int32))).asnumpy()[0]
    for step, logits in enumerate(out.step_logits):
        assert np.abs(logits[0] - full[5 + step]).max() <= 1e-4, step


def test_beyond_training_seqlen_cached_is_not_the_full_forward(models):
    """The released incremental rule is deliberately a different function past T (spec section 1)."""
    model, _ = models
    out = model.generate(_prompt(40, 40), max_new_tokens=8, return_step_logits=True, **NO_STOP)
    seq = np.array(out.sequences[0])
    full = model(ms.Tensor(seq[None].astype(np.int32))).asnumpy()[0]
    assert np.abs(out.step_logits[-1][0] - full[len(seq) - 2]).max() > 1e-3


@pytest.mark.parametrize("mutation", ["full_length_tables", "position_off_by_one"])
def test_a_rope_mistake_changes_the_tokens(models, monkeypatch, mutation):
    """The weights make positions matter: plausible RoPE mistakes in the cached path change greedy tokens."""
    from telechat_ms import positions
    model, ref = models
    ids = _prompt(40, 40)
    ref_seq, _ = _ref_generate(ref, ids)
    real = positions.rope_tables

    def wrong(positions, total_len, *args):
        if mutation == "full_length_tables":  # NTK tables of the final length instead of the current one
            return real(positions, 40 + NEW, *args)
        return real(np.asarray(positions) + 1, total_len, *args)

    monkeypatch.setattr(positions, "rope_tables", wrong)
    out = model.generate(ids, max_new_tokens=NEW, use_jit=True, **NO_STOP)
    assert out.sequences[0] != ref_seq


def test_batch_of_different_lengths_equals_one_by_one(models):
    model, _ = models
    prompts = [_prompt(n, 100 + n)[0].tolist() for n in (5, 17, 30)]
    batch = model.generate(prompts, max_new_tokens=24, **NO_STOP)
    for row, prompt in enumerate(prompts):
        single = model.generate([prompt], max_new_tokens=24, **NO_STOP)
        assert batch.new_tokens[row] == single.new_tokens[0], row


def test_attention_mask_left_padding_is_removed(models):
    model, _ = models
    a, b = _prompt(4, 7)[0].tolist(), _prompt(9, 8)[0].tolist()
    ids = np.array([[3] * 5 + a, b])
    mask = np.array([[0] * 5 + [1] * 4, [1] * 9])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, **NO_STOP)
    assert out.new_tokens == [model.generate([a], max_new_tokens=5, **NO_STOP).new_tokens[0],
                              model.generate([b], max_new_tokens=5, **NO_STOP).new_tokens[0]]


def test_sampling_is_seeded_and_top_k_1_is_greedy(models):
    model, _ = models
    ids = _prompt(10, 3)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, **NO_STOP)
    first = model.generate(ids, seed=11, **kw).sequences
    assert model.generate(ids, seed=11, **kw).sequences == first
    assert any(model.generate(ids, seed=s, **kw).sequences != first for s in (12, 13, 14))
    greedy = model.generate(ids, max_new_tokens=12, **NO_STOP).sequences
    assert model.generate(ids, seed=5, **{**kw, "top_k": 1}).sequences == greedy


def test_repetition_penalty_matches_torch_reference(models):
    model, ref = models
    ids = _prompt(12, 4)
    out = model.generate(ids, max_new_tokens=16, repetition_penalty=1.5, **NO_STOP)
    ref_seq, _ = _ref_generate(ref, ids, 16, repetition_penalty=1.5)
    assert out.sequences[0] == ref_seq
    assert out.sequences[0] != model.generate(ids, max_new_tokens=16, **NO_STOP).sequences[0]


def test_stops_at_eos_and_extra_stop_ids(models):
    model, _ = models
    ids = _prompt(8, 5)
    free = model.generate(ids, max_new_tokens=10, **NO_STOP).new_tokens[0]
    stop = free[4]
    first = free.index(stop)
    for kw in (dict(eos_token_id=stop), dict(eos_token_id=None, stop_token_ids=[stop])):
        out = model.generate(ids, max_new_tokens=10, **kw)
        assert out.new_tokens[0] == free[:first] and out.finish_reasons == ["stop"]
        assert out.sequences[0][-1] == stop


def test_pynative_and_graph_mode_agree(models):
    model, _ = models
    ids = _prompt(9, 6)
    a = model.generate(ids, max_new_tokens=4, use_jit=False, return_step_logits=True, **NO_STOP)
    b = model.generate(ids, max_new_tokens=4, use_jit=True, return_step_logits=True, **NO_STOP)
    assert a.sequences == b.sequences
    assert max(np.abs(x - y).max() for x, y in zip(a.step_logits, b.step_logits)) <= 1e-5


def test_generation_config_json_gives_the_defaults(tiny_gqa_ckpt, tmp_path):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_gqa_ckpt, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "eos_token_id": 2}))
    model = TeleChatForCausalLM.from_pretrained(str(ckpt))
    out = model.generate(_prompt(5, 9), eos_token_id=None, use_jit=False)
    assert len(out.new_tokens[0]) == 3
    assert len(model.generate(_prompt(5, 9), max_new_tokens=5, eos_token_id=None,
                              use_jit=False).new_tokens[0]) == 5


def test_inference_leaves_parameters_and_training_forward_alone(models, sharp_ckpt):
    model, _ = models
    names = [n for n, _ in model.parameters_and_names()]
    model.generate(_prompt(5, 10), max_new_tokens=2)
    assert [n for n, _ in model.parameters_and_names()] == names
    assert all(not n.startswith("kv_cache") for n in names)
    fresh = TeleChatForCausalLM.from_pretrained(sharp_ckpt)
    ids = ms.Tensor(_prompt(12, 11).astype(np.int32))
    assert np.abs(model(ids).asnumpy() - fresh(ids).asnumpy()).max() == 0.0
    assert os.path.basename(model.name_or_path) == os.path.basename(sharp_ckpt)


def test_generate_parity_report(sharp_ckpt):
    from telechat_ms.reference.parity import run_generate_parity
    result = run_generate_parity(sharp_ckpt, new_tokens=8, prompt_len=30, batch_size=2, use_jit=False)
    assert result["ok"] and result["tokens_equal"] and result["total_len"] > result["training_seqlen"], result
