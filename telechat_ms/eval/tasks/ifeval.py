"""IFEval from its release (ifeval/input_data.jsonl: {key, prompt, instruction_id_list, kwargs}), as lm-eval 0.4.13's
task `ifeval`: the prompt as is, greedy, no stop string, at most 1280 tokens, scored by lm-eval's own instruction
checkers (lm_eval.tasks.ifeval: prompt- and instruction-level accuracy, strict and loose). The checkers need
langdetect, immutabledict and nltk with its punkt_tab data (`python -m nltk.downloader punkt_tab`)."""
from __future__ import annotations

import os
from typing import Any

from telechat_ms.errors import ConfigError
from telechat_ms.eval.tasks.base import Metric, Sample, TaskSpec, mean_stderr, read_jsonl

LAYOUT = "ifeval/input_data.jsonl, one {key: int, prompt: str, instruction_id_list: [str], kwargs: [object]} a line"
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


def load(data_dir: str, num_fewshot: int) -> list[Sample]:
    path = os.path.join(data_dir, "ifeval", "input_data.jsonl")
    docs = read_jsonl(path, {"key": int, "prompt": str, "instruction_id_list": list, "kwargs": list}, LAYOUT)
    return [Sample("ifeval", i, "", d["prompt"], 0, until=(), max_gen_toks=1280,
                   doc={k: d[k] for k in ("key", "prompt", "instruction_id_list", "kwargs")})
            for i, d in enumerate(docs)]


def _checkers():
    try:
        from lm_eval.tasks.ifeval import utils
    except ImportError as exc:
        raise ConfigError(f"ifeval is scored by lm-eval's instruction checkers: pip install 'lm-eval==0.4.13' "
                          f"langdetect immutabledict nltk ({exc})") from None
    return utils


def score(sample: Sample, result: dict[str, Any]) -> dict[str, Any]:
    # lm-eval's checkers drop kwargs that are None themselves (its HF dataset fills absent keys with None)
    doc = dict(sample.doc, kwargs=[{k: v for k, v in kw.items() if v is not None} for kw in sample.doc["kwargs"]])
    try:
        out = _checkers().process_results(doc, [result["generation"]])
    except LookupError as exc:   # nltk data missing
        raise ConfigError(f"ifeval: an instruction checker needs nltk data: {str(exc).strip().splitlines()[0]} "
                          "(python -m nltk.downloader punkt_tab)") from None
    return {"extracted": None, "pred": out["prompt_level_strict_acc"], "correct": out["prompt_level_strict_acc"],
            "ifeval": out}


def aggregate(samples: list[Sample], logs: list[dict[str, Any]]) -> list[Metric]:
    rows = []
    for name in METRICS:
        if name.startswith("inst"):
            values = [float(v) for x in logs for v in x["ifeval"][name]]
        else:
            values = [float(x["ifeval"][name]) for x in logs]
        m, se = mean_stderr(values)
        rows.append(Metric("ifeval", name, m, len(values), se if name.startswith("prompt") else None))
    return rows


TASKS = [TaskSpec("ifeval", "generate", load, score, aggregate, 0, "IFEval", "prompt_level_strict_acc")]
