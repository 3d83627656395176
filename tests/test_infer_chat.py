"""chat() over the chat template, streaming, and the `generate` / `chat` subcommands on a tiny model + tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from telechat_ms.cli import main  # noqa: E402
from telechat_ms.chat_template import apply_chat_template  # noqa: E402
from telechat_ms.special_tokens import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from telechat_ms.infer import chat as chat_module  # noqa: E402
from telechat_ms.infer.generate import Step  # noqa: E402
from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402

GEN = dict(max_new_tokens=8, do_sample=False, repetition_penalty=1.0, use_jit=False)  # PyNative: no compiles


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> str:
    """A random tiny checkpoint whose vocabulary is the demo tokenizer's, with tokenizer.model beside it."""
    from telechat_ms.data.train_tokenizer import train_tokenizer
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    out = str(tmp_path_factory.mktemp("chat_ckpt"))
    tok = train_tokenizer(out)
    write_random_hf_checkpoint(out, tiny_config(vocab_size=tok.vocab_size, training_seqlen=64, base_seqlen=64),
                               qk_scale=4.0, seed=3)
    return out


@pytest.fixture(scope="module")
def model_and_tokenizer(chat_dir):
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    return TeleChatForCausalLM.from_pretrained(chat_dir), TeleChatTokenizer.from_pretrained(chat_dir)


def test_three_turns_render_history_with_the_template(model_and_tokenizer):
    model, tok = model_and_tokenizer
    history = None
    answers = []
    for turn, question in enumerate(["你好", "1+1=?", "tell me more"]):
        stream = model.chat(tok, question, history=history, stream=True, **GEN)
        expected_messages = (history or []) + [{"role": "user", "content": question}]
        assert stream.prompt_ids == tok.encode(apply_chat_template(expected_messages, add_generation_prompt=True))
        pieces = list(stream)
        answers.append(stream.answer)
        assert "".join(pieces) == stream.answer
        history = stream.history
        assert len(history) == 2 * (turn + 1)
    assert [m["role"] for m in history] == ["user", "bot"] * 3
    assert [m["content"] for m in history[1::2]] == answers
    text = apply_chat_template(history[:4] + [{"role": "user", "content": "x"}], add_generation_prompt=True)
    assert text == (f"<_system>{DEFAULT_SYSTEM_PROMPT}\n<_user>你好<_bot>{answers[0]}<_end>\n"
                    f"<_user>1+1=?<_bot>{answers[1]}<_end>\n<_user>x<_bot>")


def test_stream_equals_whole_answer_and_input_history_is_kept(model_and_tokenizer):
    model, tok = model_and_tokenizer
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
               {"role": "bot", "content": "hello"}]
    snapshot = json.dumps(history)
    answer, new_history = model.chat(tok, "what now?", history=history, **GEN)
    stream = model.chat(tok, "what now?", history=history, stream=True, **GEN)
    assert "".join(stream) == answer
    assert json.dumps(history) == snapshot
    assert new_history[:3] == history and new_history[-1] == {"role": "bot", "content": answer}
    _, replaced = model.chat(tok, "q", history=history, system="new system", **GEN)
    assert replaced[0] == {"role": "system", "content": "new system"}
    assert stream.stats["new_tokens"] >= 1 and stream.stats["tokens_per_second"] > 0


def test_stream_never_splits_a_multibyte_character(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    text = "a∮b🙂"
    ids = tok.encode(text)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # byte-fallback tokens are involved

    def scripted(model_, rows, config, use_jit=True, timings=None):
        for token in ids + [2]:
            yield Step(np.array([token]), np.array([True]), np.zeros((1, 4), np.float32))

    monkeypatch.setattr(chat_module, "iter_generate", scripted)
    pieces = list(model.chat(tok, "q", stream=True))
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "∮" in "".join(pieces[:-1]) or "∮" in pieces[-1]
    assert model.chat(tok, "q")[0] == text


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_generate_cli_keeps_order_and_ids_and_reports_bad_lines(chat_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, [
        json.dumps({"id": "a", "messages": [{"role": "user", "content": "hello"}]}),
        json.dumps({"id": "b", "system": "sys", "dialog": [{"role": "user", "content": "q1"},
                                                             {"role": "bot", "content": "ref answer"}]}),
        '{"id": "broken", "messages": [',
        "",
        json.dumps({"prompt": "a longer question with quite a few more words in it"}),
        json.dumps({"id": 7, "messages": [{"role": "wizard", "content": "x"}]}),
    ])
    common = [chat_dir, "--input", str(src), "--max-new-tokens", "6", "--greedy", "--quiet", "--no-jit"]
    assert main(["generate", *common, "--output", str(tmp_path / "b1.jsonl")]) == 0
    err = capsys.readouterr().err
    assert f"{src}:3: invalid JSON" in err and f"{src}:6: messages[0].role" in err
    rows = [json.loads(line) for line in (tmp_path / "b1.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", 3, 5, 7]
    assert "error" in rows[2] and rows[2]["line"] == 3 and "error" in rows[4]
    assert rows[1]["reference"] == "ref answer" and all("answer" in rows[i] for i in (0, 1, 3))

    assert main(["generate", *common, "--output", str(tmp_path / "b3.jsonl"), "--batch-size", "3"]) == 0
    batched = [json.loads(line) for line in (tmp_path / "b3.jsonl").read_text().splitlines()]
    assert batched == rows  # batching (left padding, masked) changes nothing

    assert main(["generate", *common, "--output", str(tmp_path / "f.jsonl"), "--on-error", "fail"]) == 2
    assert f"{src}:3: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "f.jsonl").exists()


def test_generate_cli_single_prompt(chat_dir, capsys):
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    assert main(["generate", chat_dir, "--prompt", "hello", "--max-new-tokens", "5", "--greedy", "--no-jit"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model = TeleChatForCausalLM.from_pretrained(chat_dir)
    answer, _ = model.chat(TeleChatTokenizer.from_pretrained(chat_dir), "hello", max_new_tokens=5, do_sample=False,
                           use_jit=False)
    assert printed == answer


def test_chat_cli_commands(chat_dir, monkeypatch, capsys):
    inputs = iter(["hi", "/system you are terse", "/history", "again", "/clear", "/history", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(inputs))
    assert main(["chat", chat_dir, "--max-new-tokens", "4", "--greedy", "--no-jit"]) == 0
    out = capsys.readouterr().out
    assert out.count("tokens/s") == 2
    assert "system prompt set" in out and "history cleared" in out
    histories = [block for block in out.split("\n[") if block.startswith("\n  {") or block.startswith("{")]
    assert '"content": "hi"' in out and out.rstrip().endswith("[]")
    del histories
