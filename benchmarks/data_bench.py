"""process-data at corpus scale: throughput per worker vs raw SentencePiece, 2-worker scaling, memory from N to 10N.

    python benchmarks/data_bench.py [--records 1800] [--throughput-scale 20] [--max-seq-len 8192] [--part-size-mb 2]

Every figure comes from this one run, each process-data run in a fresh interpreter as the CLI runs it:
- end-to-end tokens/s per worker (pre-pass, parse, render, tokenize, pack, MindRecord, manifest; wall clock of the
  whole command) against raw SentencePiece encode (one thread) of the same rendered text: target >= 0.5x;
- 2 workers against 1 on the same corpus: target >= 1.7x (needs two idle cores; the load average is printed);
- peak RSS (VmHWM from /proc/<pid>/status, of the parent and of the workers, which read their own) for a corpus
  of N records and of 10N records, 2 workers each: target growth <= 20% for each.
N = --records (the released files' 1800 records by default); the throughput corpus is --throughput-scale x N
records, big enough that the fixed costs (interpreter start, each worker's MindSpore import for the MindRecord
writer, about 2 s together, printed) weigh little, as they do at corpus scale.
Uses the released SFT sample data and the real tokenizer from ../shared when present, else the shipped demo data
with a freshly trained demo tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from telechat_ms.data import TeleChatTokenizer, parse_line  # noqa: E402
from telechat_ms.data.render import render_training_text  # noqa: E402

SHARED = REPO.parent / "shared"


def sources(tmp: Path) -> tuple[list[Path], Path, str]:
    """(input files, tokenizer, description)."""
    sample = SHARED / "sample_data" / "sft"
    real = SHARED / "telechat2_115b_meta" / "tokenizer.model"
    if sample.is_dir() and real.is_file():
        return sorted(sample.glob("*.jsonl")), real, "released sample SFT data, real 131072-piece tokenizer"
    from telechat_ms.data.train_tokenizer import DEMO_DIR, train_tokenizer
    train_tokenizer(str(tmp / "tok"))
    return [DEMO_DIR / "sft_demo.jsonl"], tmp / "tok" / "tokenizer.model", "shipped demo data, demo tokenizer"


def corpus(tmp: Path, files: list[Path], records: int, name: str) -> Path:
    """A mix of `records` records (weight 1) cycling through the input files' lines, so all the work is real."""
    lines = [ln for path in files for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    folder = tmp / name
    folder.mkdir()
    data = folder / "data.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i in range(records):
            fh.write(lines[i % len(lines)] + "\n")
    mix = folder / "mix.json"
    mix.write_text(json.dumps({str(data): 1}))
    return mix


def raw_sentencepiece(tokenizer: TeleChatTokenizer, mix: Path) -> tuple[int, float]:
    """Tokens and seconds of bare SentencePiece encode (one thread, one call per record) of the rendered texts."""
    texts = []
    for path in json.loads(mix.read_text()):
        with open(path, encoding="utf-8") as fh:
            texts += [render_training_text(parse_line(ln, f"{path}:{i}")) for i, ln in enumerate(fh, 1) if ln.strip()]
    start = time.perf_counter()
    n = sum(len(ids) for ids in tokenizer.sp.encode(texts, num_threads=1))
    return n, time.perf_counter() - start


_RUN = """
import json, sys, time
from telechat_ms.data import ProcessOptions, process_data
opts = ProcessOptions(**json.loads(sys.argv[1]))
stats = {}
start = time.perf_counter()
summary = process_data(opts, log=lambda msg: None, stats=stats)
summary["wall"] = time.perf_counter() - start
summary["stats"] = stats
print(json.dumps(summary))
"""


def process(mix: Path, tok: Path, workers: int, args: argparse.Namespace, tmp: Path, part_mb: float) -> dict:
    """One process-data run in a fresh interpreter (MindSpore not imported yet, so workers fork)."""
    out = tmp / f"out_{time.monotonic_ns()}"
    opts = dict(data_mix=str(mix), tokenizer=str(tok), out=str(out), num_workers=workers,
                max_seq_len=args.max_seq_len, cross_attention=False, part_size_mb=part_mb, progress=False)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(opts)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start  # the whole command, interpreter start included
    return result


def fixed_cost() -> float:
    """Seconds a fresh interpreter takes to import the pipeline and MindSpore's MindRecord writer (paid once per
    run, and once per worker)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import telechat_ms.data.process; from mindspore.mindrecord import "
                    "FileWriter"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
                   capture_output=True)
    return time.perf_counter() - start


def verdict(ok: bool) -> str:
    return "holds" if ok else "DOES NOT HOLD"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1800, help="N of the memory comparison (N vs 10N)")
    parser.add_argument("--throughput-scale", type=int, default=20, help="throughput corpus: this many x N records")
    parser.add_argument("--part-size-mb", type=float, default=2.0, help="part size of every run")
    parser.add_argument("--max-seq-len", type=int, default=8192)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files, tok_path, what = sources(tmp)
        scale = args.throughput_scale
        big = corpus(tmp, files, args.records * scale, "throughput")
        tokenizer = TeleChatTokenizer(str(tok_path))
        raw_tokens, raw_s = raw_sentencepiece(tokenizer, big)
        raw_tps = raw_tokens / raw_s
        size = os.path.getsize(next(iter(json.loads(big.read_text()))))
        print(f"input: {what}; throughput corpus {args.records * scale} records ({size / 1e6:.1f} MB); parts of "
              f"{args.part_size_mb} MB; --max-seq-len {args.max_seq_len} --no-cross-attention")
        print(f"load average before: {load_before[0]:.2f} (1 min) on {os.cpu_count()} cores")
        print(f"raw SentencePiece encode (1 thread): {raw_tokens} tokens in {raw_s:.2f} s = {raw_tps:,.0f} tokens/s")
        print(f"fixed cost of a run (interpreter, pipeline and MindSpore imports): {fixed_cost():.2f} s")
        runs = {w: process(big, tok_path, w, args, tmp, args.part_size_mb) for w in (1, 2)}
        for w, r in runs.items():
            tps = r["tokens"] / r["wall"]
            print(f"{w} worker(s): {r['tokens']} tokens in {r['wall']:.2f} s = {tps:,.0f} tokens/s end to end "
                  f"({tps / w:,.0f} per worker); {r['parts']} parts, slot fill {r['slot_fill']:.2%}, "
                  f"{r['bytes_per_token']:.2f} bytes/token; stages {r['seconds']}")
        per_worker = runs[1]["tokens"] / runs[1]["wall"] / raw_tps
        scaling = runs[1]["wall"] / runs[2]["wall"]
        same = runs[1]["tokens"] == runs[2]["tokens"]
        mem = {"N": process(corpus(tmp, files, args.records, "n"), tok_path, 2, args, tmp, args.part_size_mb),
               "10N": process(corpus(tmp, files, args.records * 10, "10n"), tok_path, 2, args, tmp,
                              args.part_size_mb)}
        for name, r in mem.items():
            st = r["stats"]
            print(f"{name:>3} = {r['records_read']} records, {r['parts']} parts, 2 workers: peak RSS parent "
                  f"{st['parent_peak_rss_kb'] / 1024:.0f} MB, worker {st['worker_peak_rss_kb'] / 1024:.0f} MB")
        growth = {who: mem["10N"]["stats"][key] / mem["N"]["stats"][key] - 1
                  for who, key in (("parent", "parent_peak_rss_kb"), ("worker", "worker_peak_rss_kb"))}
        load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} (1 min)")
    print("targets:")
    print(f"  end-to-end tokens/s per worker vs raw SentencePiece: {per_worker:.2f}x (>= 0.5x) "
          f"{verdict(per_worker >= 0.5)}")
    print(f"  2 workers vs 1: {scaling:.2f}x (>= 1.7x) {verdict(scaling >= 1.7)}"
          + ("" if same else "  [token counts differ between the runs!]"))
    for who, g in growth.items():
        print(f"  peak RSS of the {who}, N -> 10N: {g:+.1%} (<= +20%) {verdict(g <= 0.20)}")


if __name__ == "__main__":
    main()
