"""Multiple-choice exams: C-Eval (val), MMLU (test), CMMLU (test), read from their official release layouts and
prompted as lm-eval 0.4.13's tasks `ceval-valid_*`, `mmlu_*`, `cmmlu_*` build them (first-n shots from dev).

Prompt of one question (lm-eval's plain-text fewshot_context): the subject's description, then every shot as
doc_to_text + " " + its answer letter + "\\n\\n", then doc_to_text of the question; doc_to_text is
"{question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:" (MMLU) or "...\\n答案：" (C-Eval, CMMLU). The
choices scored are the continuations " A", " B", " C", " D" (target delimiter + letter); pred = argmax.

`--prompt-style chat` (CHAT_TASKS): the same questions and shots as a conversation through the chat template (each
shot a user turn answered by its letter), the answer generated greedily, pred = the first A-D standing alone in it.
"""
from __future__ import annotations

import json
import os
import re
from importlib import resources
from typing import Any

from telechat_ms.chat_template import apply_chat_template
from telechat_ms.eval.tasks.base import LayoutError, Metric, Sample, TaskSpec, mean_stderr, read_csv, subjects_in

LETTERS = ("A", "B", "C", "D")
CHOICES = [" " + x for x in LETTERS]     # lm-eval's target_delimiter " " + doc_to_choice

CEVAL_LAYOUT = ("ceval/{dev,val}/{subject}_{dev,val}.csv with header id,question,A,B,C,D,answer[,explanation] "
                "(C-Eval's release)")
MMLU_LAYOUT = ("mmlu/data/{dev,test}/{subject}_{dev,test}.csv, no header, columns question,A,B,C,D,answer "
               "(MMLU's release)")
CMMLU_LAYOUT = "cmmlu/{dev,test}/{subject}.csv with header ,Question,A,B,C,D,Answer (CMMLU's release)"


def descriptions(family: str) -> dict[str, str]:
    """Subject -> the description lm-eval's task YAML puts before the shots (extracted from lm-eval 0.4.13)."""
    text = resources.files("telechat_ms.eval.tasks").joinpath("subjects.json").read_text(encoding="utf-8")
    return {k: v["description"] for k, v in json.loads(text)[family].items()}


def _question(q: str, a: str, b: str, c: str, d: str, answer_cue: str) -> str:
    return f"{q.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n{answer_cue}"


def _rows(path: str, family: str) -> list[dict[str, Any]]:
    """Rows of one subject file as {question, A, B, C, D, answer, _line}."""
    if family == "mmlu":
        rows = read_csv(path, None, MMLU_LAYOUT)
        out = []
        for r in rows:
            if len(r) - 1 < 6:
                raise LayoutError(path, f"{len(r) - 1} columns, expected 6 (question,A,B,C,D,answer)", MMLU_LAYOUT,
                                  int(r["_line"]))
            out.append(dict(question=r["0"], A=r["1"], B=r["2"], C=r["3"], D=r["4"], answer=r["5"], _line=r["_line"]))
    elif family == "ceval":
        out = read_csv(path, ["id", "question", "A", "B", "C", "D", "answer"], CEVAL_LAYOUT)
    else:
        rows = read_csv(path, ["Question", "A", "B", "C", "D", "Answer"], CMMLU_LAYOUT)
        out = [dict(question=r["Question"], A=r["A"], B=r["B"], C=r["C"], D=r["D"], answer=r["Answer"],
                    _line=r["_line"]) for r in rows]
    layout = {"mmlu": MMLU_LAYOUT, "ceval": CEVAL_LAYOUT}.get(family, CMMLU_LAYOUT)
    for r in out:
        r["answer"] = r["answer"].strip()
        if r["answer"] not in LETTERS:
            raise LayoutError(path, f"answer {r['answer']!r} is not one of A, B, C, D", layout, int(r["_line"]))
    return out


_FAMILY = {
    # family: (eval split dir, dev dir, file suffix of eval, of dev, answer cue, layout)
    "ceval": ("val", "dev", "_val.csv", "_dev.csv", "答案：", CEVAL_LAYOUT),
    "mmlu": ("data/test", "data/dev", "_test.csv", "_dev.csv", "Answer:", MMLU_LAYOUT),
    "cmmlu": ("test", "dev", ".csv", ".csv", "答案：", CMMLU_LAYOUT),
}


def _subject_rows(family: str, data_dir: str, num_fewshot: int):
    """(subject, description, shot rows, question rows) of every subject, sorted by subject."""
    split, dev, suffix, dev_suffix, cue, layout = _FAMILY[family]
    root = os.path.join(data_dir, family)
    if family == "mmlu" and not os.path.isdir(os.path.join(root, "data")) and os.path.isdir(os.path.join(root, "test")):
        split, dev = "test", "dev"            # the tarball's data/ folder itself given as mmlu/
    known = descriptions(family)
    for subject in subjects_in(os.path.join(root, split), suffix, layout):
        if subject not in known:
            raise LayoutError(os.path.join(root, split, subject + suffix),
                              f"unknown subject {subject!r} (the release has {len(known)})", layout)
        shots: list[dict[str, Any]] = []
        if num_fewshot > 0:
            dev_path = os.path.join(root, dev, subject + dev_suffix)
            shots = _rows(dev_path, family)
            if len(shots) < num_fewshot:
                raise LayoutError(dev_path, f"{len(shots)} dev questions, --num-fewshot asks {num_fewshot}",
                                  layout)
        yield subject, known[subject], shots[:num_fewshot], _rows(os.path.join(root, split, subject + suffix), family)


def _text(family: str, r: dict[str, Any]) -> str:
    return _question(r["question"], r["A"], r["B"], r["C"], r["D"], _FAMILY[family][4])


def load_exam(family: str, data_dir: str, num_fewshot: int) -> list[Sample]:
    """Every question of every subject (sorted by subject, file order within), prompts with num_fewshot shots."""
    samples: list[Sample] = []
    for subject, description, shot_rows, rows in _subject_rows(family, data_dir, num_fewshot):
        shots = "".join(_text(family, r) + " " + r["answer"] + "\n\n" for r in shot_rows)
        for r in rows:
            samples.append(Sample(family, len(samples), subject, description + shots + _text(family, r),
                                  LETTERS.index(r["answer"]), choices=list(CHOICES)))
    return samples


CHAT_MAX_TOKENS = 32      # the letter, and room for a chat model's "答案是 B" / "The answer is B."


def chat_messages(family: str, description: str, shot_rows: list[dict[str, Any]], row: dict[str, Any]
                  ) -> list[dict[str, str]]:
    """The conversation of `--prompt-style chat`: every shot a user turn (its question) answered by its letter,
    then the question; the subject's description opens the first user turn."""
    messages: list[dict[str, str]] = []
    for r in [*shot_rows, row]:
        lead = description if not messages else ""
        messages.append({"role": "user", "content": lead + _text(family, r)})
        if r is not row:
            messages.append({"role": "assistant", "content": r["answer"]})
    return messages


def load_exam_chat(family: str, data_dir: str, num_fewshot: int) -> list[Sample]:
    """The questions of load_exam (same doc ids) as chat prompts: the conversation of `chat_messages` rendered by
    the chat template with the assistant's turn opened; the answer is generated greedily."""
    samples: list[Sample] = []
    for subject, description, shot_rows, rows in _subject_rows(family, data_dir, num_fewshot):
        for r in rows:
            prompt = apply_chat_template(chat_messages(family, description, shot_rows, r), add_generation_prompt=True)
            samples.append(Sample(family, len(samples), subject, prompt, LETTERS.index(r["answer"]),
                                  choices=list(LETTERS), until=(), max_gen_toks=CHAT_MAX_TOKENS))
    return samples


_LETTER = re.compile(r"(?<![A-Za-z])[ABCD](?![A-Za-z])")


def extract_letter(text: str) -> str | None:
    """The first of A-D standing alone in a generation ("B", "B. 32", "答案：B", "The answer is (B)"; not the A of
    "Answer"), or None."""
    m = _LETTER.search(text or "")
    return m.group(0) if m else None


def score_letter(sample: Sample, result: dict[str, Any]) -> dict[str, Any]:
    """pred = index of the extracted letter (None when the generation names none: wrong)."""
    letter = extract_letter(result["generation"])
    pred = None if letter is None else LETTERS.index(letter)
    return {"extracted": letter, "pred": pred, "correct": pred == sample.target}


def score_choice(sample: Sample, result: dict[str, Any]) -> dict[str, Any]:
    """pred = argmax of the choices' summed log-likelihoods (first on ties, as numpy and lm-eval)."""
    lls = result["loglikelihoods"]
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
    return {"pred": pred, "correct": pred == sample.target, "extracted": None}


def aggregate_acc(samples: list[Sample], logs: list[dict[str, Any]]) -> list[Metric]:
    """acc over all questions (lm-eval's group score weighted by size) and per subject."""
    task = samples[0].task if samples else ""
    values = [float(x["correct"]) for x in logs]
    mean, se = mean_stderr(values)
    out = [Metric(task, "acc", mean, len(values), se)]
    by: dict[str, list[float]] = {}
    for s, x in zip(samples, logs):
        by.setdefault(s.subject, []).append(float(x["correct"]))
    for subject in sorted(by):
        m, e = mean_stderr(by[subject])
        out.append(Metric(task, "acc", m, len(by[subject]), e, subject))
    return out


def _spec(family: str, published: str) -> TaskSpec:
    return TaskSpec(family, "multiple_choice", lambda d, k: load_exam(family, d, k), score_choice, aggregate_acc,
                    default_fewshot=5, published=published, primary="acc")


def _chat_spec(family: str, published: str) -> TaskSpec:
    return TaskSpec(family, "generate", lambda d, k: load_exam_chat(family, d, k), score_letter, aggregate_acc,
                    default_fewshot=5, published=published, primary="acc")


TASKS = [_spec("ceval", "C-Eval"), _spec("mmlu", "MMLU"), _spec("cmmlu", "CMMLU")]
CHAT_TASKS = [_chat_spec("ceval", "C-Eval"), _chat_spec("mmlu", "MMLU"), _chat_spec("cmmlu", "CMMLU")]
