"""BIG-Bench Hard from its release (bbh/bbh/{task}.json with {"examples": [{"input", "target"}]} and
bbh/cot-prompts/{task}.txt), prompted as lm-eval 0.4.13's `bbh_cot_fewshot_*`: the prompt file's description + "\\n\\n",
its chain-of-thought shots as "Q: {input}\\nA: Let's think step by step.\\n{target}\\n\\n", then
"Q: {input}\\nA: Let's think step by step.\\n"; greedy until "</s>", "Q", "\\n\\n" (at most 1024 tokens). The answer
is what follows "the answer is " up to its last character (lm-eval's filter), compared exactly with the target."""
from __future__ import annotations

import os
import re
from typing import Any

from telechat_ms.eval.tasks.base import LayoutError, Metric, Sample, TaskSpec, mean_stderr, read_json, subjects_in

LAYOUT = ('bbh/bbh/{task}.json = {"examples": [{"input": str, "target": str}]} and bbh/cot-prompts/{task}.txt '
          "(description, then 'Q: ...\\nA: Let's think step by step.\\n...So the answer is X.' shots) (BBH's release)")
UNTIL = ("</s>", "Q", "\n\n")
ANSWER = re.compile(r"(?<=the answer is )(.*)(?=.)")
_COT = "A: Let's think step by step.\n"


def parse_cot_prompt(path: str) -> tuple[str, list[tuple[str, str]]]:
    """(description, [(input, target)]) of a cot-prompts file."""
    with open(path, encoding="utf-8") as fh:
        lines = [ln for ln in fh.read().splitlines() if ln.strip() != "-----" and not ln.startswith("BENCHMARK DATA")
                 and "canary GUID" not in ln]
    text = "\n".join(lines).strip("\n")
    parts = re.split(r"\n\n(?=Q: )", text)
    description, shots = parts[0].strip(), []
    if description.startswith("Q: "):
        raise LayoutError(path, "no task description before the first 'Q: '", LAYOUT, 1)
    for part in parts[1:]:
        if _COT not in part:
            line = text[: text.find(part)].count("\n") + 1
            raise LayoutError(path, f"shot without {_COT.strip()!r}", LAYOUT, line)
        q, target = part.split(_COT, 1)
        shots.append((q[len("Q: "):].rstrip("\n"), target.strip("\n")))
    return description, shots


def load(data_dir: str, num_fewshot: int) -> list[Sample]:
    root = os.path.join(data_dir, "bbh")
    data = os.path.join(root, "bbh") if os.path.isdir(os.path.join(root, "bbh")) else root
    samples = []
    for task in subjects_in(data, ".json", LAYOUT):
        path = os.path.join(data, task + ".json")
        obj = read_json(path, LAYOUT)
        if not isinstance(obj, dict) or not isinstance(obj.get("examples"), list):
            raise LayoutError(path, "no 'examples' list", LAYOUT, 1)
        prompt_path = os.path.join(root, "cot-prompts", task + ".txt")
        if not os.path.isfile(prompt_path):
            raise LayoutError(prompt_path, "file not found", LAYOUT)
        description, shots = parse_cot_prompt(prompt_path)
        if len(shots) < num_fewshot:
            raise LayoutError(prompt_path, f"{len(shots)} shots, --num-fewshot asks {num_fewshot}", LAYOUT)
        head = description + "\n\n" + "".join(f"Q: {q}\n{_COT}{t}\n\n" for q, t in shots[:num_fewshot])
        for j, ex in enumerate(obj["examples"]):
            if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) \
                    or not isinstance(ex.get("target"), str):
                raise LayoutError(path, f"examples[{j}] lacks string 'input' / 'target'", LAYOUT)
            samples.append(Sample("bbh", len(samples), task, head + f"Q: {ex['input']}\n{_COT}", ex["target"],
                                  until=UNTIL, max_gen_toks=1024))
    return samples


def extract(text: str) -> str | None:
    m = ANSWER.search(text)
    return m.group(1) if m else None


def score(sample: Sample, result: dict[str, Any]) -> dict[str, Any]:
    got = extract(result["generation"])
    return {"extracted": got, "pred": got, "correct": got is not None and got == sample.target}


def aggregate(samples: list[Sample], logs: list[dict[str, Any]]) -> list[Metric]:
    """exact_match over all examples (lm-eval's bbh group: weight_by_size) and per task."""
    by: dict[str, list[float]] = {}
    for s, x in zip(samples, logs):
        by.setdefault(s.subject, []).append(float(x["correct"]))
    rows = []
    for task in sorted(by):
        m, se = mean_stderr(by[task])
        rows.append(Metric("bbh", "exact_match", m, len(by[task]), se, task))
    mean, se = mean_stderr([float(x["correct"]) for x in logs])
    return [Metric("bbh", "exact_match", mean, len(logs), se)] + rows


TASKS = [TaskSpec("bbh", "generate", load, score, aggregate, default_fewshot=3, published="BBH",
                  primary="exact_match")]
