"""Converter memory and speed: peak RSS above the pre-conversion baseline vs the largest tensor, for two
checkpoint sizes with the same largest tensor; throughput as a ratio to a plain file copy of the same bytes.

Usage: python benchmarks/convert_bench.py [--hidden 2048] [--vocab 8192] [--layers 2 8]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = r"""
import json, sys, time
from telechat_ms.weights import convert_checkpoint

def hwm_kb():  # this process's peak RSS (VmHWM starts afresh at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

src, dst = sys.argv[1], sys.argv[2]
before = hwm_kb()
t = time.perf_counter()
convert_checkpoint(src, dst, "ms", max_shard_size="256MB", show_progress=False)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_delta_bytes": (hwm_kb() - before) * 1024}))
"""


def write_synthetic(path: str, hidden: int, vocab: int, layers: int) -> tuple[int, int]:
    """A random fp32 HF checkpoint in 256 MB shards; returns (total bytes, largest tensor bytes)."""
    from telechat_ms.checkpoint_io import write_sharded_safetensors
    from telechat_ms.config import TeleChatConfig
    cfg = TeleChatConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=hidden // 128,
                         ffn_hidden_size=2 * hidden)
    specs = [(n, s, "float32") for n, s in cfg.parameter_shapes().items()]
    rng = np.random.default_rng(0)
    os.makedirs(path, exist_ok=True)
    write_sharded_safetensors(path, specs, lambda i: rng.standard_normal(specs[i][1], dtype=np.float32),
                              256 * 10**6)
    cfg.save_pretrained(path)
    sizes = [int(np.prod(s)) * 4 for _, s, _ in specs]
    return sum(sizes), max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            src, dst, copy = (os.path.join(tmp, f"{k}{layers}") for k in ("src", "dst", "copy"))
            total, largest = write_synthetic(src, args.hidden, args.vocab, layers)
            t = time.perf_counter()
            shutil.copytree(src, copy)
            copy_s = time.perf_counter() - t
            out = subprocess.run([sys.executable, "-c", CHILD, src, dst], check=True, capture_output=True, text=True)
            child = json.loads(out.stdout.strip().splitlines()[-1])
            row = {"layers": layers, "total_MB": total / 1e6, "largest_tensor_MB": largest / 1e6,
                   "peak_rss_delta_MB": child["peak_delta_bytes"] / 1e6,
                   "peak_over_largest": child["peak_delta_bytes"] / largest,
                   "convert_MB_s": total / 1e6 / child["seconds"], "copy_MB_s": total / 1e6 / copy_s,
                   "convert_over_copy_speed": copy_s / child["seconds"]}
            results.append(row)
            print(json.dumps(row))
            for d in (src, dst, copy):
                shutil.rmtree(d)
    a, b = results[0], results[-1]
    print(f"checkpoint grew {b['total_MB'] / a['total_MB']:.2f}x; peak RSS delta grew "
          f"{b['peak_rss_delta_MB'] / max(a['peak_rss_delta_MB'], 1e-9):.2f}x "
          f"(at most {max(r['peak_over_largest'] for r in results):.2f}x the largest tensor)")


if __name__ == "__main__":
    main()
