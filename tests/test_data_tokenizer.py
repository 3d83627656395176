"""TeleChatTokenizer with the real 131072-piece model, and the small demo tokenizer trained from demo data."""
from __future__ import annotations

import json

import pytest

from tests.data_fixtures import REAL_TOKENIZER, SFT_FILES, demo_tok, demo_tok_dir, real_tok, sample_lines  # noqa: F401
from telechat_ms.data import TeleChatTokenizer, apply_chat_template, parse_line
from telechat_ms.data.render import render_training_text
from telechat_ms.errors import DataError

SPECIALS = ["<_unk>", "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>", "<_observation>", "<_sep>"]

SYS, Q1, A1, Q2 = "你是一个乐于助人的助手。", "你好，请问 2024 年有多少天？", "2024年是闰年，有366天。", "What about 2023?"
# Computed once with the real model, piece by piece: [6] + sp(SYS + "\n") + [4] + sp(Q1) + [5] + sp(A1) + [2]
# + sp("\n") + [4] + sp(Q2) + [5]. Pinned so any change in splitting or dummy-prefix handling is caught.
PINNED = [6, 66904, 38438, 126720, 1274, 29791, 126169, 29, 4, 96343, 126161, 9382, 126136, 20, 18, 20, 22, 8094,
          13097, 126291, 126271, 5, 126136, 20, 18, 20, 22, 57437, 130790, 126234, 126161, 126199, 21, 24, 24, 126291,
          126169, 2, 126136, 29, 4, 1053, 793, 126136, 20, 18, 20, 21, 126254, 5]


def test_special_tokens_have_ids_0_to_8(real_tok):
    assert real_tok.vocab_size == 131072
    assert [real_tok.id_to_piece(i) for i in range(9)] == SPECIALS
    for i, tok in enumerate(SPECIALS):
        assert real_tok.encode(tok) == [i]
        assert real_tok.convert_tokens_to_ids(tok) == i
    assert (real_tok.bos_token_id, real_tok.eos_token_id, real_tok.pad_token_id, real_tok.unk_token_id) == (1, 2, 3, 0)
    assert (real_tok.user_token_id, real_tok.bot_token_id, real_tok.system_token_id) == (4, 5, 6)


def test_no_automatic_bos_eos_and_digits_split(real_tok):
    ids = real_tok.encode("hello")
    assert real_tok.bos_token_id not in ids and real_tok.eos_token_id not in ids
    pieces = real_tok.convert_ids_to_tokens(real_tok.encode("12345"))
    assert [p for p in pieces if p != "▁"] == ["1", "2", "3", "4", "5"]


def test_tool_tags_are_plain_text(real_tok):
    for tag in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        ids = real_tok.encode(tag)
        assert len(ids) > 1 and not any(real_tok.is_special(i) for i in ids)
        assert real_tok.decode(ids) == tag


def test_pinned_ids_of_a_rendered_two_turn_conversation(real_tok):
    sp = real_tok.sp  # the bare SentencePiece processor: an independent composition of the expected ids
    composed = ([6] + sp.encode(SYS + "\n") + [4] + sp.encode(Q1) + [5] + sp.encode(A1) + [2] + sp.encode("\n")
                + [4] + sp.encode(Q2) + [5])
    assert composed == PINNED
    msgs = [{"role": "system", "content": SYS}, {"role": "user", "content": Q1},
            {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}]
    text = apply_chat_template(msgs, add_generation_prompt=True)
    assert real_tok.encode(text) == PINNED
    assert real_tok.decode(PINNED) == text
    assert real_tok.decode(PINNED, skip_special_tokens=True) == SYS + "\n" + Q1 + A1 + "\n" + Q2


def test_round_trip_on_sample_data(real_tok):
    texts = []
    for name in SFT_FILES:
        for i, line in enumerate(sample_lines(name, limit=120)):
            texts.append(render_training_text(parse_line(line, f"{name}:{i + 1}")))
    texts += [json.loads(line)["text"] for line in sample_lines("pretrain_example")]
    for text in texts:
        assert real_tok.decode(real_tok.encode(text)) == text


def test_round_trip_edge_cases(real_tok):
    for text in ["", " ", "  leading spaces", "trailing  ", "\n\n", "a\tb", "emoji 😀 and 𝔘nicode", "<_user><_bot>",
                 "x<_end>\n<_user> y"]:
        assert real_tok.decode(real_tok.encode(text)) == text


def test_piece_access_and_hf_style_call(real_tok):
    ids = real_tok("你好<_end>")["input_ids"]
    assert ids[-1] == 2
    assert real_tok.convert_ids_to_tokens(ids)[-1] == "<_end>"
    assert real_tok.convert_ids_to_tokens(2) == "<_end>"
    with pytest.raises(DataError):
        real_tok.id_to_piece(131072)
    with pytest.raises(DataError, match="out of range"):
        real_tok.decode([5, 131072])


def test_load_from_directory_and_save_pretrained(real_tok, tmp_path):
    tok = TeleChatTokenizer.from_pretrained(str(REAL_TOKENIZER.parent))
    assert tok.encode("测试 123") == real_tok.encode("测试 123")
    tok.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["eos_token"] == "<_end>" and config["pad_token"] == "<_pad>"
    assert TeleChatTokenizer(str(tmp_path)).sha256 == real_tok.sha256


def test_missing_or_foreign_model_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        TeleChatTokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="tokenizer.model"):
        TeleChatTokenizer(str(tmp_path))


def test_tokenizer_pickles_for_workers(real_tok):
    import pickle
    clone = pickle.loads(pickle.dumps(real_tok))
    assert clone.encode("pickle 42") == real_tok.encode("pickle 42")


def test_demo_tokenizer_matches_the_contract(demo_tok, demo_tok_dir):
    assert [demo_tok.id_to_piece(i) for i in range(9)] == SPECIALS
    assert 2000 <= demo_tok.vocab_size <= 4000
    assert all(demo_tok.sp.is_control(i) for i in range(1, 9)) and demo_tok.sp.is_unknown(0)
    pieces = demo_tok.convert_ids_to_tokens(demo_tok.encode("2024"))
    assert [p for p in pieces if p != "▁"] == ["2", "0", "2", "4"]
    text = apply_chat_template([{"role": "user", "content": "Hello, 世界! 😀"}], add_generation_prompt=True)
    assert demo_tok.decode(demo_tok.encode(text)) == text  # byte fallback covers unseen characters
    assert (demo_tok_dir / "tokenizer_config.json").is_file()


def test_demo_tokenizer_of_another_size(tmp_path):
    """(Its training time is measured by benchmarks/tokenizer_bench.py, not asserted here.)"""
    from telechat_ms.data.train_tokenizer import train_tokenizer
    tok = train_tokenizer(str(tmp_path), vocab_size=2500)
    assert 2000 <= tok.vocab_size <= 2500 and [tok.id_to_piece(i) for i in range(9)] == SPECIALS


def test_batch_encoding_equals_one_by_one(real_tok):
    """process-data's workers encode records in batches: the ids are those of one-by-one encoding."""
    import numpy as np
    from telechat_ms.data import encode_example
    from telechat_ms.data.render import encode_examples
    examples = [parse_line(line, f"{name}:{i}") for name in ("demo_multi", "demo_tool", "demo_role")
                for i, line in enumerate(sample_lines(name, 30), 1)]
    examples.append(parse_line('{"text": "plain pretrain text 123"}', "p:1", task="pretrain"))
    batch = encode_examples(examples, real_tok)
    for e, b in zip(examples, batch):
        one = encode_example(e, real_tok)
        assert np.array_equal(one.ids, b.ids) and np.array_equal(one.mask, b.mask) and one.prefix_len == b.prefix_len
    assert real_tok.encode_batch(["a<_user>b", "", "<_end>"]) == [real_tok.encode("a<_user>b"), [], [2]]
