"""Per-call MatMul time, MindSpore's CPU kernel against torch's, at the training step's shapes (train_bench's two
sizes): the forward x @ W^T, dx = dy @ W and dW = dy^T @ x, the three forms autodiff emits for an [out, in] Linear.

Why: it bounds what the step can reach against torch eager on CPU (MatMul is most of the step's kernel time, see
README "The step"). MindSpore runs each form as one P.MatMul (transpose flags as autodiff sets them), 30 calls per
graph launch chained by F.depend so they run one after another (independent kernels would overlap and share the
cores); torch runs the same products eagerly. Each side runs in a process of its own (MindSpore's runtime threads
starve torch in a shared process), alternating, medians over rounds.

Usage: python benchmarks/matmul_bench.py [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

# (tokens, in, out): hidden 256 (batch 2 x seq 128) and hidden 1024 (batch 2 x seq 256), as train_bench
SHAPES = [(256, 256, 256), (256, 256, 688), (256, 688, 256), (256, 256, 1024),
          (512, 1024, 1024), (512, 1024, 2752), (512, 2752, 1024), (512, 1024, 4096)]
FORMS = ("fwd", "dx", "dw")
CALLS = 30


def _operands(m: int, n_in: int, n_out: int, form: str) -> tuple[tuple[int, int], tuple[int, int], bool, bool]:
    """(a shape, b shape, transpose_a, transpose_b) of one form."""
    return {"fwd": ((m, n_in), (n_out, n_in), False, True),
            "dx": ((m, n_out), (n_out, n_in), False, False),
            "dw": ((m, n_out), (m, n_in), True, False)}[form]


def _time_torch() -> dict[str, float]:
    import torch
    out = {}
    for m, n_in, n_out in SHAPES:
        for form in FORMS:
            sa, sb, ta, tb = _operands(m, n_in, n_out, form)
            a, b = torch.randn(*sa), torch.randn(*sb)
            a_, b_ = (a.t() if ta else a), (b.t() if tb else b)
            for _ in range(5):
                a_ @ b_
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(CALLS):
                    a_ @ b_
                runs.append((time.perf_counter() - t) / CALLS)
            out[f"{m}x{n_in}->{n_out} {form}"] = statistics.median(runs) * 1e6
    return out


def _time_mindspore() -> dict[str, float]:
    import mindspore as ms
    from mindspore import Tensor, nn
    from mindspore.ops import functional as F
    from mindspore.ops import operations as P
    ms.set_context(mode=ms.GRAPH_MODE)

    class Chain(nn.Cell):
        def __init__(self, ta: bool, tb: bool):
            super().__init__()
            self.matmul = P.MatMul(transpose_a=ta, transpose_b=tb)

        def construct(self, a, b):
            outs = [self.matmul(a[0], b)]
            for k in range(1, CALLS):
                outs.append(self.matmul(F.depend(a[k], outs[-1]), b))
            return tuple(outs)

    rng = np.random.default_rng(0)
    out = {}
    for m, n_in, n_out in SHAPES:
        for form in FORMS:
            sa, sb, ta, tb = _operands(m, n_in, n_out, form)
            a = ms.mutable(tuple(Tensor(rng.standard_normal(sa).astype(np.float32)) for _ in range(CALLS)))
            b = Tensor(rng.standard_normal(sb).astype(np.float32))
            cell = Chain(ta, tb)
            for _ in range(2):
                cell(a, b)[-1].asnumpy()
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                cell(a, b)[-1].asnumpy()
                runs.append((time.perf_counter() - t) / CALLS)
            out[f"{m}x{n_in}->{n_out} {form}"] = statistics.median(runs) * 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--side", choices=("torch", "mindspore"), default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(_time_torch() if a.side == "torch" else _time_mindspore()))
        return
    runs: dict[str, list[dict]] = {"torch": [], "mindspore": []}
    for r in range(a.rounds):
        for side in (("torch", "mindspore") if r % 2 == 0 else ("mindspore", "torch")):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--side={side}"], capture_output=True,
                                  text=True, env={**os.environ, "GLOG_v": "3"}, check=True)
            runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"us per call (median of {a.rounds} rounds); {CALLS} calls per measurement")
    ratios: dict[str, list[float]] = {"hidden 256": [], "hidden 1024": []}
    for key in runs["torch"][0]:
        t = statistics.median(x[key] for x in runs["torch"])
        m = statistics.median(x[key] for x in runs["mindspore"])
        ratios["hidden 256" if key.startswith("256x") else "hidden 1024"].append(m / t)
        print(f"  {key:20s} torch {t:9.1f}  mindspore {m:9.1f}  mindspore / torch {m / t:.2f}x")
    for size, rs in ratios.items():
        print(f"{size}: mindspore / torch per call {min(rs):.2f}x - {max(rs):.2f}x (median {statistics.median(rs):.2f}x)")


if __name__ == "__main__":
    main()
