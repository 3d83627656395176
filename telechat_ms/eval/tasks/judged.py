"""Judge-scored benchmarks: the evaluated system writes its answers in the judge's input format; no judge runs here.

MT-bench: FastChat's mt_bench/question.jsonl ({question_id, category, turns: [2 turns]}); each turn is answered
through the chat template with the earlier turns and answers in the conversation; answers go to
OUT/mt_bench/model_answer/MODEL_ID.jsonl as FastChat's gen_model_answer writes them ({question_id, answer_id,
model_id, choices: [{index: 0, turns: [...]}], tstamp}), ready for `gen_judgment.py`.
AlignBench: alignbench/data_release.jsonl ({question_id, category, subcategory, question, ...}); answers go to
OUT/alignbench/model_answer/MODEL_ID.jsonl as its get_answers.py writes them (the question record + model_id,
answer_id, answer), ready for its judge.py. Decoding is greedy (the judges' scripts sample; say so with the scores).
"""
from __future__ import annotations

import os
from typing import Any

from telechat_ms.chat_template import apply_chat_template
from telechat_ms.eval.tasks.base import LayoutError, Metric, Sample, TaskSpec, read_jsonl

MT_LAYOUT = "mt_bench/question.jsonl, one {question_id, category, turns: [str, ...]} a line (FastChat's release)"
ALIGN_LAYOUT = ("alignbench/data_release.jsonl, one {question_id, category, subcategory, question} a line "
                "(AlignBench's release)")


def chat_prompt(turns: list[str], answers: list[str]) -> str:
    """The chat-template text that asks turn len(answers) after the earlier turns and answers."""
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(turns[: len(answers) + 1]):
        messages.append({"role": "user", "content": turn})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return apply_chat_template(messages, add_generation_prompt=True)


def load_mtbench(data_dir: str, num_fewshot: int) -> list[Sample]:
    path = os.path.join(data_dir, "mt_bench", "question.jsonl")
    docs = read_jsonl(path, {"question_id": (int, str), "turns": list}, MT_LAYOUT)
    for d in docs:
        if not d["turns"] or not all(isinstance(t, str) for t in d["turns"]):
            raise LayoutError(path, "turns must be a non-empty list of strings", MT_LAYOUT, d["_line"])
    return [Sample("mt_bench", i, d.get("category", ""), chat_prompt(d["turns"], []), None, until=(),
                   max_gen_toks=1024, turns=list(d["turns"]),
                   doc={"question_id": d["question_id"], "category": d.get("category", "")})
            for i, d in enumerate(docs)]


def load_alignbench(data_dir: str, num_fewshot: int) -> list[Sample]:
    path = os.path.join(data_dir, "alignbench", "data_release.jsonl")
    docs = read_jsonl(path, {"question_id": (int, str), "category": str, "question": str}, ALIGN_LAYOUT)
    return [Sample("alignbench", i, d["category"], chat_prompt([d["question"]], []), None, until=(),
                   max_gen_toks=1024, doc={k: v for k, v in d.items() if k != "_line"})
            for i, d in enumerate(docs)]


def score(sample: Sample, result: dict[str, Any]) -> dict[str, Any]:
    return {"extracted": None, "pred": None, "correct": None}


def aggregate(samples: list[Sample], logs: list[dict[str, Any]]) -> list[Metric]:
    task = samples[0].task if samples else ""
    return [Metric(task, "answers_written", float(len(logs)), len(logs), None)]


TASKS = [TaskSpec("mt_bench", "judge", load_mtbench, score, aggregate, 0, "MT-bench", "answers_written"),
         TaskSpec("alignbench", "judge", load_alignbench, score, aggregate, 0, "AlignBench", "answers_written")]
