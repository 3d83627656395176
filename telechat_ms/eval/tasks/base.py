"""What every benchmark module shares: the sample a task hands the scorer, the readers of the official files (CSV,
JSON lines, JSON) and the error that names the file, the line and the layout the file should have had."""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from telechat_ms.errors import DataError


class LayoutError(DataError):
    """A benchmark file is missing or malformed: the message names the path, the line and the expected layout."""

    def __init__(self, path: str, problem: str, layout: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem} (expected layout: {layout})")
        self.path, self.line, self.layout = path, line, layout


@dataclass
class Sample:
    """One scored item: a multiple-choice question (choices + target index) or a generation prompt."""

    task: str                      # benchmark name (ceval, mmlu, ...)
    doc_id: int                    # index in the task's evaluation order (stable: resume and DP splits key on it)
    subject: str                   # per-subject breakdown ("" when the task has none)
    prompt: str                    # the exact text scored (the context) or generated from
    target: Any                    # the gold answer: choice index, number string, tests ...
    choices: list[str] | None = None          # the continuations scored (multiple choice)
    until: tuple[str, ...] = ()               # stop strings (generation)
    max_gen_toks: int = 256
    turns: list[str] | None = None            # multi-turn prompts (MT-bench): prompt is the first turn
    doc: dict[str, Any] = field(default_factory=dict)   # what the scorer of the task needs beyond the above

    @property
    def key(self) -> str:
        """The sample's identity in a --resume file."""
        return f"{self.task}/{self.doc_id}"


@dataclass
class Metric:
    """One row of the results table."""

    task: str
    metric: str
    value: float
    n: int
    stderr: float | None = None
    subject: str = ""


def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and the standard error of the mean (sample stdev / sqrt n), as lm-eval reports it."""
    n = len(values)
    if n == 0:
        return float("nan"), None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def require_file(path: str, layout: str) -> str:
    """`path` when it is a file, else the LayoutError naming it."""
    if not os.path.isfile(path):
        raise LayoutError(path, "file not found", layout)
    return path


def require_dir(path: str, layout: str) -> str:
    if not os.path.isdir(path):
        raise LayoutError(path, "directory not found", layout)
    return path


def read_csv(path: str, header: list[str] | None, layout: str) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts. With `header`, the file's first row must hold those columns (extra columns are
    kept); without it the file has no header and the columns are named by `layout_columns` of the caller."""
    require_file(path, layout)
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh))
    if header is None:
        return [{str(i): v for i, v in enumerate(r)} | {"_line": str(n)} for n, r in enumerate(rows, 1)]
    if not rows:
        raise LayoutError(path, "the file is empty", layout, 1)
    names = [c.strip() for c in rows[0]]
    missing = [c for c in header if c not in names]
    if missing:
        raise LayoutError(path, f"header {names} lacks column(s) {missing}", layout, 1)
    out = []
    for n, r in enumerate(rows[1:], 2):
        if not any(c.strip() for c in r):
            continue
        if len(r) < len(names):
            raise LayoutError(path, f"{len(r)} columns, the header has {len(names)}", layout, n)
        out.append(dict(zip(names, r)) | {"_line": str(n)})
    return out


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8-sig")


def read_jsonl(path: str, fields: dict[str, type | tuple[type, ...]], layout: str) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file (.gz too), each checked for `fields` (name -> type); blank lines skipped."""
    require_file(path, layout)
    out = []
    try:
        with _open_text(path) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LayoutError(path, f"not JSON: {exc.msg} (column {exc.colno})", layout, n) from None
                check_fields(obj, fields, path, layout, n)
                obj["_line"] = n
                out.append(obj)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise LayoutError(path, f"cannot read: {exc}", layout) from None
    if not out:
        raise LayoutError(path, "no records", layout)
    return out


def read_json(path: str, layout: str) -> Any:
    require_file(path, layout)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise LayoutError(path, f"not JSON: {exc.msg} (column {exc.colno})", layout, exc.lineno) from None


def check_fields(obj: Any, fields: dict[str, type | tuple[type, ...]], path: str, layout: str,
                 line: int | None) -> None:
    if not isinstance(obj, dict):
        raise LayoutError(path, f"a {type(obj).__name__}, not an object", layout, line)
    for name, kind in fields.items():
        if name not in obj:
            raise LayoutError(path, f"field {name!r} is missing", layout, line)
        if not isinstance(obj[name], kind):
            want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise LayoutError(path, f"field {name!r} is a {type(obj[name]).__name__}, expected {want}", layout,
                              line)


def subjects_in(directory: str, suffix: str, layout: str) -> list[str]:
    """Subject names of the files `{subject}{suffix}` in a directory, sorted."""
    require_dir(directory, layout)
    names = sorted(f[: -len(suffix)] for f in os.listdir(directory) if f.endswith(suffix))
    if not names:
        raise LayoutError(directory, f"no *{suffix} files", layout)
    return names


@dataclass
class TaskSpec:
    """A benchmark: how to load its samples and how to score one answer."""

    name: str
    kind: str                                   # "multiple_choice" | "generate" | "judge" | "perplexity"
    load: Callable[..., list[Sample]]           # load(data_dir, num_fewshot) -> samples
    score: Callable[[Sample, dict[str, Any]], dict[str, Any]] | None = None   # (sample, result) -> log fields
    aggregate: Callable[[list[Sample], list[dict[str, Any]]], list[Metric]] | None = None
    default_fewshot: int = 0
    published: str | None = None                # name in the published table (spec section 11)
    primary: str = "acc"                        # the metric compared with the published score


def iter_subjects(subjects: list[str], wanted: list[str] | None) -> Iterator[str]:
    for s in subjects:
        if wanted is None or s in wanted:
            yield s
