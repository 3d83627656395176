"""Data pipeline throughput: process-data tokens/s with 1 and 2 workers vs raw SentencePiece on the same text.

    python benchmarks/data_bench.py [--repeat 2] [--max-seq-len 8192]

Uses the real TeleChat2 tokenizer and the released sample data from ../shared when present, otherwise the
shipped demo data (x20) with a freshly trained demo tokenizer. Ratios are against the raw encode measured
in the same run, so the numbers compare across machines.
"""
from __future__ import annotations

import argparse
import json
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


def corpus(tmp: Path, scale: int) -> tuple[Path, Path, str]:
    """(mix file, tokenizer path, description): every input file copied `scale` times, so all work is real."""
    sample = SHARED / "sample_data" / "sft"
    real = SHARED / "telechat2_115b_meta" / "tokenizer.model"
    if sample.is_dir() and real.is_file():
        files, tok = sorted(sample.glob("*.jsonl")), real
        what = "released sample SFT data (../shared), real 131072-piece tokenizer"
    else:
        from telechat_ms.data.train_tokenizer import DEMO_DIR, train_tokenizer
        train_tokenizer(str(tmp / "tok"))
        files, tok = [DEMO_DIR / "sft_demo.jsonl"], tmp / "tok" / "tokenizer.model"
        what, scale = "shipped demo data, demo tokenizer", scale * 10
    copies = []
    for path in files:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        copy = tmp / path.name
        copy.write_text("\n".join(lines * scale) + "\n", encoding="utf-8")
        copies.append(copy)
    mix = tmp / "mix.json"
    mix.write_text(json.dumps({str(p): 1 for p in copies}))
    return mix, tok, f"{what}, x{scale}"


def rendered_texts(mix: Path) -> list[str]:
    """The training text of every record of the mix (weights are all 1 here)."""
    texts = []
    for path in json.loads(mix.read_text()):
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, start=1):
                if line.strip():
                    texts.append(render_training_text(parse_line(line, f"{path}:{i}")))
    return texts


def raw_sentencepiece(tokenizer: TeleChatTokenizer, texts: list[str]) -> tuple[int, float]:
    """Tokens and seconds for bare SentencePiece encode of the same texts (one thread, one call per text)."""
    sp = tokenizer.sp
    start = time.perf_counter()
    n = sum(len(sp.encode(t)) for t in texts)
    return n, time.perf_counter() - start


_RUN = """
import json, sys, time
from telechat_ms.data import ProcessOptions, process_data
opts = ProcessOptions(**json.loads(sys.argv[1]))
start = time.perf_counter()
summary = process_data(opts, log=lambda msg: None)
summary["wall"] = time.perf_counter() - start
print(json.dumps(summary))
"""


def pipeline(mix: Path, tok: Path, workers: int, max_seq_len: int, tmp: Path) -> dict:
    """One process-data run in a fresh interpreter, as the CLI runs (MindSpore not yet imported, so workers
    fork; its ~3 s import happens in the write stage); returns the summary with per-stage seconds."""
    out = tmp / f"out_w{workers}_{time.monotonic_ns()}"
    opts = dict(data_mix=str(mix), tokenizer=str(tok), out=str(out), num_workers=workers,
                max_seq_len=max_seq_len, progress=False)
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(opts)], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs per setting")
    parser.add_argument("--max-seq-len", type=int, default=8192)
    parser.add_argument("--scale", type=int, default=3, help="copies of the input (more work per worker start)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        mix, tok_path, what = corpus(tmp, args.scale)
        tokenizer = TeleChatTokenizer(str(tok_path))
        texts = rendered_texts(mix)
        raw = min((raw_sentencepiece(tokenizer, texts) for _ in range(args.repeat)), key=lambda r: r[1])
        raw_tps = raw[0] / raw[1]
        print(f"input: {what}; {len(texts)} records, {sum(map(len, texts)) / 1e6:.2f} M characters")
        print(f"raw SentencePiece encode (1 thread): {raw[0]} tokens in {raw[1]:.2f} s = {raw_tps:,.0f} tokens/s")
        print("tokenize = parse + validate + render + encode + loss mask; end-to-end adds packing, MindRecord "
              "writing and the MindSpore import")
        print(f"{'workers':>7} {'tokenize tok/s':>15} {'vs raw':>7} {'end-to-end tok/s':>17} {'vs raw':>7}  stages (s)")
        for workers in (1, 2):
            runs = [pipeline(mix, tok_path, workers, args.max_seq_len, tmp) for _ in range(args.repeat)]
            best = min(runs, key=lambda s: s["wall"])
            tokens = best["tokens"]  # includes <_bot>/<_end>/... ids raw SentencePiece never produces
            tok_tps, e2e_tps = tokens / best["seconds"]["tokenize"], tokens / best["wall"]
            print(f"{workers:>7} {tok_tps:>15,.0f} {tok_tps / raw_tps:>7.2f} {e2e_tps:>17,.0f} "
                  f"{e2e_tps / raw_tps:>7.2f}  {best['seconds']}")


if __name__ == "__main__":
    main()
