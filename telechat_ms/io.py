"""Atomic file and directory writes: temp + rename, so a crash never leaves half-written output."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator


def atomic_write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` via a temporary file in the same directory and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output_dir(final: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling directory of `final`; rename it to `final` only if the block succeeds.

    On any error the temporary directory is removed and `final` is untouched.
    """
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    if os.path.exists(final) and not overwrite:
        if not os.path.isdir(final) or os.listdir(final):
            raise FileExistsError(f"{final}: output already exists (not an empty directory)")
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    except OSError as exc:
        raise PermissionError(f"{final}: cannot write output here ({exc.strerror})") from exc
    try:
        yield tmp
        if os.path.exists(final):
            old = final + ".old-" + os.path.basename(tmp)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(path: str, error: type[Exception] = ValueError) -> dict:
    """Parse a JSON file that must hold an object; `error` names the file (and line for syntax errors). A UTF-8
    byte-order mark is tolerated (editors on Windows write one)."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data
