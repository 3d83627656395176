"""`eval --prompt-style chat` on a tiny checkpoint: the multiple-choice questions go through the chat template (the
shots as earlier turns), the answer is generated greedily (equal to model.generate's greedy tokens) and pred is the
first A-D letter standing alone in it (the random checkpoint's answers name no letter: the letter path is checked on
crafted generations)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from telechat_ms.chat_template import apply_chat_template
from telechat_ms.cli import main
from telechat_ms.eval.tasks.exams import LETTERS, descriptions, extract_letter

DATA = Path(__file__).parent / "eval_data"
GEN = 16


@pytest.mark.parametrize("text, letter", [("B", "B"), (" C. 64", "C"), ("答案：D。", "D"), ("Answer: A", "A"),
                                          ("The answer is (B).", "B"), ("Across the board", None), ("", None),
                                          ("ABCD", None), ("选C", "C")])
def test_extract_letter(text, letter):
    assert extract_letter(text) == letter


def test_score_letter_on_crafted_generations():
    from telechat_ms.eval.tasks.base import Sample
    from telechat_ms.eval.tasks.exams import score_letter
    s = Sample("ceval", 0, "logic", "p", 2, choices=list(LETTERS))
    assert score_letter(s, {"generation": "答案是 C。"}) == {"extracted": "C", "pred": 2, "correct": True}
    assert score_letter(s, {"generation": "B. 32"}) == {"extracted": "B", "pred": 1, "correct": False}
    assert score_letter(s, {"generation": "I do not know"}) == {"extracted": None, "pred": None, "correct": False}


def _question(row: dict, cue: str) -> str:
    return f"{row['question'].strip()}\nA. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n{cue}"


def _expected_prompts() -> list[str]:
    """C-Eval's logic subject with one shot, as the chat template renders the conversation."""
    out = []
    for subject in ("computer_network", "logic"):
        with open(DATA / "ceval" / "dev" / f"{subject}_dev.csv", encoding="utf-8") as fh:
            shot = list(csv.DictReader(fh))[0]
        with open(DATA / "ceval" / "val" / f"{subject}_val.csv", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        desc = descriptions("ceval")[subject]
        for r in rows:
            messages = [{"role": "user", "content": desc + _question(shot, "答案：")},
                        {"role": "assistant", "content": shot["answer"]},
                        {"role": "user", "content": _question(r, "答案：")}]
            out.append(apply_chat_template(messages, add_generation_prompt=True))
    return out


def test_chat_prompt_style_generates_the_letter(tmp_path, capsys):
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.data.train_tokenizer import train_tokenizer
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    tok = train_tokenizer(str(tmp_path / "tok"), vocab_size=1024)
    model_dir = str(tmp_path / "model")
    write_random_hf_checkpoint(model_dir, tiny_config(vocab_size=tok.vocab_size, seq_length=512), qk_scale=4.0,
                               seed=3)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    rc = main(["eval", model_dir, "--data-dir", str(DATA), "--tasks", "ceval", "--prompt-style", "chat",
               "--num-fewshot", "1", "--batch-size", "4", "--log-samples", "--max-gen-toks", str(GEN), "--output",
               str(out), "--no-progress"])
    assert rc == 0
    recs = [json.loads(x) for x in (out / "samples_ceval.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in recs] == _expected_prompts()
    model, tok = TeleChatForCausalLM.from_pretrained(model_dir), TeleChatTokenizer.from_pretrained(model_dir)
    greedy = model.generate([tok.encode(r["prompt"]) for r in recs], max_new_tokens=GEN, use_jit=False).new_tokens
    for r, new in zip(recs, greedy):
        assert r["generation"] == tok.decode(new, skip_special_tokens=True)
        assert r["extracted"] == extract_letter(r["generation"])
        assert r["pred"] == (None if r["extracted"] is None else LETTERS.index(r["extracted"]))
        assert r["correct"] == (r["pred"] == r["target"]) and r["loglikelihoods"] is None
    res = json.loads((out / "results.json").read_text())
    row = next(x for x in res["results"] if x["task"] == "ceval" and x["subject"] == "")
    assert row["value"] == pytest.approx(sum(r["correct"] for r in recs) / len(recs)) and row["n"] == len(recs)
    assert res["config"]["prompt_style"] == "chat"
    rc = main(["eval", model_dir, "--data-dir", str(DATA), "--tasks", "gsm8k", "--prompt-style", "chat",
               "--output", str(out)])
    assert rc == 2 and "--prompt-style chat applies to the multiple-choice tasks" in capsys.readouterr().err
