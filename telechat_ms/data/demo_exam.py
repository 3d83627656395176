"""The demo's small learnable task (`make demo`): which city is the capital of a country, as exam questions in
C-Eval's release layout and as chat turns, generated deterministically from a seed.

- exam practice (pretrain prompt-completion records): the prompt is the question as lm-eval's ceval-valid task
  builds it (subject description, the question, "A. .. D. ..", "答案："), the completion " " + the answer letter,
  the continuation the harness scores; only the completion is supervised;
- held-out exam (C-Eval val CSV: id,question,A,B,C,D,answer): questions about the same countries whose options
  (which distractors, in which order) appear in no practice text;
- chat turns (SFT): "What is the capital of X?" / "X的首都是哪里？" answered with the city.
Practice and chat train together: prompt-completion records are plain text in the SFT task too (one data mix).
"""
from __future__ import annotations

import csv
import json
import os
import random

from telechat_ms.data.demo_gen import COUNTRIES

SUBJECT = "middle_school_geography"          # a C-Eval subject (its val file: val/{subject}_val.csv)
DESCRIPTION = "以下是中国关于初中地理的单项选择题，请选出其中的正确答案。\n\n"   # lm-eval 0.4.13's ceval-valid text
LETTERS = ("A", "B", "C", "D")


# (practice wordings, held-out wordings) of each kind of question; {c} = the country
WORDINGS = {
    "capital": (["{c}的首都是哪个城市？", "哪个城市是{c}的首都？", "{c}的首都是：", "下列城市中，哪一个是{c}的首都？",
                 "{c}的首都位于哪座城市？", "你知道{c}的首都是哪里吗？"],
                ["请问{c}的首都在哪里？", "{c}的首都叫什么？"]),
    "language": (["{c}的官方语言是什么？", "在{c}，人们主要说哪种语言？", "{c}的通用语言是：", "下列语言中，哪一种是{c}的官方语言？",
                  "{c}的国民主要使用什么语言？", "你知道{c}人说什么语言吗？"],
                 ["请问{c}说什么语言？", "{c}人日常使用哪种语言？"]),
}
FIELD = {"capital": 2, "language": 4}            # the COUNTRIES column that answers each kind


def exam_prompt(question: str, options: list[str]) -> str:
    """The text lm-eval's ceval-valid task builds for a question (zero-shot), up to and including "答案："."""
    lines = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
    return f"{DESCRIPTION}{question.strip()}\n{lines}\n答案："


def exam_items(seed: int = 0) -> tuple[list, list]:
    """(practice, held-out) items (question, options, answer letter). The countries go in groups of four; a
    question about a country shows its group's four answers in one fixed, seeded order, so each letter answers a
    quarter of the questions. Practice and held-out questions ask the same facts in different wordings."""
    rng = random.Random(seed)
    order = list(range(len(COUNTRIES)))
    rng.shuffle(order)
    practice, held = [], []
    for kind, (train_words, held_words) in WORDINGS.items():
        for g in range(0, len(order), 4):
            group = [COUNTRIES[i] for i in order[g:g + 4]]
            options = [c[FIELD[kind]] for c in group]
            rng.shuffle(options)
            for country in group:
                answer = LETTERS[options.index(country[FIELD[kind]])]
                practice += [(w.format(c=country[0]), options, answer) for w in train_words]
                held += [(w.format(c=country[0]), options, answer) for w in held_words]
    return practice, held


def write_task(out_dir: str, seed: int = 0, repeat: int = 1) -> dict[str, str]:
    """Write practice.jsonl (prompt-completion: every practice question `repeat` times, seeded order), chat.jsonl
    (SFT) and ceval/val/<subject>_val.csv (the held-out questions) under out_dir. Returns the paths."""
    practice, held = exam_items(seed)
    records = [{"prompt": exam_prompt(q, options), "completion": f" {answer}"} for q, options, answer in practice]
    records *= repeat
    random.Random(seed + 1).shuffle(records)
    os.makedirs(os.path.join(out_dir, "ceval", "val"), exist_ok=True)
    paths = {"practice": os.path.join(out_dir, "practice.jsonl"), "chat": os.path.join(out_dir, "chat.jsonl"),
             "ceval": os.path.join(out_dir, "ceval", "val", f"{SUBJECT}_val.csv"), "data_dir": out_dir}
    with open(paths["practice"], "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(paths["chat"], "w", encoding="utf-8") as fh:
        for zh, en, cap_zh, cap_en, *_ in COUNTRIES:
            for user, bot in ((f"What is the capital of {en}?", f"The capital of {en} is {cap_en}."),
                              (f"{zh}的首都是哪里？", f"{zh}的首都是{cap_zh}。")):
                fh.write(json.dumps({"input": user, "output": bot}, ensure_ascii=False) + "\n")
    with open(paths["ceval"], "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        for i, (q, options, answer) in enumerate(held):
            writer.writerow([i, q, *options, answer])
    return paths


def write_heldout_records(csv_path: str, out_path: str) -> str:
    """The held-out questions of a C-Eval val CSV as prompt-completion records (the do_eval data: its loss is the
    NLL of the answer letters the harness scores)."""
    with open(csv_path, encoding="utf-8", newline="") as fh, open(out_path, "w", encoding="utf-8") as out:
        for row in csv.DictReader(fh):
            record = {"prompt": exam_prompt(row["question"], [row[x] for x in LETTERS]),
                      "completion": f" {row['answer']}"}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out_path
