"""The benchmarks `telechat-ms eval --tasks` knows: one module per family, each listing its TaskSpecs."""
from __future__ import annotations

from telechat_ms.errors import ConfigError
from telechat_ms.eval.tasks import bbh, code, exams, gsm8k, ifeval, judged
from telechat_ms.eval.tasks.base import LayoutError, Metric, Sample, TaskSpec

TASKS: dict[str, TaskSpec] = {t.name: t for m in (exams, gsm8k, bbh, code, ifeval, judged) for t in m.TASKS}
CHAT_TASKS: dict[str, TaskSpec] = {t.name: t for t in exams.CHAT_TASKS}   # --prompt-style chat
PERPLEXITY = "perplexity"      # held-out loss over a process-data MindRecord dir (telechat_ms.train.evaluate)

__all__ = ["CHAT_TASKS", "LayoutError", "Metric", "PERPLEXITY", "Sample", "TASKS", "TaskSpec", "resolve"]


def resolve(names: str | list[str]) -> list[str]:
    """Task names of a --tasks value (comma separated), checked."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not items:
        raise ConfigError("--tasks: give at least one task")
    known = sorted(TASKS) + [PERPLEXITY]
    bad = [n for n in items if n not in known]
    if bad:
        raise ConfigError(f"--tasks: unknown task(s) {bad}; known: {', '.join(known)}")
    return list(dict.fromkeys(items))
