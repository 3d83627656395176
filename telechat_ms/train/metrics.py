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
             supervised: int = 0, extra: dict | None = None, evaluation: dict | None = None) -> None:
        """Record one optimizer step; `tokens` = all tokens the step processed (the throughput), `supervised` =
        the targets its loss averaged over; `extra` = more fields of the record (MoE router statistics);
        `evaluation` = the eval_* fields of a do_eval evaluation after it."""
        if not self.enabled:
            return
        self.steps_run += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.steps_run * (self.total - step)
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                  "supervised_tokens": supervised,
                  "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "step_s": seconds,
                  "elapsed_s": elapsed, **(extra or {}), **(evaluation or {})}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "aux_loss", "dropped_fraction"):
                if key in record:
                    self.tb.add_scalar(f"train/{key}", record[key], step)
            if evaluation:
                self.tb.add_scalar("eval/loss", evaluation["eval_loss"], step)
                self.tb.add_scalar("eval/perplexity", evaluation["eval_perplexity"], step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if step % self.interval == 0 or step == self.total:
            self.info(f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.3e} | grad_norm {grad_norm:.3f} | "
                      f"tok/s {record['tokens_per_s']:.0f} | elapsed {_hms(elapsed)} | eta {_hms(eta)}")
        if evaluation:
            self.info(f"step {step}/{self.total} | eval loss {evaluation['eval_loss']:.4f} | eval ppl "
                      f"{evaluation['eval_perplexity']:.3f} | {evaluation['eval_tokens']} tokens | best "
                      f"{evaluation['eval_best_loss']:.4f} (step {evaluation['eval_best_step']}) | "
                      f"{evaluation['eval_s']:.1f} s")

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
        train, evals = {}, {}   # by step: the lines a resumed run wrote again replace the first ones
        with open(os.path.join(self.out_dir, "metrics.jsonl"), encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                train[rec["step"]] = rec["loss"]
                if "eval_loss" in rec:
                    evals[rec["step"]] = rec["eval_loss"]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(sorted(train), [train[s] for s in sorted(train)], lw=1.2, label="train")
        if evals:
            ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o-", lw=1.2, ms=3, label="eval (held out)")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss" + (" and held-out loss" if evals else ""))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(self.out_dir, "loss_curve.png")
        fig.savefig(path)
        plt.close(fig)
        return path
