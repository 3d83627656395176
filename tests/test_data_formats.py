"""Record formats and their validation errors; data-mix files and weighted selection."""
from __future__ import annotations

import json

import pytest

from tests.data_fixtures import SAMPLE, SFT_FILES, require_shared, rewrite_mix, sample_lines
from telechat_ms.data import load_mix, parse_line, render_training_text, select_indices
from telechat_ms.errors import DataError

GOOD = {"system": "SYS\n", "dialog": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}],
        "multiturn": False, "tool": False}


def line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def test_released_record_renders_system_text_verbatim():
    ex = parse_line(line(GOOD), "f.jsonl:1")
    assert render_training_text(ex) == "<_system>SYS\n<_user>Q<_bot>A<_end>"
    assert ex.packable and not ex.is_tool
    no_newline = dict(GOOD, system="SYS")
    assert render_training_text(parse_line(line(no_newline), "f:1")) == "<_system>SYS\n<_user>Q<_bot>A<_end>"


def test_released_samples_render_as_system_plus_dialog():
    require_shared()
    for name in SFT_FILES:
        for i, raw in enumerate(sample_lines(name, limit=30)):
            rec = json.loads(raw)
            pairs = zip(rec["dialog"][::2], rec["dialog"][1::2])
            expected = "<_system>" + rec["system"] + "\n".join(
                f"<_user>{u['content']}<_bot>{b['content']}<_end>" for u, b in pairs)
            ex = parse_line(raw, f"{name}:{i + 1}")
            assert render_training_text(ex) == expected
            assert ex.is_tool == rec["tool"]
            assert ex.packable == (not rec["tool"] and not rec["multiturn"])


def test_openai_messages_and_input_output_formats():
    rec = {"messages": [{"role": "user", "content": "天气？"},
                        {"role": "assistant", "content": None,
                         "tool_calls": [{"function": {"name": "w", "arguments": "{\"city\": \"北京\"}"}}]},
                        {"role": "tool", "content": "晴"}, {"role": "assistant", "content": "晴天"}],
           "tools": [{"name": "w"}]}
    ex = parse_line(line(rec), "m:1")
    assert ex.is_tool and not ex.packable and ex.tools == [{"name": "w"}]
    assert render_training_text(ex).endswith(
        "<_user>天气？<_bot><tool_call>\n{\"name\": \"w\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call><_end>\n"
        "<_user><tool_response>\n晴\n</tool_response><_bot>晴天<_end>")
    io = parse_line(line({"input": "1+1?", "output": "2"}), "io:1")
    assert render_training_text(io).endswith("\n<_user>1+1?<_bot>2<_end>") and io.packable
    pre = parse_line(line({"text": "hello"}), "p:1", task="pretrain")
    assert not pre.is_chat and pre.text == "hello"


BAD_LINES = [
    ("{not json", "invalid JSON"),
    (line([1, 2]), "expected a JSON object"),
    (line({"system": "s"}), "missing field 'dialog'"),
    (line(dict(GOOD, dialog=[])), "dialog: empty"),
    (line(dict(GOOD, dialog=[{"role": "user", "content": "q"}])), "must end with a bot turn"),
    (line(dict(GOOD, dialog=[{"role": "narrator", "content": "q"}, {"role": "bot", "content": "a"}])), "unknown role"),
    (line(dict(GOOD, dialog=[{"role": "user"}, {"role": "bot", "content": "a"}])), "missing field 'content'"),
    (line(dict(GOOD, dialog=[{"role": "user", "content": 5}, {"role": "bot", "content": "a"}])), "expected a string"),
    (line(dict(GOOD, dialog=[{"role": "bot", "content": "a"}])), "must alternate"),
    (line(dict(GOOD, dialog=[{"role": "user", "content": "x<_bot>y"}, {"role": "bot", "content": "a"}])),
     "reserved token '<_bot>'"),
    (line(dict(GOOD, multiturn="no")), "multiturn"),
    (line({"messages": [{"role": "user", "content": "q"}]}), "must end with an assistant turn"),
    (line({"messages": [{"role": "wizard", "content": "q"}]}), "unknown role"),
    (line({"input": "q"}), "missing field 'output'"),
    (line({"text": "pretrain"}), "use --task pretrain"),
]


@pytest.mark.parametrize("raw, reason", BAD_LINES)
def test_bad_lines_name_file_line_and_reason(raw, reason):
    with pytest.raises(DataError) as err:
        parse_line(raw, "data/x.jsonl:17")
    assert str(err.value).startswith("data/x.jsonl:17: ")
    assert reason in str(err.value)


def test_pretrain_bad_lines():
    for raw, reason in [(line({"dialog": []}), "missing field 'text'"), (line({"text": ""}), "text: empty"),
                        (line({"text": 3}), "expected a string")]:
        with pytest.raises(DataError, match=reason):
            parse_line(raw, "p.jsonl:2", task="pretrain")


def test_mix_paths_relative_to_mix_file_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text(line(GOOD) + "\n")
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"sub/a.jsonl": 1.5}))
    [entry] = load_mix(str(mix))
    assert entry.path == str(tmp_path / "sub" / "a.jsonl") and entry.weight == 1.5
    for bad, reason in [({"sub/missing.jsonl": 1}, "not found"), ({"sub/a.jsonl": 0}, "positive"),
                        ({"sub/a.jsonl": -1}, "positive"), ({"sub/a.jsonl": "1"}, "number"), ({}, "non-empty")]:
        mix.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=reason) as err:
            load_mix(str(mix))
        assert str(mix) in str(err.value)
    with pytest.raises(DataError, match="not found"):
        load_mix(str(tmp_path / "nope.json"))


def test_released_mix_files_load_after_path_rewrite(tmp_path):
    require_shared()
    entries = load_mix(str(rewrite_mix(SAMPLE / "sft_data_config.json", tmp_path)))
    assert [round(e.weight, 2) for e in entries] == [1.01, 1.24, 1.78, 1.42, 1.2, 1.0]


def test_weighted_selection_full_passes_plus_seeded_subset_without_replacement():
    sel = select_indices(10, 2.3, seed=42, key="a.jsonl")
    assert len(sel) == 23
    assert sorted(sel[:20]) == sorted(list(range(10)) * 2)
    extra = sel[20:]
    assert len(set(extra)) == 3  # no replacement inside the fractional part
    assert select_indices(10, 2.3, seed=42, key="a.jsonl") == sel
    assert select_indices(10, 2.3, seed=7, key="a.jsonl") != sel or select_indices(10, 2.3, 8, "a.jsonl") != sel
    assert select_indices(10, 1.0, 42, "a") == list(range(10))
    assert len(select_indices(10, 0.04, 42, "a")) == 0 and len(select_indices(10, 0.05, 42, "a")) == 1
    assert sorted(select_indices(50, 0.999, 1, "k")) == list(range(50))


def test_shipped_demo_data_is_what_the_generator_writes(tmp_path):
    from telechat_ms.data.demo_gen import OUT_DIR, generate
    counts = generate(tmp_path)
    assert counts["sft_demo.jsonl"] + counts["sft_demo_messages.jsonl"] >= 200
    for path in sorted(tmp_path.iterdir()):
        assert path.read_bytes() == (OUT_DIR / path.name).read_bytes(), path.name
    kinds = {"tool": 0, "multi": 0, "single": 0}
    for i, raw in enumerate((OUT_DIR / "sft_demo.jsonl").read_text(encoding="utf-8").splitlines()):
        ex = parse_line(raw, f"sft_demo.jsonl:{i + 1}")
        kinds["tool" if ex.is_tool else "single" if ex.packable else "multi"] += 1
    assert min(kinds.values()) >= 20, kinds
