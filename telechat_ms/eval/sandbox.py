"""Running model-written programs (HumanEval, MBPP) as safely as a subprocess allows: each program in its own Python
process (isolated mode, stdin closed) in a fresh temporary working directory, with a wall-clock timeout, CPU-time,
address-space and file-size limits, in its own process group that is killed at the end whatever happened (so
children it forked die too). Only `telechat-ms eval --allow-code-execution` calls this.

This is not a security boundary against a hostile program (no namespaces, no seccomp): run untrusted evaluations
in a container or VM, as lm-eval and HumanEval's authors advise.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

DEFAULT_TIMEOUT = 10.0          # seconds of wall clock per program
DEFAULT_MEMORY_MB = 1024        # address space per program
MAX_FILE_MB = 64


@dataclass
class RunResult:
    """How one program ended: passed (exit 0), failed (an exception / assert), timeout, memory, or killed."""

    status: str
    returncode: int | None
    output: str            # the tail of stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(timeout: float, memory_mb: int):
    import resource

    def apply() -> None:
        cpu = max(1, int(timeout) + 1)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        size = MAX_FILE_MB * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(code: str, timeout: float = DEFAULT_TIMEOUT, memory_mb: int = DEFAULT_MEMORY_MB) -> RunResult:
    """Run `code` as a Python program under the limits; never raises for what the program does."""
    with tempfile.TemporaryDirectory(prefix="telechat-sandbox-") as cwd:
        path = os.path.join(cwd, "program.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(code)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen([sys.executable, "-I", path], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_limits(timeout, memory_mb))
        try:
            out, _ = proc.communicate(timeout=timeout)
            status = None
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, _ = proc.communicate()
            status = "timeout"
        finally:
            _kill_group(proc.pid)       # whatever it forked goes with it
        text = out.decode("utf-8", "replace")[-2000:]
        rc = proc.returncode
        if status is None:
            if rc == 0:
                status = "passed"
            elif "MemoryError" in text or rc in (-signal.SIGSEGV, -signal.SIGABRT) and "memory" in text.lower():
                status = "memory"
            elif rc in (-signal.SIGXCPU, -signal.SIGKILL):
                status = "timeout"
            else:
                status = "failed"
        return RunResult(status, rc, text)


def run_programs(codes: list[str], timeout: float = DEFAULT_TIMEOUT, memory_mb: int = DEFAULT_MEMORY_MB,
                 workers: int | None = None) -> list[RunResult]:
    """run_program over many programs, a few at a time (results in order)."""
    workers = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda c: run_program(c, timeout, memory_mb), codes))
