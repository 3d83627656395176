"""The environment MindSpore and MindFormers read when they are imported, set before they are: MindSpore's C++ log
level (errors only unless the user set GLOG_v) and where MindFormers writes its log (LOG_MF_PATH: the user's, else
the directory a run gives, else ~/.cache/telechat_ms/mindformers_log; never ./output/log of the working directory).
Light on purpose: importing this module imports neither of them."""
from __future__ import annotations

import os
import sys

LOG_ENV = "LOG_MF_PATH"
DEFAULTED_ENV = "TELECHAT_MS_LOG_MF_DEFAULT"   # holds LOG_MF_PATH's value when telechat_ms chose it, not the user
DEFAULT_LOG_DIR = os.path.join(os.path.expanduser("~"), ".cache", "telechat_ms", "mindformers_log")


def set_defaults() -> None:
    """GLOG_v=3 unless set (telechat_ms/__init__ calls this before anything imports MindSpore)."""
    os.environ.setdefault("GLOG_v", "3")


def use_log_dir(path: str) -> None:
    """Send MindFormers' log files under `path`/mindformers_log: effective only before MindFormers is imported
    (the trainer and the predict / serve jobs call it with their output_dir first thing). A LOG_MF_PATH the user
    set wins; the cache default a parent process set (and its children inherited) does not."""
    if "mindformers" in sys.modules:
        return
    current = os.environ.get(LOG_ENV)
    if current is None or os.environ.get(DEFAULTED_ENV) == current:
        os.environ[LOG_ENV] = os.path.join(os.path.abspath(path), "mindformers_log")
        os.environ.pop(DEFAULTED_ENV, None)


def mindformers_log_dir() -> str:
    """Where MindFormers' log goes once it is imported (the cache default when neither the user nor a run set it;
    the default is marked as ours so a child process's run may replace it)."""
    if LOG_ENV not in os.environ:
        os.environ[LOG_ENV] = os.environ[DEFAULTED_ENV] = DEFAULT_LOG_DIR
    return os.environ[LOG_ENV]
