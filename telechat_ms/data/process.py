"""process-data: jsonl + data mix -> validated, tokenized, packed MindRecord shards with a manifest.

A cheap pre-pass cuts the inputs into parts (telechat_ms.data.parts) and splits the mix weights over them; each
worker takes whole parts from read to written shards (telechat_ms.data.worker); this process only schedules the
parts, shows progress, collects their small summaries and, once every part of every node is finished, writes the
manifest (telechat_ms.data.stage). Memory: O(parts) here, O(one part) in a worker. The output bytes are the same
for any --num-workers and any --num-nodes split.
"""
from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from tqdm import tqdm

from telechat_ms.data.formats import TASKS
from telechat_ms.data.mindrecord import shard_sizes
from telechat_ms.data.mix import load_mix
from telechat_ms.data.pack import OVERLONG, PAD_SIDES, PackOptions
from telechat_ms.data.parts import DEFAULT_PART_MB, Part, plan_parts
from telechat_ms.data.render import LOSS_MASKS
from telechat_ms.data.stage import (MANIFEST, MANIFEST_FORMAT, SKIPPED_FILE, finalize, finished_parts,
                                    open_staging, staging_dir)
from telechat_ms.data.tokenizer import TeleChatTokenizer, resolve_tokenizer_path
from telechat_ms.data.worker import WorkerConfig, init_worker, peak_rss_kb, run_part, run_part_in_pool
from telechat_ms.errors import DataError

ON_ERROR = ("skip", "fail")
# Options that do not change the output bytes (everything else is part of the job's fingerprint).
_RUN_ONLY = ("out", "eval_out", "num_workers", "num_nodes", "node_rank", "resume", "overwrite", "progress",
             "show_errors")
SPLITS = ("train", "eval")

__all__ = ["MANIFEST", "SKIPPED_FILE", "ProcessOptions", "finalize_output", "format_summary", "process_data"]


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
    part_size_mb: float = DEFAULT_PART_MB
    num_nodes: int = 1
    node_rank: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    show_errors: int = 5
    eval_fraction: float = 0.0          # > 0: hold out this fraction of the records (seeded) into eval_out
    eval_out: str | None = None         # the held-out half's directory; default <out>_eval

    @property
    def eval_dir(self) -> str:
        """Where the held-out half goes (--eval-out, else <out>_eval next to --out)."""
        return self.eval_out or os.path.abspath(self.out).rstrip(os.sep) + "_eval"

    def check(self) -> None:
        """Reject contradictory or out-of-range options before any work starts."""
        choices = {"task": TASKS, "on_error": ON_ERROR, "loss_mask": LOSS_MASKS,
                   "overlong": OVERLONG, "pad_side": PAD_SIDES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise DataError(f"--{name.replace('_', '-')}: {getattr(self, name)!r} is not one of {allowed}")
        for name in ("max_seq_len", "num_workers", "records_per_shard", "num_nodes"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_len < 2:
            raise DataError(f"--max-seq-len must be >= 2, got {self.max_seq_len}")
        if self.max_records_per_file is not None and self.max_records_per_file < 1:
            raise DataError(f"--max-records-per-file must be >= 1, got {self.max_records_per_file}")
        if not self.part_size_mb > 0:
            raise DataError(f"--part-size-mb must be > 0, got {self.part_size_mb}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DataError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_out and self.eval_fraction == 0:
            raise DataError("--eval-out needs --eval-fraction > 0 (nothing is held out otherwise)")
        if self.eval_fraction and os.path.abspath(self.eval_dir) == os.path.abspath(self.out):
            raise DataError(f"--eval-out {self.eval_dir}: must differ from --out")
        if not 0 <= self.node_rank < self.num_nodes:
            raise DataError(f"--node-rank must be in [0, {self.num_nodes}) for --num-nodes {self.num_nodes}, "
                            f"got {self.node_rank}")


def _mp_context() -> multiprocessing.context.BaseContext:
    """fork (instant start) while no MindSpore threads exist in this process; spawn (safe, ~1 s start) otherwise."""
    if sys.platform.startswith("linux") and "mindspore" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _file_bytes(opts: ProcessOptions, plan) -> int:
    """An upper bound of one output file's bytes, from the pre-pass alone (it sizes every file's pages): at most
    one token per input byte plus a default system prompt per record, each record used up to ceil(w) times, 4 bytes
    per column, capped by records_per_shard full rows."""
    columns = 2 if opts.cross_attention else 3
    per_part = max((p.end - p.start + 64 * p.records) * (q.whole + (q.extra > 0)) for p, q in
                   zip(plan.parts, plan.quotas))
    return int(min(per_part, opts.records_per_shard * opts.max_seq_len) * 4 * columns)


def _job(opts: ProcessOptions, tokenizer: TeleChatTokenizer, mix, plan, split: str = "") -> dict[str, Any]:
    """job.json: what the final step needs to write the manifest, wherever it runs."""
    with_pos = not opts.cross_attention
    return {
        **({"split": {"name": split, "eval_fraction": opts.eval_fraction, "seed": opts.seed,
                      "rule": "a record is held out when the seeded hash of (seed, mix key, record index) falls "
                              "below eval_fraction; the eval half holds each held-out record once, the train half "
                              "every other record with the mix weights",
                      "train_dir": os.path.abspath(opts.out), "eval_dir": os.path.abspath(opts.eval_dir)}}
           if split else {}),
        "format": MANIFEST_FORMAT, "fingerprint": plan.fingerprint, "task": opts.task,
        "max_seq_len": opts.max_seq_len, "num_parts": len(plan.parts), "num_nodes": opts.num_nodes,
        "rows": f"compact: real tokens only; readers pad to max_seq_len on the {opts.pad_side} with <_pad> (3), "
                f"labels -100" + (", position_ids 0, 1, ... (a segment of their own)" if with_pos else ""),
        "columns": {"input_ids": ["int32", [-1]], "labels": ["int32", [-1]],
                    **({"position_ids": ["int32", [-1]]} if with_pos else {})},
        "labels": "token id where supervised, -100 elsewhere; not shifted (the model shifts)",
        "options": {k: v for k, v in asdict(opts).items() if k not in ("progress", "show_errors", "resume")
                    and not (k in ("eval_fraction", "eval_out") and not opts.eval_fraction)},
        "tokenizer": {"path": tokenizer.model_file, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
        "mix": [{"key": e.key, "path": e.path, "weight": e.weight, "records": n}
                for e, n in zip(mix, plan.records_per_file)],
    }


class _Bar:
    """tqdm in tokens/s; its total is estimated from the bytes done so far (the pre-pass knows all the bytes)."""

    def __init__(self, total_bytes: int, parts: int, enabled: bool):
        self.total_bytes, self.bytes, self.tokens, self.parts, self.done = max(total_bytes, 1), 0, 0, parts, 0
        self.bar = tqdm(total=None, desc="process-data", unit="tok", unit_scale=True, disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True)

    def update(self, tokens: int, nbytes: int) -> None:
        self.tokens += tokens
        self.bytes += nbytes
        if self.bytes:
            self.bar.total = max(self.tokens, int(self.tokens * self.total_bytes / self.bytes))
        self.bar.update(tokens)

    def part_done(self) -> None:
        self.done += 1
        self.bar.set_postfix_str(f"parts {self.done}/{self.parts}")

    def close(self) -> None:
        self.bar.close()


def _run_parts(cfg: WorkerConfig, todo: list[tuple[Part, Any]], workers: int, make_bar: Callable[[], _Bar],
               on_summary: Callable[[_Bar, dict], None]) -> int:
    """Process the parts (in this process for one worker, else in a pool); returns the workers' peak RSS (kB)."""
    peak = 0
    if workers == 1 or len(todo) <= 1:
        bar = make_bar()
        try:
            for part, quota in todo:
                summary, _ = run_part(cfg, part, quota, bar.update)
                on_summary(bar, summary)
        finally:
            bar.close()
        return peak_rss_kb()
    ctx = _mp_context()
    queue = ctx.Queue()
    pool = ctx.Pool(min(workers, len(todo)), initializer=init_worker, initargs=(cfg, queue))
    bar = make_bar()  # after the fork: tqdm's monitor thread must not exist when the workers start
    try:
        pending = [pool.apply_async(run_part_in_pool, task) for task in todo]
        while pending:
            try:
                while True:
                    bar.update(*queue.get(timeout=0.1))
            except queue_module.Empty:  # nothing reported in the last 0.1 s
                pass
            still = []
            for result in pending:
                if result.ready():
                    summary, hwm = result.get()  # re-raises a worker's DataError here
                    peak = max(peak, hwm)
                    on_summary(bar, summary)
                else:
                    still.append(result)
            pending = still
        while not queue.empty():
            bar.update(*queue.get())
    finally:
        bar.close()
        pool.terminate()
        pool.join()
    return peak


def process_data(opts: ProcessOptions, log: Callable[[str], None] | None = None,
                 stats: dict | None = None) -> dict[str, Any]:
    """Run this node's share of the job; returns the summary (the manifest's counts once every part is finished).

    With eval_fraction > 0 the records are split (seeded, disjoint) into the training half at `out` and the
    held-out half at `eval_dir`, two complete outputs with their own manifests; the summary is the training
    half's, with the held-out half's under "eval". `stats`, when given, receives the run's timings and peak memory
    (parent and workers), which never go into the output.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    opts.check()
    if not opts.eval_fraction:
        return _process(opts, opts.out, "", log, stats)
    for path in (opts.out, opts.eval_dir):  # before any work: neither half may be in the way
        if os.path.exists(path) and not opts.overwrite and (not os.path.isdir(path) or os.listdir(path)):
            raise DataError(f"{path}: output already exists (pass --overwrite to replace it)")
    summary = _process(opts, opts.out, "train", log, stats)
    try:
        summary["eval"] = _process(opts, opts.eval_dir, "eval", log, None)
    except DataError as exc:
        if "no usable records" in str(exc):
            raise DataError(f"--eval-fraction {opts.eval_fraction}: the held-out half has no usable records "
                            f"(raise the fraction or add data): {exc}") from None
        raise
    summary["eval"]["out"] = os.path.abspath(opts.eval_dir)
    return summary


def _process(opts: ProcessOptions, out: str, split: str, log: Callable[[str], None],
             stats: dict | None) -> dict[str, Any]:
    """One output directory: the whole job, or one half of a split (split 'train' / 'eval')."""
    start = time.perf_counter()
    out = os.path.abspath(out)
    if os.path.exists(out) and not opts.overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"{out}: output already exists (pass --overwrite to replace it)")
    tokenizer = TeleChatTokenizer(resolve_tokenizer_path(opts.tokenizer))
    mix = load_mix(opts.data_mix)
    settings = {k: v for k, v in asdict(opts).items() if k not in _RUN_ONLY}
    if not opts.eval_fraction:
        settings.pop("eval_fraction")  # jobs without a split keep the fingerprint they always had
    settings["tokenizer"] = tokenizer.sha256
    if split:
        settings["split"] = split
    plan = plan_parts(mix, opts.part_size_mb, opts.max_records_per_file, opts.seed, settings)
    if not plan.parts:
        raise DataError(f"{opts.data_mix}: no records (every input file is empty)")
    prepass = time.perf_counter() - start
    single = opts.num_nodes == 1
    mine = [p.id for p in plan.parts if p.id % opts.num_nodes == opts.node_rank]
    staging = staging_dir(out)
    staging_existed = os.path.isdir(staging)
    try:
        staging, skip = open_staging(out, _job(opts, tokenizer, mix, plan, split), resume=opts.resume,
                                     overwrite=opts.overwrite, mine=mine, single_node=single)
        pack = PackOptions(opts.max_seq_len, opts.overlong, opts.pad_side, opts.cross_attention, opts.pack,
                           tuple(tokenizer.encode_plain("\n")))
        cfg = WorkerConfig(tokenizer, [e.path for e in mix], os.path.join(staging, "parts"), plan.fingerprint,
                           opts.task, opts.loss_mask, opts.on_error, opts.seed, pack, opts.records_per_shard,
                           shard_sizes(opts.max_seq_len, not opts.cross_attention, _file_bytes(opts, plan)),
                           split=split, eval_fraction=opts.eval_fraction, keys=tuple(e.key for e in mix))
        todo = [(plan.parts[i], plan.quotas[i]) for i in mine if i not in skip]
        todo.sort(key=lambda t: -(t[0].end - t[0].start))  # biggest first: workers finish together
        errors = {"shown": 0, "total": 0}

        def on_summary(bar: _Bar, summary: dict) -> None:
            bar.part_done()
            errors["total"] += summary["records_skipped"]
            for message in summary["first_errors"]:
                if errors["shown"] < opts.show_errors:
                    log(f"skipped {message}")
                    errors["shown"] += 1

        total_bytes = sum(p.end - p.start for p, _ in todo)
        worker_peak = _run_parts(cfg, todo, opts.num_workers, lambda: _Bar(total_bytes, len(todo), opts.progress),
                                 on_summary)
        if errors["total"] > errors["shown"]:
            log(f"... and {errors['total'] - errors['shown']} more bad lines skipped (all of them are listed in "
                f"{SKIPPED_FILE})")
        parts_time = time.perf_counter() - start - prepass
        done = finished_parts(staging)
        summary: dict[str, Any]
        if len(done) == len(plan.parts):
            summary = finalize(out, overwrite=opts.overwrite) or {"finalized": False}
        else:
            summary = {"finalized": False}
        if not summary.get("finalized", True):
            summary.update(parts_total=len(plan.parts), parts_finished=len(done), node_rank=opts.node_rank,
                           num_nodes=opts.num_nodes, out=out)
    except DataError:
        if single and not staging_existed:
            shutil.rmtree(staging, ignore_errors=True)  # bad input in a fresh run: nothing worth resuming
        raise
    seconds = {"prepass": prepass, "parts": parts_time, "finalize": time.perf_counter() - start - prepass - parts_time}
    summary["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    if stats is not None:
        stats.update(seconds=seconds, parts=len(plan.parts), parts_run=len(todo), parts_skipped=len(skip),
                     parent_peak_rss_kb=peak_rss_kb(), worker_peak_rss_kb=worker_peak)
    return summary


def finalize_output(out: str, overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`process-data --finalize OUT`: check every part of a multi-node run and write the manifest."""
    counts = finalize(out, overwrite=overwrite, force=True, log=log or (lambda msg: print(msg, file=sys.stderr)))
    return counts or {}


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable summary lines for the CLI."""
    s = summary
    if s.get("finalized") is False:
        return (f"node {s['node_rank']} of {s['num_nodes']} done: {s['parts_finished']} of {s['parts_total']} parts "
                f"finished; the last node to finish writes {s['out']} (or run `telechat-ms process-data --finalize "
                f"{s['out']}`)")
    lines = [
        f"records: {s['records_read']} read, {s['records_skipped']} skipped (bad lines), "
        f"{s['records_selected']} selected by the mix, {s['truncated']} truncated, {s['dropped']} dropped "
        f"({s['dropped_overlong']} over-long, {s['dropped_no_target']} without supervised tokens)",
        f"rows: {s['sequences']} in {s['parts']} parts ({s['packed_records']} records packed with others, "
        f"{s['partial_rows']} rows not full), slot fill {s['slot_fill']:.2%}",
        f"tokens: {s['tokens_in']} in, {s['tokens']} written, supervised: {s['supervised_tokens']}, padding ratio: "
        f"{s['padding_ratio']:.2%}, {s['bytes_per_token']:.2f} bytes per token",
    ]
    if "seconds" in s:
        lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in s["seconds"].items()))
    return "\n".join(lines)
