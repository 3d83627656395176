"""Packing, truncation, padding and per-sample boundaries, with the demo tokenizer (no ../shared needed)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.data_fixtures import demo_tok, demo_tok_dir  # noqa: F401
from telechat_ms.data import (PackOptions, encode_example, materialize, parse_record, plan_sequences,
                              render_training_text, sample_boundaries)


def chat(q: str, a: str, system: str = "SYS\n", extra: list | None = None):
    dialog = [{"role": "user", "content": q}, {"role": "bot", "content": a}] + (extra or [])
    return parse_record({"system": system, "dialog": dialog}, f"t:{q}")


def encode_all(tok, examples, mode="released"):
    return [encode_example(e, tok, mode) for e in examples]


def opts(tok, n, **kw):
    return PackOptions(n, sep_ids=tuple(tok.encode_plain("\n")), **kw)


def test_single_turns_with_same_system_are_packed_with_system_once(demo_tok):
    items = encode_all(demo_tok, [chat("What is 1+1?", "2"), chat("Capital of France?", "Paris"),
                                  chat("Q other", "A", system="OTHER\n")])
    plans, stats = plan_sequences(items, [0, 1, 2], opts(demo_tok, 256))
    assert sorted(map(sorted, plans)) == [[0, 1], [2]] and stats.packed_examples == 2
    row = materialize(plans[0] if len(plans[0]) == 2 else plans[1], items, opts(demo_tok, 256))
    # Identical to the multi-turn rendering of the same turns: <_system>SYS\n<_user>..<_end>\n<_user>..<_end>
    merged = render_training_text(chat("What is 1+1?", "2", extra=[{"role": "user", "content": "Capital of France?"},
                                                                  {"role": "bot", "content": "Paris"}]))
    assert demo_tok.decode(row.input_ids[:row.n_tokens]) == merged
    assert merged.count("<_system>") == 1
    assert (row.input_ids[row.n_tokens:] == 3).all() and (row.labels[row.n_tokens:] == -100).all()


def test_multi_turn_and_tool_records_stay_alone(demo_tok):
    multi = chat("q1", "a1", extra=[{"role": "user", "content": "q2"}, {"role": "bot", "content": "a2"}])
    tool = parse_record({"system": "SYS\n", "dialog": [{"role": "user", "content": "x"},
                                                        {"role": "bot", "content": "<tool_call>\n{}\n</tool_call>"}],
                         "tool": True}, "t:tool")
    items = encode_all(demo_tok, [multi, tool, chat("a", "b"), chat("c", "d")])
    plans, _ = plan_sequences(items, [0, 1, 2, 3], opts(demo_tok, 512))
    assert sorted(map(sorted, plans)) == [[0], [1], [2, 3]]
    plans, _ = plan_sequences(items, [0, 1, 2, 3], opts(demo_tok, 512, pack=False))
    assert len(plans) == 4


def test_capacity_is_respected_and_every_row_fits(demo_tok):
    examples = [chat(f"question number {i} about things", "answer " * (i % 5 + 1)) for i in range(40)]
    items = encode_all(demo_tok, examples)
    o = opts(demo_tok, 96)
    plans, stats = plan_sequences(items, list(range(40)), o)
    assert sorted(i for p in plans for i in p) == list(range(40)) and stats.truncated == 0
    for plan in plans:
        row = materialize(plan, items, o)
        assert row.input_ids.shape == (96,) and row.labels.shape == (96,) and row.n_tokens <= 96


def test_overlong_truncate_or_drop_is_counted(demo_tok):
    long = chat("long question " * 20, "long answer " * 40)
    items = encode_all(demo_tok, [long, chat("a", "b")])
    assert len(items[0]) > 64
    plans, stats = plan_sequences(items, [0, 1], opts(demo_tok, 64))
    assert stats.truncated == 1 and stats.dropped_overlong == 0 and [0] in plans
    row = materialize([0], items, opts(demo_tok, 64))
    assert row.n_tokens == 64 and (row.input_ids == items[0].ids[:64]).all()
    plans, stats = plan_sequences(items, [0, 1], opts(demo_tok, 64, overlong="drop"))
    assert stats.dropped_overlong == 1 and plans == [[1]]
    # A system prompt longer than the limit leaves nothing to learn: dropped and counted, never kept.
    huge_system = encode_all(demo_tok, [chat("q", "a", system="system text " * 60)])
    plans, stats = plan_sequences(huge_system, [0], opts(demo_tok, 64))
    assert plans == [] and stats.dropped_no_target == 1


@pytest.mark.parametrize("mode", ["released", "answer-only"])
def test_left_and_right_padding_never_supervised(demo_tok, mode):
    items = encode_all(demo_tok, [chat("hello", "world")], mode)
    n = len(items[0])
    right = materialize([0], items, opts(demo_tok, 48))
    left = materialize([0], items, opts(demo_tok, 48, pad_side="left"))
    assert (right.input_ids[:n] == items[0].ids).all() and (right.input_ids[n:] == 3).all()
    assert (left.input_ids[-n:] == items[0].ids).all() and (left.input_ids[:48 - n] == 3).all()
    for row in (right, left):
        assert (row.labels[row.input_ids == 3] == -100).all()
        sup = row.labels != -100
        assert (row.labels[sup] == row.input_ids[sup]).all() and sup.sum() == items[0].mask.sum()


def test_no_cross_attention_restarts_positions_and_repeats_system(demo_tok):
    items = encode_all(demo_tok, [chat("q one", "a one"), chat("q two", "a two")])
    o = opts(demo_tok, 128, cross_attention=False)
    plans, _ = plan_sequences(items, [0, 1], o)
    assert plans == [[0, 1]]
    row = materialize([0, 1], items, o)
    n0, n1 = len(items[0]), len(items[1])
    assert row.n_tokens == n0 + n1
    assert (row.position_ids[:n0] == np.arange(n0)).all()
    assert (row.position_ids[n0:n0 + n1] == np.arange(n1)).all()
    assert (row.position_ids[n0 + n1:] == np.arange(128 - n0 - n1)).all()
    assert demo_tok.decode(row.input_ids[:row.n_tokens]).count("<_system>") == 2
    assert sample_boundaries(row.position_ids).tolist() == [n0, n0 + n1, 128]
    left = materialize([0, 1], items, PackOptions(128, pad_side="left", cross_attention=False))
    assert sample_boundaries(left.position_ids).tolist() == [128 - n0 - n1, 128 - n1, 128]


def test_pretrain_documents_pack_without_separator(demo_tok):
    docs = [parse_record({"text": f"document {i} text"}, f"p:{i}", task="pretrain") for i in range(3)]
    items = encode_all(demo_tok, docs)
    plans, _ = plan_sequences(items, [0, 1, 2], opts(demo_tok, 256))
    row = materialize(plans[0], items, opts(demo_tok, 256))
    assert demo_tok.decode(row.input_ids[:row.n_tokens]) == "".join(f"document {i} text<_end>" for i in plans[0])
    assert row.n_supervised == row.n_tokens
