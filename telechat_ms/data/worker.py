"""One part of process-data, start to finish, in one worker: read, parse, validate, render, tokenize, select,
pack or chunk, write the part's MindRecord file(s), then its summary.

A part's output depends only on its bytes, its mix quota and the options, so it is the same in any worker, on any
node. It is written into a temporary directory renamed into place after the summary, so a part directory that
exists is complete (what --resume and the final step rely on).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from telechat_ms.data.formats import parse_line
from telechat_ms.data.mindrecord import ShardWriter
from telechat_ms.data.mix import PartQuota, extra_in_part
from telechat_ms.data.pack import PackOptions, PackStats, chunk_documents, materialize_compact, plan_sequences
from telechat_ms.data.parts import Part, iter_lines
from telechat_ms.data.render import Encoded, encode_examples
from telechat_ms.data.tokenizer import TeleChatTokenizer
from telechat_ms.errors import DataError
from telechat_ms.io import atomic_write_text

SUMMARY = "summary.json"
SKIPPED = "skipped.txt"
FIRST_ERRORS = 20
_REPORT_EVERY = 0.25  # seconds between progress reports
_ENCODE_BATCH = 256  # records per SentencePiece call


@dataclass
class WorkerConfig:
    """What every worker needs, sent once per worker process (the tokenizer pickles as its model bytes)."""

    tokenizer: TeleChatTokenizer
    paths: list[str]
    parts_dir: str
    fingerprint: str
    task: str
    loss_mask: str
    on_error: str
    seed: int
    pack: PackOptions
    records_per_shard: int
    shard_sizes: tuple[int, int]  # MindRecord page and header sizes, one pair for the whole job
    split: str = ""               # --eval-fraction: "train" (records not held out) or "eval" (held out, each once)
    eval_fraction: float = 0.0
    keys: tuple[str, ...] = ()    # the mix keys of the files (the held-out draw is keyed on them)


def held_out(seed: int, key: str, record: int, fraction: float) -> bool:
    """Whether record `record` (0-based, in its file) of mix entry `key` is in the held-out split: a seeded hash,
    so the split depends only on the seed, the file's key and the record's place, never on parts or workers."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{record}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0 ** 64


def part_dir_name(part_id: int) -> str:
    """Directory of a finished part inside the staging area's parts/ folder."""
    return f"p{part_id:06d}"


def shard_prefix(part_id: int) -> str:
    """File name prefix of a part's shards: names sort in part order, and stay unique in the final directory."""
    return f"data_{part_id:06d}"


def peak_rss_kb() -> int:
    """This process's peak resident memory (VmHWM), from /proc (ru_maxrss is inherited across fork + exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class _Progress:
    """Throttled (tokens, bytes) reports to the parent's progress bar."""

    def __init__(self, report: Callable[[int, int], None] | None):
        self.report, self.tokens, self.bytes, self.last = report, 0, 0, time.monotonic()
        self.total_bytes = 0

    def add(self, tokens: int, nbytes: int, force: bool = False) -> None:
        self.tokens += tokens
        self.bytes += nbytes
        self.total_bytes += nbytes
        now = time.monotonic()
        if self.report is not None and (force or now - self.last >= _REPORT_EVERY):
            self.report(self.tokens, self.bytes)
            self.tokens = self.bytes = 0
            self.last = now


def _encode_part(cfg: WorkerConfig, part: Part, quota: PartQuota,
                 progress: _Progress) -> tuple[list[Encoded], list[int], list[str]]:
    """Valid selected records of the part (each once), how many times each is used, and the bad lines."""
    path = cfg.paths[part.file]
    extra = set(extra_in_part(part.records, quota).tolist())
    items: list[Encoded] = []
    uses: list[int] = []
    errors: list[str] = []
    batch: list = []
    seen = 0

    def encode_batch() -> None:  # one SentencePiece call per batch of records
        encoded = encode_examples(batch, cfg.tokenizer, cfg.loss_mask)
        items.extend(encoded)
        progress.add(sum(len(e) * t for e, t in zip(encoded, uses[-len(batch):])), 0)
        batch.clear()

    for line_no, raw in iter_lines(path, part):
        times = quota.whole + (seen in extra)
        if cfg.split:  # the held-out half takes each of its records once; the training half never sees them
            held = held_out(cfg.seed, cfg.keys[part.file], part.first_record + seen, cfg.eval_fraction)
            times = (1 if held else 0) if cfg.split == "eval" else (0 if held else times)
        seen += 1
        where = f"{path}:{line_no}"
        try:
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text (byte {exc.start})") from None
            example = parse_line(text, where, cfg.task)
            if times:
                batch.append(example)
                uses.append(times)
                if len(batch) == _ENCODE_BATCH:
                    encode_batch()
        except DataError as exc:
            if cfg.on_error == "fail":
                raise DataError(f"{exc} (--on-error fail)") from None
            errors.append(str(exc))
        progress.add(0, len(raw) + 1)
    if batch:
        encode_batch()
    if seen != part.records:
        raise DataError(f"{path}: holds {seen} records in bytes {part.start}-{part.end}, the pre-pass counted "
                        f"{part.records} (was the file changed during the run?)")
    return items, uses, errors


def _order(uses: list[int], whole: int) -> list[int]:
    """Pass-major order: every selected record once per full pass, then the records of the seeded subset."""
    order = [i for _ in range(whole) for i in range(len(uses))]
    return order + [i for i, u in enumerate(uses) if u > whole]


def run_part(cfg: WorkerConfig, part: Part, quota: PartQuota,
             report: Callable[[int, int], None] | None = None) -> tuple[dict[str, Any], int]:
    """Process one part into parts_dir/p<id>; returns its summary and this process's peak RSS (kB)."""
    progress = _Progress(report)
    items, uses, errors = _encode_part(cfg, part, quota, progress)
    order = _order(uses, quota.whole)
    opts = cfg.pack
    tmp = os.path.join(cfg.parts_dir, f".{part_dir_name(part.id)}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        stats = PackStats(examples_in=len(order))
        tokens_in = int(sum(len(items[i]) for i in order))
        if cfg.task == "pretrain":
            # text documents are concatenated and cut; prompt-completion records are packed whole like SFT
            # records (a cut would separate a completion from its prompt)
            whole = [i for i in order if not items[i].mask.all()]
            plans, stats = plan_sequences(items, whole, opts)
            stats.examples_in = len(order)
            rows = itertools.chain(
                chunk_documents(items, [i for i in order if items[i].mask.all()], opts.max_seq_len,
                                not opts.cross_attention),
                (materialize_compact(plan, items, opts) for plan in plans))
        else:
            np.random.default_rng([cfg.seed, 2, part.id]).shuffle(order)  # mix the records before packing
            plans, stats = plan_sequences(items, order, opts)
            rows = (materialize_compact(plan, items, opts) for plan in plans)
        writer = ShardWriter(tmp, shard_prefix(part.id), not opts.cross_attention, cfg.records_per_shard,
                             cfg.shard_sizes)
        counts = {"sequences": 0, "tokens": 0, "supervised_tokens": 0, "partial_rows": 0, "max_samples_per_row": 0}
        for row in rows:
            writer.write(row)
            if counts["sequences"] == 0 and os.environ.get("TELECHAT_MS_FAULT") == f"kill_in_part:{part.id}":
                os.killpg(os.getpgrp(), signal.SIGKILL)  # fault injection for the resume test: kill -9 the run
            counts["sequences"] += 1
            counts["tokens"] += row.n_tokens
            counts["supervised_tokens"] += row.n_supervised
            counts["partial_rows"] += row.n_tokens < opts.max_seq_len
            counts["max_samples_per_row"] = max(counts["max_samples_per_row"], row.n_samples)
        shards = writer.close()
        summary = {
            "part": part.id, "file": part.file, "fingerprint": cfg.fingerprint,
            "records_read": part.records, "records_skipped": len(errors), "records_valid": part.records - len(errors),
            "records_selected": len(order), "truncated": stats.truncated,
            "dropped_overlong": stats.dropped_overlong, "dropped_no_target": stats.dropped_no_target,
            "packed_records": stats.packed_examples,
            "tokens_in": tokens_in, "tokens_out": counts["tokens"],
            **counts, "shards": shards, "first_errors": errors[:FIRST_ERRORS],
        }
        if errors:
            atomic_write_text(os.path.join(tmp, SKIPPED), "".join(e + "\n" for e in errors))
        atomic_write_text(os.path.join(tmp, SUMMARY), json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
        final = os.path.join(cfg.parts_dir, part_dir_name(part.id))
        shutil.rmtree(final, ignore_errors=True)  # a finished copy being redone (no --resume)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress.add(0, part.end - part.start - progress.total_bytes, force=True)
    return summary, peak_rss_kb()


# ---- pool plumbing: one WorkerConfig per process, progress through a queue ------------------------------------
_STATE: dict[str, Any] = {}


def init_worker(cfg: WorkerConfig, queue) -> None:
    """Pool initializer: keep the config and the progress queue of this worker process."""
    _STATE.update(cfg=cfg, queue=queue)


def run_part_in_pool(part: Part, quota: PartQuota) -> tuple[dict[str, Any], int]:
    """run_part in a pool worker, reporting progress to the parent through the queue."""
    queue = _STATE["queue"]
    return run_part(_STATE["cfg"], part, quota, lambda tokens, nbytes: queue.put((tokens, nbytes)))
