"""Multiple-choice exams: C-Eval (val), MMLU (test), CMMLU (test), read from their official release layouts and
prompted as lm-eval 0.4.13's tasks `ceval-valid_*`, `mmlu_*`, `cmmlu_*` build them (first-n shots from dev).

Prompt of one question (lm-eval's plain-text fewshot_context): the subject's description, then every shot as
doc_to_text + " " + its answer letter + "\\n\\n", then doc_to_text of the question; doc_to_text is
"{question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:" (MMLU) or "...\\n答案：" (C-Eval, CMMLU). The
choices scored are the continuations " A", " B", " C", " D" (target delimiter + letter); pred = argmax.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any

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


def load_exam(family: str, data_dir: str, num_fewshot: int) -> list[Sample]:
    """Every question of every subject (sorted by subject, file order within), prompts with num_fewshot shots."""
    split, dev, suffix, dev_suffix, cue, layout = _FAMILY[family]
    root = os.path.join(data_dir, family)
    if family == "mmlu" and not os.path.isdir(os.path.join(root, "data")) and os.path.isdir(os.path.join(root, "test")):
        split, dev = "test", "dev"            # the tarball's data/ folder itself given as mmlu/
    known = descriptions(family)
    samples: list[Sample] = []
    for subject in subjects_in(os.path.join(root, split), suffix, layout):
        if subject not in known:
            raise LayoutError(os.path.join(root, split, subject + suffix),
                              f"unknown subject {subject!r} (the release has {len(known)})", layout)
        shots = ""
        if num_fewshot > 0:
            dev_path = os.path.join(root, dev, subject + dev_suffix)
            dev_rows = _rows(dev_path, family)
            if len(dev_rows) < num_fewshot:
                raise LayoutError(dev_path, f"{len(dev_rows)} dev questions, --num-fewshot asks {num_fewshot}",
                                  layout)
            shots = "".join(_question(r["question"], r["A"], r["B"], r["C"], r["D"], cue) + " " + r["answer"]
                            + "\n\n" for r in dev_rows[:num_fewshot])
        for r in _rows(os.path.join(root, split, subject + suffix), family):
            prompt = known[subject] + shots + _question(r["question"], r["A"], r["B"], r["C"], r["D"], cue)
            samples.append(Sample(family, len(samples), subject, prompt, LETTERS.index(r["answer"]),
                                  choices=list(CHOICES)))
    return samples


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


TASKS = [_spec("ceval", "C-Eval"), _spec("mmlu", "MMLU"), _spec("cmmlu", "CMMLU")]
