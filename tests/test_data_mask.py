"""Loss-mask rules, checked by decoding the supervised tokens of released sample records (spec 6)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.data_fixtures import SFT_FILES, real_tok, sample_lines  # noqa: F401
from telechat_ms.data import encode_example, loss_mask, parse_line, render_training_text


def supervised_spans(tok, ids, mask) -> list[str]:
    """Decoded text of each maximal run of supervised tokens."""
    spans, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append(tok.decode(ids[start:i]))
            start = None
    return spans


@pytest.mark.parametrize("mode", ["released", "answer-only"])
def test_supervised_tokens_are_exactly_the_answers(real_tok, mode):
    checked = 0
    for name in SFT_FILES:
        for i, raw in enumerate(sample_lines(name, limit=25)):
            rec = json.loads(raw)
            ex = parse_line(raw, f"{name}:{i + 1}")
            enc = encode_example(ex, real_tok, mode)
            assert enc.ids.tolist() == real_tok.encode(render_training_text(ex))  # prefix memo changes nothing
            answers = [t["content"] for t in rec["dialog"] if t["role"] == "bot"]
            if mode == "released":
                expected = [s for a in answers for s in ("<_user>", f"<_bot>{a}<_end>")]
            else:
                expected = [f"{a}<_end>" for a in answers]
            assert supervised_spans(real_tok, enc.ids, enc.mask) == expected, f"{name}:{i + 1}"
            # Everything else decodes to the system text and the user turns only.
            unsupervised = real_tok.decode(enc.ids[~enc.mask], skip_special_tokens=True)
            users = [t["content"] for t in rec["dialog"] if t["role"] == "user"]
            for text in [rec["system"], *users]:
                assert text.strip()[:20] in unsupervised
            checked += 1
    assert checked == 25 * len(SFT_FILES)


def test_system_and_user_tokens_never_supervised(real_tok):
    raw = sample_lines("demo_tool", limit=1)[0]
    enc = encode_example(parse_line(raw, "demo_tool:1"), real_tok, "released")
    assert not enc.mask[:enc.prefix_len].any()  # the whole system block (with its tools section)
    assert enc.ids[enc.prefix_len] == 4 and enc.mask[enc.prefix_len]  # the <_user> token itself is a target


def test_pretrain_all_supervised_with_end(real_tok):
    raw = sample_lines("pretrain_example", limit=1)[0]
    enc = encode_example(parse_line(raw, "p:1", task="pretrain"), real_tok)
    assert enc.ids[-1] == 2 and enc.mask.all()
    assert real_tok.decode(enc.ids[:-1]) == json.loads(raw)["text"]


def test_mask_of_a_truncated_answer_runs_to_the_end():
    ids = np.array([6, 10, 4, 11, 5, 12, 13, 2, 100, 4, 14, 5, 15, 16])  # second answer lost its <_end>
    assert loss_mask(ids, "released").tolist() == [0, 0, 1, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1]
    assert loss_mask(ids, "answer-only").tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError):
        loss_mask(ids, "everything")
