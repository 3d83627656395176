"""process-data: jsonl + data mix -> validated, tokenized, packed MindRecord shards with a manifest.

Workers only parse and tokenize; the parent selects, orders, packs and writes, so the output bytes do not
depend on the number of workers.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from telechat_ms.data.formats import TASKS, parse_line
from telechat_ms.data.mindrecord import write_shards
from telechat_ms.data.mix import load_mix, select_indices
from telechat_ms.data.pack import OVERLONG, PAD_SIDES, PackOptions, materialize, plan_sequences
from telechat_ms.data.render import LOSS_MASKS, Encoded, encode_example
from telechat_ms.data.tokenizer import TeleChatTokenizer, resolve_tokenizer_path
from telechat_ms.errors import DataError
from telechat_ms.io import atomic_output_dir, atomic_write_text

MANIFEST = "manifest.json"
SKIPPED_FILE = "skipped_lines.txt"
MANIFEST_FORMAT = "telechat_ms.process_data/1"
ON_ERROR = ("skip", "fail")
_CHUNK_LINES = 128


@dataclass
class ProcessOptions:
    """Every knob of process-data (the manifest records them)."""

    data_mix: str
    tokenizer: str
    out: str
    max_seq_len: int = 8192
    task: str = "sft"
    seed: int = 42
    num_workers: int = 1
    on_error: str = "skip"
    loss_mask: str = "released"
    overlong: str = "truncate"
    pad_side: str = "right"
    cross_attention: bool = True
    pack: bool = True
    max_records_per_file: int | None = None
    records_per_shard: int = 4096
    overwrite: bool = False
    progress: bool = True
    show_errors: int = 5

    def check(self) -> None:
        """Reject contradictory or out-of-range options before any work starts."""
        choices = {"task": TASKS, "on_error": ON_ERROR, "loss_mask": LOSS_MASKS,
                   "overlong": OVERLONG, "pad_side": PAD_SIDES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise DataError(f"--{name.replace('_', '-')}: {getattr(self, name)!r} is not one of {allowed}")
        for name in ("max_seq_len", "num_workers", "records_per_shard"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_records_per_file is not None and self.max_records_per_file < 1:
            raise DataError(f"--max-records-per-file must be >= 1, got {self.max_records_per_file}")


# ---- workers -------------------------------------------------------------------------------------
_STATE: dict[str, Any] = {}


def _init_worker(tokenizer: TeleChatTokenizer, task: str, loss_mask: str) -> None:
    _STATE.update(tokenizer=tokenizer, task=task, loss_mask=loss_mask)


def _encode_chunk(chunk: tuple[int, str, list[tuple[int, bytes]]]) -> tuple[int, list[Encoded | str]]:
    """Parse + validate + tokenize lines; a bad line becomes its error message (file:line: reason)."""
    file_idx, path, lines = chunk
    out: list[Encoded | str] = []
    for line_no, raw in lines:
        where = f"{path}:{line_no}"
        try:
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text (byte {exc.start})") from None
            example = parse_line(text, where, _STATE["task"])
            out.append(encode_example(example, _STATE["tokenizer"], _STATE["loss_mask"]))
        except DataError as exc:
            out.append(str(exc))
    return file_idx, out


def _read_chunks(paths: list[str], limit: int | None) -> Iterator[tuple[int, str, list[tuple[int, bytes]]]]:
    """Non-blank lines of each file (at most `limit` per file) in chunks tagged with their 1-based line numbers."""
    for file_idx, path in enumerate(paths):
        chunk: list[tuple[int, bytes]] = []
        taken = 0
        with open(path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                if limit is not None and taken >= limit:
                    break
                chunk.append((line_no, raw))
                taken += 1
                if len(chunk) == _CHUNK_LINES:
                    yield file_idx, path, chunk
                    chunk = []
        if chunk:
            yield file_idx, path, chunk


def _count_lines(paths: list[str], limit: int | None) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as fh:
            n = sum(1 for raw in fh if raw.strip())
        total += n if limit is None else min(n, limit)
    return total


def _mp_context() -> multiprocessing.context.BaseContext:
    """fork (instant start) while no MindSpore threads exist in this process; spawn (safe, ~1 s start) otherwise."""
    if sys.platform.startswith("linux") and "mindspore" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


# ---- pipeline ------------------------------------------------------------------------------------
@dataclass
class _Collected:
    """Per input file: valid encoded examples in line order, lines read, bad-line messages."""

    items: list[list[Encoded]]
    read: list[int]
    errors: list[list[str]]


def _tokenize_all(opts: ProcessOptions, tokenizer: TeleChatTokenizer, paths: list[str],
                  log: Callable[[str], None]) -> _Collected:
    """Run the workers over every file; keep valid examples per file in line order, report bad lines."""
    got = _Collected([[] for _ in paths], [0] * len(paths), [[] for _ in paths])
    chunks = _read_chunks(paths, opts.max_records_per_file)
    pool = None
    if opts.num_workers > 1:  # before the progress bar starts its monitor thread
        pool = _mp_context().Pool(opts.num_workers, initializer=_init_worker,
                                  initargs=(tokenizer, opts.task, opts.loss_mask))
        results = pool.imap(_encode_chunk, chunks)
    else:
        _init_worker(tokenizer, opts.task, opts.loss_mask)
        results = map(_encode_chunk, chunks)
    bar = tqdm(total=_count_lines(paths, opts.max_records_per_file), desc="tokenize", unit="rec",
               disable=not opts.progress, file=sys.stderr)
    shown = 0
    try:
        for file_idx, out in results:
            bar.update(len(out))
            got.read[file_idx] += len(out)
            for result in out:
                if isinstance(result, str):
                    if opts.on_error == "fail":
                        raise DataError(f"{result} (--on-error fail)")
                    got.errors[file_idx].append(result)
                    if shown < opts.show_errors:
                        log(f"skipped {result}")
                        shown += 1
                else:
                    got.items[file_idx].append(result)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    n_errors = sum(len(e) for e in got.errors)
    if n_errors > shown:
        log(f"... and {n_errors - shown} more bad lines skipped (all of them are listed in {SKIPPED_FILE})")
    return got


def _check_out(opts: ProcessOptions) -> None:
    if os.path.exists(opts.out) and not opts.overwrite:
        if not os.path.isdir(opts.out) or os.listdir(opts.out):
            raise DataError(f"{opts.out}: output already exists (pass --overwrite to replace it)")


def process_data(opts: ProcessOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary (also written, with options and mix, to manifest.json)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    opts.check()
    _check_out(opts)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    tokenizer = TeleChatTokenizer(resolve_tokenizer_path(opts.tokenizer))
    mix = load_mix(opts.data_mix)
    got = _tokenize_all(opts, tokenizer, [e.path for e in mix], log)
    timings["tokenize"] = time.perf_counter() - start

    # Deterministic from here on: selection, order, packing and writing happen in this process only.
    items = [item for per_file in got.items for item in per_file]
    order: list[int] = []
    offset = 0
    mix_report = []
    for entry, per_file, read, errors in zip(mix, got.items, got.read, got.errors):
        chosen = select_indices(len(per_file), entry.weight, opts.seed, entry.key)
        order.extend(offset + i for i in chosen)
        offset += len(per_file)
        mix_report.append({"key": entry.key, "path": entry.path, "weight": entry.weight, "records_read": read,
                           "records_skipped": len(errors), "records_valid": len(per_file),
                           "records_selected": len(chosen)})
    order_arr = np.asarray(order, dtype=np.int64)
    np.random.default_rng([opts.seed, 0]).shuffle(order_arr)
    pack_opts = PackOptions(opts.max_seq_len, opts.overlong, opts.pad_side, opts.cross_attention, opts.pack,
                            tuple(tokenizer.encode_plain("\n")))
    plans, pstats = plan_sequences(items, order_arr.tolist(), pack_opts)
    if not plans:
        raise DataError(f"{opts.data_mix}: no usable records (every record was skipped or dropped)")
    perm = np.random.default_rng([opts.seed, 1]).permutation(len(plans))
    timings["pack"] = time.perf_counter() - start - timings["tokenize"]

    totals = {"tokens": 0, "supervised": 0}

    def rows():
        for i in tqdm(perm, desc="write", unit="seq", disable=not opts.progress, file=sys.stderr):
            row = materialize(plans[i], items, pack_opts)
            totals["tokens"] += row.n_tokens
            totals["supervised"] += row.n_supervised
            yield row

    with atomic_output_dir(opts.out, overwrite=opts.overwrite) as tmp:
        shards = write_shards(tmp, rows(), opts.max_seq_len, not opts.cross_attention, opts.records_per_shard)
        slots = len(plans) * opts.max_seq_len
        summary = {
            "records_read": sum(got.read),
            "records_skipped": sum(len(e) for e in got.errors),
            "records_valid": len(items),
            "records_selected": len(order),
            "truncated": pstats.truncated,
            "dropped": pstats.dropped_overlong + pstats.dropped_no_target,
            "dropped_overlong": pstats.dropped_overlong,
            "dropped_no_target": pstats.dropped_no_target,
            "packed_records": pstats.packed_examples,
            "sequences": len(plans),
            "tokens": totals["tokens"],
            "supervised_tokens": totals["supervised"],
            "padding_tokens": slots - totals["tokens"],
            "padding_ratio": round((slots - totals["tokens"]) / slots, 6),
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "task": opts.task,
            "columns": {"input_ids": ["int32", [opts.max_seq_len]], "labels": ["int32", [opts.max_seq_len]],
                        **({"position_ids": ["int32", [opts.max_seq_len]]} if not opts.cross_attention else {})},
            "labels": "token id where supervised, -100 elsewhere; not shifted (the model shifts)",
            "options": {k: v for k, v in asdict(opts).items() if k not in ("progress", "show_errors")},
            "tokenizer": {"path": tokenizer.model_file, "sha256": tokenizer.sha256,
                          "vocab_size": tokenizer.vocab_size},
            "mix": mix_report,
            "counts": summary,
            "shards": shards,
            "first_errors": [e for per_file in got.errors for e in per_file][:20],
        }
        atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
        if summary["records_skipped"]:
            atomic_write_text(os.path.join(tmp, SKIPPED_FILE),
                              "".join(e + "\n" for per_file in got.errors for e in per_file))
    timings["write"] = time.perf_counter() - start - timings["tokenize"] - timings["pack"]
    summary["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable summary lines for the CLI."""
    s = summary
    return "\n".join([
        f"records: {s['records_read']} read, {s['records_skipped']} skipped (bad lines), "
        f"{s['records_selected']} selected by the mix, {s['truncated']} truncated, {s['dropped']} dropped "
        f"({s['dropped_overlong']} over-long, {s['dropped_no_target']} without supervised tokens)",
        f"sequences: {s['sequences']} ({s['packed_records']} records packed with others)",
        f"tokens: {s['tokens']}, supervised: {s['supervised_tokens']}, padding ratio: {s['padding_ratio']:.2%}",
        "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in s.get("seconds", {}).items()),
    ])
