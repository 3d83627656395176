"""Code benchmarks, pass@1 with greedy decoding: HumanEval (humaneval/HumanEval.jsonl.gz) and MBPP (mbpp/mbpp.jsonl),
prompted as lm-eval 0.4.13's `humaneval` and `mbpp` tasks.

HumanEval: the prompt is the function header; generation stops at "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint";
the program is prompt + completion + "\\n" + test + "\\ncheck(entry_point)".
MBPP: test split task_ids 11-510, shots are task_ids 2-4 ("You are an expert Python programmer, and here is your
task: {text} Your code should pass these tests:\\n\\n{3 tests}\\n[BEGIN]\\n{code}\\n[DONE]\\n\\n"); generation stops at
"[DONE]"; the program is the completion + "\\n" + the three tests. A completion holding a ``` block is reduced to its
first block (chat-tuned models fence their code). Programs run only with --allow-code-execution (eval/sandbox.py).
"""
from __future__ import annotations

import os
import re
from typing import Any

from telechat_ms.eval.tasks.base import LayoutError, Metric, Sample, TaskSpec, mean_stderr, read_jsonl

HUMANEVAL_LAYOUT = ("humaneval/HumanEval.jsonl.gz (or .jsonl), one {task_id, prompt, canonical_solution, test, "
                    "entry_point} a line (HumanEval's release)")
MBPP_LAYOUT = "mbpp/mbpp.jsonl, one {task_id, text, code, test_list, test_setup_code, challenge_test_list} a line"
HUMANEVAL_UNTIL = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_TEST_IDS = range(11, 511)
MBPP_SHOT_IDS = (2, 3, 4)
_BLOCK = re.compile(r"```(?:\w+)?\n?(.*?)\n?```", re.DOTALL)


def code_block(text: str) -> str:
    """The first fenced block of `text`, or `text` itself when it has none."""
    if "```" not in text:
        return text
    m = _BLOCK.search(text if text.count("```") >= 2 else text + "\n```")
    return m.group(1) if m else text


def load_humaneval(data_dir: str, num_fewshot: int) -> list[Sample]:
    root = os.path.join(data_dir, "humaneval")
    path = os.path.join(root, "HumanEval.jsonl.gz")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(root, "HumanEval.jsonl")):
        path = os.path.join(root, "HumanEval.jsonl")
    docs = read_jsonl(path, {"task_id": str, "prompt": str, "test": str, "entry_point": str}, HUMANEVAL_LAYOUT)
    return [Sample("humaneval", i, "", d["prompt"], f"{d['test']}\ncheck({d['entry_point']})",
                   until=HUMANEVAL_UNTIL, max_gen_toks=1024, doc={"task_id": d["task_id"]})
            for i, d in enumerate(docs)]


def _mbpp_text(d: dict[str, Any]) -> str:
    t = d["test_list"]
    return (f"You are an expert Python programmer, and here is your task: {d['text']} Your code should pass these "
            f"tests:\n\n{t[0]}\n{t[1]}\n{t[2]}\n[BEGIN]\n")


def load_mbpp(data_dir: str, num_fewshot: int) -> list[Sample]:
    path = os.path.join(data_dir, "mbpp", "mbpp.jsonl")
    docs = read_jsonl(path, {"task_id": int, "text": str, "code": str, "test_list": list}, MBPP_LAYOUT)
    for d in docs:
        if len(d["test_list"]) < 3:
            raise LayoutError(path, f"task {d['task_id']}: test_list has {len(d['test_list'])} tests, the prompt "
                              "shows 3", MBPP_LAYOUT, d["_line"])
    by_id = {d["task_id"]: d for d in docs}
    if num_fewshot > len(MBPP_SHOT_IDS):
        raise LayoutError(path, f"--num-fewshot {num_fewshot}: MBPP's prompt split offers {len(MBPP_SHOT_IDS)} shots",
                          MBPP_LAYOUT)
    missing = [i for i in MBPP_SHOT_IDS[:num_fewshot] if i not in by_id]
    if missing:
        raise LayoutError(path, f"the shot task_ids {missing} are missing", MBPP_LAYOUT)
    head = "".join(_mbpp_text(by_id[i]) + by_id[i]["code"] + "\n[DONE]" + "\n\n" for i in MBPP_SHOT_IDS[:num_fewshot])
    tests = [d for d in docs if d["task_id"] in MBPP_TEST_IDS]
    if not tests:
        raise LayoutError(path, "no task of the test split (task_ids 11-510)", MBPP_LAYOUT)
    return [Sample("mbpp", i, "", head + _mbpp_text(d), "\n".join(d["test_list"][:3]), until=("[DONE]",),
                   max_gen_toks=512, doc={"task_id": d["task_id"]}) for i, d in enumerate(tests)]


def program(sample: Sample, generation: str) -> tuple[str, str]:
    """(the code extracted from the generation, the whole program that tests it)."""
    code = code_block(generation)
    if sample.task == "humaneval":
        body = sample.prompt + code if code is generation else sample.prompt + "\n" + code
        return code, body + "\n" + sample.target
    return code, code + "\n" + sample.target


def score(sample: Sample, result: dict[str, Any]) -> dict[str, Any]:
    """Needs result['execution'] (a sandbox RunResult) set by the runner, which runs the programs in parallel."""
    run = result["execution"]
    code, _ = program(sample, result["generation"])
    return {"extracted": code, "pred": run.status, "correct": run.passed, "execution": run.status}


def aggregate(samples: list[Sample], logs: list[dict[str, Any]]) -> list[Metric]:
    task = samples[0].task if samples else ""
    m, se = mean_stderr([float(x["correct"]) for x in logs])
    return [Metric(task, "pass@1", m, len(logs), se)]


TASKS = [TaskSpec("humaneval", "code", load_humaneval, score, aggregate, 0, "HumanEval", "pass@1"),
         TaskSpec("mbpp", "code", load_mbpp, score, aggregate, 3, "MBPP", "pass@1")]
