"""Host-side inference pieces without MindSpore: sampling processors, generation config, streaming detokenizer."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from telechat_ms.errors import ConfigError
from telechat_ms.infer.gen_config import GenerationConfig
from telechat_ms.infer.sampling import (apply_repetition_penalty, apply_top_k, apply_top_p, process_logits,
                                        select_tokens)
from telechat_ms.infer.streaming import TextStreamer

NEG_INF = -np.inf


def test_repetition_penalty_hand_case():
    logits = np.array([[2.0, -1.0, 0.5, 3.0]], np.float32)
    out = apply_repetition_penalty(logits, [[0, 1, 1]], 2.0)  # duplicates penalised once
    np.testing.assert_array_equal(out, [[1.0, -2.0, 0.5, 3.0]])
    np.testing.assert_array_equal(logits, [[2.0, -1.0, 0.5, 3.0]])  # input untouched


def test_top_p_hand_case():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    # ascending cumulative probabilities 0.05, 0.20, 0.50, 1.0: drop while <= 1 - top_p
    kept = np.isfinite(apply_top_p(logits, 0.8))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    np.testing.assert_array_equal(np.isfinite(apply_top_p(logits, 0.9)), [[True, True, True, False]])
    np.testing.assert_array_equal(np.isfinite(apply_top_p(logits, 0.01)), [[True, False, False, False]])
    assert apply_top_p(logits, 1.0) is logits


def test_top_k_keeps_ties_and_zero_disables():
    logits = np.array([[1.0, 3.0, 3.0, 2.0, 0.0]], np.float32)
    np.testing.assert_array_equal(np.isfinite(apply_top_k(logits, 2)), [[False, True, True, False, False]])
    np.testing.assert_array_equal(np.isfinite(apply_top_k(logits, 3)), [[False, True, True, True, False]])
    assert apply_top_k(logits, 0) is logits


def test_processors_match_torch_reference():
    torch = pytest.importorskip("torch")
    from telechat_ms.reference import torch_model as ref
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
    seen = rng.integers(0, 50, size=(3, 7))
    for kw in (dict(do_sample=False, repetition_penalty=1.3),
               dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.03)):
        ours = process_logits(logits, seen.tolist(), **kw)
        theirs = ref.process_logits(torch.from_numpy(logits), torch.from_numpy(seen), **kw).numpy()
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
        np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 100)).astype(np.float32)
    draw = lambda seed: select_tokens(process_logits(logits, [[]] * 4, True, 1.0, 0, 1.0),  # noqa: E731
                                      True, np.random.default_rng(seed))
    assert (draw(3) == draw(3)).all()
    assert any((draw(3) != draw(s)).any() for s in range(4, 10))
    top1 = process_logits(logits, [[]] * 4, do_sample=True, temperature=0.5, top_k=1)
    for seed in range(5):
        assert (select_tokens(top1, True, np.random.default_rng(seed)) == logits.argmax(-1)).all()


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([[0.7, 0.2, 0.1]]))
    rng = np.random.default_rng(0)
    counts = np.bincount([int(select_tokens(logits, True, rng)[0]) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


def test_generation_config_reads_released_file(meta_dir):
    cfg = GenerationConfig.from_pretrained(meta_dir)
    with open(meta_dir / "generation_config.json") as fh:
        raw = json.load(fh)
    assert cfg.do_sample is raw.get("do_sample", False)
    assert cfg.top_k == raw["top_k"] and math.isclose(cfg.top_p, raw["top_p"])
    assert math.isclose(cfg.repetition_penalty, raw["repetition_penalty"])
    assert 2 in cfg.stop_ids


def test_generation_config_errors_name_file_and_field(tmp_path):
    assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig()  # no file: built-in defaults
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 1.5, "max_length": 10}))
    with pytest.raises(ConfigError, match=r"generation_config.json: field 'top_p'"):
        GenerationConfig.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text("{\n  bad")
    with pytest.raises(ConfigError, match=r"generation_config.json: invalid JSON at line 2"):
        GenerationConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unknown generation option"):
        GenerationConfig().replace(top_q=3)
    assert GenerationConfig(eos_token_id=None, stop_token_ids=[7]).stop_ids == {7}


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    from telechat_ms.data.train_tokenizer import train_tokenizer
    return train_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_streamer_holds_back_split_multibyte_characters(demo_tokenizer):
    tok = demo_tokenizer
    for char in ("∮", "🙂"):  # not pieces of the demo vocabulary: byte-fallback tokens, 3 and 4 of them
        byte_ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in char.encode("utf-8")]
        ids = tok.encode("ab") + byte_ids + tok.encode("c") + byte_ids  # "▁c" decodes to " c"
        assert tok.encode(char)[-len(byte_ids):] == byte_ids
        assert tok.decode(ids) == f"ab{char} c{char}"
        streamer = TextStreamer(tok)
        pieces = [streamer.put(i) for i in ids] + [streamer.end()]
        assert "".join(pieces) == f"ab{char} c{char}"
        assert all("\ufffd" not in p for p in pieces)
        assert char in pieces  # emitted whole, once its last byte arrived


def test_streamer_concatenation_equals_decode_on_random_ids(demo_tokenizer):
    tok = demo_tokenizer
    rng = np.random.default_rng(0)
    for trial in range(300):
        ids = rng.integers(0, tok.vocab_size if trial % 2 else 300, size=int(rng.integers(1, 25))).tolist()
        streamer = TextStreamer(tok)
        streamed = "".join(streamer.put(i) for i in ids) + streamer.end()
        assert streamed == tok.decode(ids, skip_special_tokens=True), ids


def test_streamer_with_the_real_tokenizer(meta_dir):
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    tok = TeleChatTokenizer.from_pretrained(str(meta_dir))
    text = "你好，世界！Hello 😀 ∮ 𠀋 end"
    ids = tok.encode(text)
    streamer = TextStreamer(tok)
    pieces = [streamer.put(i) for i in ids] + [streamer.end()]
    assert "".join(pieces) == tok.decode(ids) and all("\ufffd" not in p for p in pieces)
