"""Learning-rate schedules computed on the host: warmup then cosine / linear / constant (torch LambdaLR-like)."""
from __future__ import annotations

import math


def warmup_steps(schedule, total_steps: int) -> int:
    return schedule.warmup_steps or int(round(schedule.warmup_ratio * total_steps))


def lr_at(step: int, schedule, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from 0, then decay to lr_end."""
    peak, end = schedule.learning_rate, schedule.lr_end
    total = schedule.total_steps if schedule.total_steps > 0 else total_steps
    warm = warmup_steps(schedule, total)
    if warm > 0 and step < warm:
        return peak * (step + 1) / warm
    if schedule.type == "constant":
        return peak
    span = max(total - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    if schedule.type == "linear":
        return end + (peak - end) * (1.0 - progress)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
