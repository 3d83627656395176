"""The staging area of process-data and its final step: nothing looks finished until the output is complete.

    <parent>/.<name>.incomplete/   job.json (what finalize needs; its fingerprint is the job's identity)
                                   parts/p000012/ (a finished part: shards, summary.json, skipped.txt)
                                   parts/.p000012.tmp-<host>-<pid>/ (a part being written)
    <parent>/<name>/               appears only when every part is finished, by a rename of the staging area

Every node of a multi-node run shares the staging area (a shared file system) and writes only its own parts; the
last node to finish (or `process-data --finalize OUT`) checks every part's summary, moves the shards into place,
writes manifest.json and renames the directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable

from telechat_ms.data.worker import SKIPPED, SUMMARY, part_dir_name
from telechat_ms.errors import DataError
from telechat_ms.io import atomic_write_text, read_json_object

JOB = "job.json"
PARTS = "parts"
LOCK = "finalize.lock"
MANIFEST = "manifest.json"
SKIPPED_FILE = "skipped_lines.txt"
MANIFEST_FORMAT = "telechat_ms.process_data/2"
_SUMMED = ("records_read", "records_skipped", "records_valid", "records_selected", "truncated", "dropped_overlong",
           "dropped_no_target", "packed_records", "sequences", "tokens", "supervised_tokens", "tokens_in",
           "tokens_out", "partial_rows")


def staging_dir(out: str) -> str:
    """The hidden sibling directory a run writes into before the final rename."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.incomplete")


def _read_json(path: str) -> dict:
    try:
        return read_json_object(path, DataError)
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror})") from None


def finished_parts(staging: str) -> set[int]:
    """Ids of the parts whose directory is in place (renamed only once complete)."""
    parts = os.path.join(staging, PARTS)
    if not os.path.isdir(parts):
        return set()
    return {int(name[1:]) for name in os.listdir(parts) if name.startswith("p") and name[1:].isdigit()}


def open_staging(out: str, job: dict, *, resume: bool, overwrite: bool, mine: list[int],
                 single_node: bool) -> tuple[str, set[int]]:
    """Create or join the staging area of `job`; returns it and the finished parts of this node to skip.

    A staging area of another job (other inputs or options) is discarded only with --overwrite on a single node;
    finished parts of this node are kept only with --resume (redone with --overwrite, an error otherwise).
    """
    staging = staging_dir(out)
    job_path = os.path.join(staging, JOB)
    if os.path.isfile(job_path):
        old = _read_json(job_path)
        if old.get("fingerprint") != job["fingerprint"]:
            if not (overwrite and single_node):
                raise DataError(f"{staging}: an interrupted run of a different job (other inputs or options) is "
                                f"here; pass --overwrite to discard it" + ("" if single_node else
                                " (on a single node), or remove it"))
            shutil.rmtree(staging)
    os.makedirs(os.path.join(staging, PARTS), exist_ok=True)
    if not os.path.isfile(job_path):
        fd, tmp = tempfile.mkstemp(prefix=".job-", dir=staging)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(job, fh, ensure_ascii=False, indent=1)
        try:
            os.link(tmp, job_path)  # atomic, and never replaces the file another node wrote first
        except FileExistsError:
            if _read_json(job_path).get("fingerprint") != job["fingerprint"]:
                raise DataError(f"{job_path}: another node started a different job here") from None
        finally:
            os.unlink(tmp)
    mine_set = set(mine)
    for name in os.listdir(os.path.join(staging, PARTS)):  # parts this node was writing when it crashed
        if name.startswith(".p") and ".tmp-" in name and int(name[2:8]) in mine_set:
            shutil.rmtree(os.path.join(staging, PARTS, name), ignore_errors=True)
    done = finished_parts(staging) & mine_set
    if done and not resume and not overwrite:
        raise DataError(f"{out}: {len(done)} of this node's {len(mine)} parts were finished by an earlier run "
                        f"(pass --resume to keep them, or --overwrite to redo them)")
    return staging, (done if resume else set())


def _check_part(staging: str, part_id: int, fingerprint: str) -> dict:
    """A finished part's summary, checked against the job and against the files it lists."""
    folder = os.path.join(staging, PARTS, part_dir_name(part_id))
    summary = _read_json(os.path.join(folder, SUMMARY))
    if summary.get("fingerprint") != fingerprint or summary.get("part") != part_id:
        raise DataError(f"{folder}: its summary belongs to another job or part")
    for shard in summary["shards"]:
        sizes = []
        for where in (folder, staging):  # before or after the move of an interrupted finalize
            path = os.path.join(where, shard["name"])
            if os.path.isfile(path) and os.path.isfile(path + ".db"):
                sizes.append(os.path.getsize(path) + os.path.getsize(path + ".db"))
        if shard["bytes"] not in sizes:
            raise DataError(f"{folder}/{shard['name']}: missing or not {shard['bytes']} bytes as its summary says")
    return summary


def _move_into_place(staging: str, out: str, overwrite: bool) -> None:
    out = os.path.abspath(out)
    if os.path.exists(out):
        if not overwrite:
            raise DataError(f"{out}: output already exists (pass --overwrite to replace it)")
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.replace(out, os.path.join(old, "x"))
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def _mix_report(job: dict, summaries: list[dict]) -> list[dict]:
    keys = ("records_read", "records_skipped", "records_valid", "records_selected")
    report = [{"key": m["key"], "path": m["path"], "weight": m["weight"], **{k: 0 for k in keys}}
              for m in job["mix"]]
    for s in summaries:
        for k in keys:
            report[s["file"]][k] += s[k]
    return report


def totals(job: dict, summaries: list[dict]) -> dict[str, Any]:
    """The run's counts from its parts' summaries (what the manifest and the CLI report)."""
    t: dict[str, Any] = {k: sum(s[k] for s in summaries) for k in _SUMMED}
    t["dropped"] = t["dropped_overlong"] + t["dropped_no_target"]
    t["max_samples_per_row"] = max((s["max_samples_per_row"] for s in summaries), default=0)
    slots = t["sequences"] * job["max_seq_len"]
    t["padding_tokens"] = slots - t["tokens"]
    t["padding_ratio"] = round(t["padding_tokens"] / slots, 6) if slots else 0.0
    t["slot_fill"] = round(t["tokens"] / slots, 6) if slots else 0.0
    t["parts"] = len(summaries)
    t["bytes"] = sum(sh["bytes"] for s in summaries for sh in s["shards"])
    t["bytes_per_token"] = round(t["bytes"] / t["tokens"], 3) if t["tokens"] else 0.0
    return t


def finalize(out: str, overwrite: bool = False, force: bool = False,
             log: Callable[[str], None] = lambda msg: None) -> dict[str, Any] | None:
    """Check every part, write manifest.json, rename the staging area to `out`; returns the counts.

    Returns None when another node holds the finalize lock. `force` (an explicit `--finalize`) breaks a lock a
    crashed finalize left behind.
    """
    staging = staging_dir(out)
    job_path = os.path.join(staging, JOB)
    if not os.path.isfile(job_path):
        if os.path.isfile(os.path.join(out, MANIFEST)):
            raise DataError(f"{out}: already finalized")
        raise DataError(f"{staging}: no process-data run to finalize here (job.json missing)")
    job = _read_json(job_path)
    lock = os.path.join(staging, LOCK)
    if force:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    try:
        done = finished_parts(staging)
        missing = [i for i in range(job["num_parts"]) if i not in done]
        if missing:
            nodes = sorted({i % job["num_nodes"] for i in missing})
            raise DataError(f"{out}: {len(missing)} of {job['num_parts']} parts are not finished (first: "
                            f"{missing[:8]}; node ranks {nodes} of {job['num_nodes']}); run those nodes "
                            f"(with --resume) first")
        summaries = [_check_part(staging, i, job["fingerprint"]) for i in range(job["num_parts"])]
        counts = totals(job, summaries)
        if not counts["sequences"]:
            raise DataError(f"{job['options']['data_mix']}: no usable records (every record was skipped or "
                            f"dropped)")
        first_errors: list[str] = []
        with open(os.path.join(staging, ".skipped.tmp"), "w", encoding="utf-8") as skipped:
            for s in summaries:
                first_errors.extend(s["first_errors"][:max(0, 20 - len(first_errors))])
                if s["records_skipped"]:
                    with open(os.path.join(staging, PARTS, part_dir_name(s["part"]), SKIPPED),
                              encoding="utf-8") as fh:
                        shutil.copyfileobj(fh, skipped)
        if counts["records_skipped"]:
            os.replace(os.path.join(staging, ".skipped.tmp"), os.path.join(staging, SKIPPED_FILE))
        else:
            os.unlink(os.path.join(staging, ".skipped.tmp"))
        shards = []
        for s in summaries:
            folder = os.path.join(staging, PARTS, part_dir_name(s["part"]))
            for shard in s["shards"]:
                for suffix in ("", ".db"):
                    src = os.path.join(folder, shard["name"] + suffix)
                    if os.path.exists(src):
                        os.replace(src, os.path.join(staging, shard["name"] + suffix))
                shards.append({"name": shard["name"], "records": shard["records"], "part": s["part"]})
        manifest = {**{k: job[k] for k in ("format", "task", "max_seq_len", "rows", "columns", "labels", "options",
                                             "tokenizer", "fingerprint")},
                    **({"split": job["split"]} if "split" in job else {}),
                    "mix": _mix_report(job, summaries), "counts": counts, "shards": shards,
                    "first_errors": first_errors}
        atomic_write_text(os.path.join(staging, MANIFEST), json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
        shutil.rmtree(os.path.join(staging, PARTS))
        os.unlink(job_path)
        os.unlink(lock)
        _move_into_place(staging, out, overwrite)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        raise
    log(f"finalized {os.path.abspath(out)}: {job['num_parts']} parts, {counts['sequences']} rows")
    return counts
