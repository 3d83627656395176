"""Training logs: one line every N steps, metrics.jsonl every step, a progress bar on a terminal,
TensorBoard events (tensorboardX) and a loss-curve PNG at the end."""
from __future__ import annotations

import json
import os
import sys
import time


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Collects per-step metrics on the main rank; silent elsewhere."""

    def __init__(self, out_dir: str, total_steps: int, enabled: bool = True, log_interval: int = 10,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.out_dir = out_dir
        self.total = total_steps
        self.interval = max(log_interval, 1)
        self.start = time.perf_counter()
        self.steps_run = 0
        self.history: list[dict] = []
        self.bar = None
        self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                self.tb = None

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def step(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int, seconds: float,
             supervised: int = 0, extra: dict | None = None) -> None:
        """Record one optimizer step; `tokens` = all tokens the step processed (the throughput), `supervised` =
        the targets its loss averaged over; `extra` = more fields of the record (MoE router statistics)."""
        if not self.enabled:
            return
        self.steps_run += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.steps_run * (self.total - step)
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                  "supervised_tokens": supervised,
                  "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "step_s": seconds,
                  "elapsed_s": elapsed, **(extra or {})}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "aux_loss", "dropped_fraction"):
                if key in record:
                    self.tb.add_scalar(f"train/{key}", record[key], step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if step % self.interval == 0 or step == self.total:
            self.info(f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.3e} | grad_norm {grad_norm:.3f} | "
                      f"tok/s {record['tokens_per_s']:.0f} | elapsed {_hms(elapsed)} | eta {_hms(eta)}")

    def close(self, loss_curve: bool = True) -> str | None:
        """Flush files; draw loss_curve.png from the whole metrics.jsonl (resumed runs included)."""
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()
        if not loss_curve:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.info("matplotlib is not installed: no loss_curve.png")
            return None
        steps, losses = [], []
        with open(os.path.join(self.out_dir, "metrics.jsonl"), encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                steps.append(rec["step"])
                losses.append(rec["loss"])
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, losses, lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(self.out_dir, "loss_curve.png")
        fig.savefig(path)
        plt.close(fig)
        return path
