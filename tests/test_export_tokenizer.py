"""The tokenizer files of an HF export: a transformers user (AutoTokenizer, trust_remote_code) gets exactly our ids
and text back, on the real 131072-piece tokenizer and on a demo one, and the chat template the export carries renders
exactly what telechat_ms.chat_template renders (vLLM's chat endpoint uses it)."""
from __future__ import annotations

import itertools
import json
import os
import pickle
import shutil

import pytest

from telechat_ms import special_tokens as st
from telechat_ms.chat_template import apply_chat_template
from telechat_ms.cli import main
from telechat_ms.data.tokenizer import TeleChatTokenizer

EDGE_TEXTS = [
    "<_system>系统\n<_user>What is 12345?<_bot>It is 12345.<_end>\n<_user>  two  spaces <_bot>",
    "a<_user>b<_bot>c<_end>", "<_end><_pad><_unk><_sep><_observation><_start>", " leading space", "trailing  ",
    "\t\ttabs\n\n\nnewlines", "😀 emoji, 龘 rare, é accents", "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "<_user <_bot> <_us er>", "", "0123456789" * 3, "<script>alert(1)</script>", "<_control1> <_control9>",
]
CONVERSATIONS = [
    ([{"role": "user", "content": "你好"}], None),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Q1"},
      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}], None),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}, {"role": "user", "content": "again"}],
     None),
    ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "北京和上海天气?"},
      {"role": "assistant", "content": None, "tool_calls": [
          {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"北京\"}"}},
          {"name": "weather", "arguments": {"city": "上海", "unit": "C"}}]},
      {"role": "tool", "content": "{\"t\": 20}", "tool_call_id": "c1"}, {"role": "tool", "content": "晴"},
      {"role": "assistant", "content": "北京20度，上海晴。"}, {"role": "user", "content": "谢谢"}],
     [{"type": "function", "function": {"name": "weather", "description": "天气", "parameters": {
         "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]),
    ([{"role": "user", "content": "call it"}, {"role": "assistant", "content": "ok",
                                               "tool_calls": [{"function": {"name": "noargs"}}]}],
     [{"name": "noargs", "parameters": {}}]),
]


def _corpus(shared_dir) -> list[str]:
    from telechat_ms.data.formats import parse_line
    from telechat_ms.data.render import render_training_text
    texts = list(EDGE_TEXTS)
    sft = shared_dir / "sample_data" / "sft"
    for path in sorted(sft.glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(itertools.islice(fh, 8)):
                texts.append(render_training_text(parse_line(line, f"{path}:{i + 1}")))
    with open(shared_dir / "sample_data" / "pretrain" / "pretrain_example.jsonl", encoding="utf-8") as fh:
        texts += [json.loads(line)["text"] for line in itertools.islice(fh, 8)]
    return texts


@pytest.fixture(scope="module")
def real_export(tiny_gqa_ckpt, meta_dir, tmp_path_factory) -> str:
    """`convert ms2hf` of a model directory carrying the released tokenizer files (what a user of the release has)."""
    root = tmp_path_factory.mktemp("tok_export")
    src = root / "src"
    shutil.copytree(tiny_gqa_ckpt, src)
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(meta_dir / name, src / name)
    assert main(["convert", "hf2ms", str(src), str(root / "ms"), "--quiet"]) == 0
    assert main(["convert", "ms2hf", str(root / "ms"), str(root / "hf"), "--quiet"]) == 0
    return str(root / "hf")


def test_export_carries_loadable_tokenizer_files(real_export, meta_dir):
    for name in ("tokenizer.model", "generation_config.json"):
        assert open(os.path.join(real_export, name), "rb").read() == open(meta_dir / name, "rb").read(), name
    cfg = json.load(open(os.path.join(real_export, "tokenizer_config.json")))
    assert cfg["auto_map"] == {"AutoTokenizer": ["tokenization_telechat2.Telechat2Tokenizer", None]}
    assert cfg["tokenizer_class"] == "Telechat2Tokenizer" and cfg["add_bos_token"] is False
    assert cfg["model_max_length"] == 32 and cfg["eos_token"] == "<_end>" and cfg["unk_token"] == "<_unk>"
    assert {int(i): t["content"] for i, t in cfg["added_tokens_decoder"].items()} == {
        i: t for t, i in st.SPECIAL_TOKEN_IDS.items()}
    assert not any(t["single_word"] or t["lstrip"] or t["rstrip"] for t in cfg["added_tokens_decoder"].values())
    assert os.path.isfile(os.path.join(real_export, "tokenization_telechat2.py"))
    assert json.load(open(os.path.join(real_export, "special_tokens_map.json")))["eos_token"]["content"] == "<_end>"


def test_control_tokens_of_the_shipped_module_are_ours():
    from telechat_ms.hf_export.tokenization_telechat2 import CONTROL_TOKENS
    assert CONTROL_TOKENS == st.SPECIAL_TOKENS


def _check_same_tokenizer(path: str, texts: list[str]) -> None:
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    ours = TeleChatTokenizer(path)
    assert type(hf).__name__ == "Telechat2Tokenizer" and len(hf) == hf.vocab_size == ours.vocab_size
    for token, idx in st.SPECIAL_TOKEN_IDS.items():
        assert hf.convert_tokens_to_ids(token) == idx and hf.encode(token) == [idx], token
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
    for text in texts:
        ids = hf.encode(text)
        assert ids == ours.encode(text), text[:80]
        assert hf(text)["input_ids"] == ids  # no BOS/EOS added on any path
        assert hf.decode(ids) == ours.decode(ids), text[:80]
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True), text[:80]
    extra = list(range(min(hf.vocab_size, 40)))  # every control id (the real model has 18) and some ordinary ones
    assert hf.decode(extra) == ours.decode(extra)
    assert hf.decode(extra, skip_special_tokens=True) == ours.decode(extra, skip_special_tokens=True)
    assert hf.convert_tokens_to_string(hf.convert_ids_to_tokens(extra)) == ours.decode(extra)
    again = pickle.loads(pickle.dumps(hf))  # vLLM hands the tokenizer to worker processes
    assert again.encode(texts[0]) == hf.encode(texts[0])
    for messages, tools in CONVERSATIONS:
        for prompt in (False, True):
            text = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt)
            assert text == apply_chat_template(messages, tools=tools, add_generation_prompt=prompt), messages
            ids = hf.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=prompt)
            assert list(ids) == ours.encode(text)


def test_real_tokenizer_through_transformers_equals_ours(real_export, shared_dir):
    _check_same_tokenizer(real_export, _corpus(shared_dir))


def test_demo_tokenizer_through_transformers_equals_ours(tmp_path):
    from telechat_ms.data.train_tokenizer import train_tokenizer
    from telechat_ms.hf_export import write_tokenizer_code
    train_tokenizer(str(tmp_path), vocab_size=1000)
    write_tokenizer_code(str(tmp_path), model_max_length=256)
    texts = list(EDGE_TEXTS) + [apply_chat_template(m, tools=t, add_generation_prompt=True) for m, t in CONVERSATIONS]
    _check_same_tokenizer(str(tmp_path), texts)


def test_the_exported_template_is_the_released_one_on_the_spec_examples():
    """Spec 5's worked examples, rendered by the Jinja template alone (no tokenizer)."""
    import jinja2

    from telechat_ms.hf_export import chat_template
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    template = env.from_string(chat_template())
    one = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q1"}]
    assert template.render(messages=one, add_generation_prompt=True) == "<_system>SYS\n<_user>Q1<_bot>"
    multi = one + [{"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert template.render(messages=multi, add_generation_prompt=True) == (
        "<_system>SYS\n<_user>Q1<_bot>A1<_end>\n<_user>Q2<_bot>")
    assert template.render(messages=[{"role": "user", "content": "Q"}]) == (
        f"<_system>{st.DEFAULT_SYSTEM_PROMPT}\n<_user>Q")
