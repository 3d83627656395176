"""A persistent cache of the compiled step graphs, so a restarted server loads most of its graphs instead of compiling.

MindSpore's own compile cache (enable_compile_cache / compile_cache_path) is unsafe to use as it is: it names each
saved graph by the order it was compiled in (compile_cache_<n>.mindir in one directory, fixed at the first use in
a process) and loads whatever file has the number, unchecked, so a process that compiles the same shapes in a
different order silently runs a graph of another shape (measured: a [3, 4] input summed as if it were [2, 4]); and
its change detection hashes only the entry script's imports outside sys.path, so an edit to an installed package
goes unnoticed. Here MindSpore's directory is a scratch directory of this process only, and the graphs live in a
store of ours, one file per graph, named by everything the graph depends on (this package's source, MindSpore's
and MindFormers' versions, the device, the model config, the cache layout, the jit level) and its input shape.
Before the process's n-th cached compile the stored graph of that exact shape, if any, is placed in the scratch
directory under the number MindSpore will look for (a hit), else that number is left free (a miss: MindSpore
compiles and writes it, and it is stored). Parameter values are not in the files (a loaded graph binds this
process's parameters), so one store serves every checkpoint of a config. Stored files are written as temp +
rename. Only for one process: never under model parallel.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import telechat_ms
from telechat_ms.errors import ConfigError

FORMAT = 2                                  # bump when the store's layout or the key changes
GRAPH_FILE = "compile_cache_{}.mindir"      # MindSpore's name of a process's n-th cached compile
DEP_HASH = "compile_dependency.hash"        # MindSpore's hash of the entry script: loads need it to match
_scratch: str | None = None                 # this process's MindSpore cache directory (fixed at first use)
_cached_compiles = 0                        # this process's cached compiles so far: MindSpore's n


def default_dir() -> str:
    """~/.cache/telechat_ms/compile (XDG_CACHE_HOME respected), as vLLM keeps its compile cache under ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "telechat_ms", "compile")


def source_digest(root: str | os.PathLike | None = None) -> str:
    """sha256 over every .py file of the package (relative path and bytes, in sorted order): any edit is a new key."""
    root = Path(root or os.path.dirname(telechat_ms.__file__))
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _versions() -> dict:
    from importlib import metadata
    import mindspore as ms
    out = {"mindspore": ms.__version__, "python": sys.version.split()[0], "machine": platform.machine()}
    try:
        out["mindformers"] = metadata.version("mindformers")
    except metadata.PackageNotFoundError:
        out["mindformers"] = None
    return out


def _atomic_copy(src: str, dst: str) -> None:
    tmp = f"{dst}.{os.getpid()}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _scratch_dir(root: str) -> str:
    """This process's MindSpore cache directory under root (stale ones of dead processes removed first)."""
    global _scratch
    if _scratch is None:
        if os.environ.get("MS_COMPILER_CACHE_ENABLE") == "1":
            raise ConfigError("MS_COMPILER_CACHE_ENABLE=1 turns on MindSpore's compile cache for every graph, keyed "
                              "by compile order (a different order loads a graph of another shape): unset it and "
                              "use --compile-cache-dir")
        os.makedirs(root, exist_ok=True)
        for old in Path(root).glob(".run-*"):
            pid = old.name.split("-")[1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        _scratch = tempfile.mkdtemp(prefix=f".run-{os.getpid()}-", dir=root)
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CompileCache:
    """The stored graphs of one step under `root`, keyed by `graph` (what the graph depends on besides its input
    shape: model config, cache layout, jit level) plus the package source, the versions and the device."""

    def __init__(self, root: str, graph: dict):
        import mindspore as ms
        self.root = str(root)
        key = {"format": FORMAT, "source": source_digest(), "versions": _versions(),
               "device": ms.get_context("device_target"), "graph": graph}
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.store = os.path.join(self.root, self.key)
        self.hits = 0
        self.misses = 0
        self.skipped = 0       # compiles without the cache: no entry script file (python -c, a notebook)

    def graph_path(self, shape: tuple[int, ...]) -> str:
        return os.path.join(self.store, "x".join(str(int(s)) for s in shape) + ".mindir")

    @contextlib.contextmanager
    def compiling(self, shape: tuple[int, ...]) -> Iterator[None]:
        """Around the first call at `shape`: MindSpore's cache on for that one compile, its n-th file being the
        stored graph of this shape or absent; a newly compiled graph is stored after."""
        import mindspore as ms
        global _cached_compiles
        if not os.path.isfile(os.path.realpath(sys.argv[0])):
            # MindSpore hashes the entry script for its cache and fails without one (python -c, a notebook)
            self.skipped += 1
            yield
            return
        graphs = os.path.join(_scratch_dir(self.root), "rank_0", "graph_cache")   # one process: rank_0
        os.makedirs(graphs, exist_ok=True)
        os.makedirs(self.store, exist_ok=True)
        work = os.path.join(graphs, GRAPH_FILE.format(_cached_compiles))
        _cached_compiles += 1
        stored, dep = self.graph_path(shape), os.path.join(self.store, DEP_HASH)
        placed = None
        if os.path.exists(stored):
            _atomic_copy(stored, work)
            st = os.stat(work)
            placed = (st.st_ino, st.st_mtime_ns)
            if os.path.exists(dep) and not os.path.exists(os.path.join(graphs, DEP_HASH)):
                _atomic_copy(dep, os.path.join(graphs, DEP_HASH))
        elif os.path.exists(work):
            os.remove(work)
        ms.set_context(enable_compile_cache=True, compile_cache_path=os.path.dirname(os.path.dirname(graphs)))
        try:
            yield
        finally:
            ms.set_context(enable_compile_cache=False)
        try:
            if placed is not None and os.path.exists(work) and (os.stat(work).st_ino,
                                                                 os.stat(work).st_mtime_ns) == placed:
                self.hits += 1
                return
            self.misses += 1                   # compiled: keep what MindSpore wrote under this compile's number
            if os.path.exists(work):
                _atomic_copy(work, stored)
            if os.path.exists(os.path.join(graphs, DEP_HASH)):
                _atomic_copy(os.path.join(graphs, DEP_HASH), dep)
        finally:
            # no graph file outlives its compile: whatever number MindSpore looks for next, the only file it can
            # find is the one placed for that compile's own shape
            for name in os.listdir(graphs):
                if name.startswith("compile_cache_") and name.endswith(".mindir"):
                    os.remove(os.path.join(graphs, name))


def paged_graph_key(cfg, num_blocks: int, block_size: int, kernels: bool, jit_level: str | None,
                    head_major: bool = False) -> dict:
    """What a paged step's graph depends on besides its input shape (the cache layout included)."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("extra", "loader")}
    return {"step": "paged", "config": config, "num_blocks": int(num_blocks), "block_size": int(block_size),
            "kernels": bool(kernels), "head_major": bool(head_major), "jit_level": jit_level}
