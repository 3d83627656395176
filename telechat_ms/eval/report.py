"""The results table: every metric beside the published score of the evaluated size (spec section 11), written as
markdown and JSON (atomically), plus per-subject breakdowns."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from typing import Any

from telechat_ms.eval.tasks.base import Metric
from telechat_ms.io import atomic_write_text

# spec section 11: the TeleChat2 README (115B) and the MoE README (the other sizes)
PUBLISHED: dict[str, dict[str, float]] = {
    "C-Eval": {"115b": 86.9, "35b": 85, "39b-a12b": 89, "7b": 82, "3b": 75},
    "MMLU": {"115b": 80.9, "35b": 82, "39b-a12b": 83, "7b": 79.6, "3b": 72.9},
    "CMMLU": {"115b": 89.94, "35b": 90.18, "39b-a12b": 90, "7b": 84.6, "3b": 73},
    "GSM8K": {"115b": 92.2, "35b": 91, "39b-a12b": 83.5, "7b": 86.8, "3b": 64.7},
    "HumanEval": {"115b": 75, "35b": 73, "39b-a12b": 68, "7b": 56, "3b": 38},
    "MBPP": {"115b": 78, "35b": 75, "39b-a12b": 67, "7b": 62.6, "3b": 47},
    "BBH": {"115b": 89.04},
    "AlignBench": {"115b": 8.03, "35b": 7.88, "39b-a12b": 7.56, "7b": 6.96, "3b": 5.74},
    "MT-bench": {"115b": 8.89},
    "IFEval": {"115b": 82.81, "35b": 79.63, "39b-a12b": 76.48, "7b": 73.1, "3b": 61.29},
}


def published_score(benchmark: str | None, size: str | None) -> float | None:
    if not benchmark or not size:
        return None
    return PUBLISHED.get(benchmark, {}).get(size.lower())


def _fmt(x: float | None, scale: float = 100.0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * scale:.2f}"


def rows_with_published(metrics: list[Metric], primary: dict[str, tuple[str | None, str]],
                        size: str | None) -> list[dict[str, Any]]:
    """JSON rows: task, metric, value, n, stderr (+ subject, and published where the row is the task's headline)."""
    out = []
    for m in metrics:
        row = asdict(m)
        bench, headline = primary.get(m.task, (None, ""))
        if not m.subject and m.metric == headline:
            row["published"] = published_score(bench, size)
            row["benchmark"] = bench
        out.append(row)
    return out


def markdown(rows: list[dict[str, Any]], model: str, size: str | None) -> str:
    """The headline table (per-subject breakdowns below it)."""
    lines = [f"# Evaluation of {model}" + (f" (published scores: TeleChat2-{size.upper()})" if size else ""), "",
             "| task | metric | value | stderr | n | published |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["subject"]:
            continue
        scale = 1.0 if r["metric"] in ("answers_written", "loss", "perplexity", "tokens") else 100.0
        pub = r.get("published")
        lines.append(f"| {r['task']} | {r['metric']} | {_fmt(r['value'], scale)} | {_fmt(r['stderr'], scale)} | "
                     f"{r['n']} | {'-' if pub is None else pub} |")
    subjects = [r for r in rows if r["subject"]]
    if subjects:
        lines += ["", "## Per subject", "", "| task | subject | metric | value | n |", "|---|---|---|---|---|"]
        for r in subjects:
            lines.append(f"| {r['task']} | {r['subject']} | {r['metric']} | {_fmt(r['value'])} | {r['n']} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, payload: dict[str, Any], md: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
    atomic_write_text(jpath, json.dumps(payload, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(mpath, md)
    return jpath, mpath
