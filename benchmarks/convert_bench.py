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

src, dst, dtype = sys.argv[1], sys.argv[2], (sys.argv[3] if sys.argv[3] != "keep" else None)
before = hwm_kb()
t = time.perf_counter()
convert_checkpoint(src, dst, "ms", dtype=dtype, max_shard_size="256MB", show_progress=False)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_delta_bytes": (hwm_kb() - before) * 1024}))
"""


def _copy_fsync(src: str, dst: str) -> None:
    """A plain copy made durable like the converter's output (fsync per file)."""
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as fh:
        os.fsync(fh.fileno())


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
            shutil.rmtree(copy)
            t = time.perf_counter()
            shutil.copytree(src, copy, copy_function=_copy_fsync)
            copy_fsync_s = time.perf_counter() - t
            for dtype in ("keep", "bfloat16"):  # byte copies vs decode + convert + encode
                out = subprocess.run([sys.executable, "-c", CHILD, src, dst, dtype], check=True,
                                     capture_output=True, text=True)
                child = json.loads(out.stdout.strip().splitlines()[-1])
                row = {"layers": layers, "dtype": dtype, "total_MB": total / 1e6, "largest_tensor_MB": largest / 1e6,
                       "peak_rss_delta_MB": child["peak_delta_bytes"] / 1e6,
                       "peak_over_largest": child["peak_delta_bytes"] / largest,
                       "convert_MB_s": total / 1e6 / child["seconds"], "copy_MB_s": total / 1e6 / copy_s,
                       "convert_over_copy_speed": copy_s / child["seconds"],
                       "convert_over_durable_copy_speed": copy_fsync_s / child["seconds"]}
                results.append(row)
                print(json.dumps(row))
                shutil.rmtree(dst)
            for d in (src, copy):
                shutil.rmtree(d)
    for dtype in ("keep", "bfloat16"):
        rows = [r for r in results if r["dtype"] == dtype]
        a, b = rows[0], rows[-1]
        print(f"[{dtype}] checkpoint grew {b['total_MB'] / a['total_MB']:.2f}x; peak RSS delta "
              f"{a['peak_rss_delta_MB']:.1f} -> {b['peak_rss_delta_MB']:.1f} MB (at most "
              f"{max(r['peak_over_largest'] for r in rows):.2f}x the largest tensor); speed "
              f"{min(r['convert_over_durable_copy_speed'] for r in rows):.2f}-"
              f"{max(r['convert_over_durable_copy_speed'] for r in rows):.2f}x a durable file copy")


if __name__ == "__main__":
    main()
