"""The one door to MindFormers: its building blocks imported quietly, and MindSpore dtypes by name.

Importing MindFormers prints warnings on stdout (optional models that need `hyper_parallel`) and writes its log
under `./output/log` of whatever directory the user runs from. Imported through here, its log goes to
`$LOG_MF_PATH` if the user set it, else to the directory a run gave telechat_ms.runtime_env.use_log_dir (the
trainer and the predict / serve jobs pass their output directory) or `~/.cache/telechat_ms/mindformers_log`; its
stdout handler is moved to stderr at ERROR level, and `warnings.showwarning`, which MindFormers replaces with its
own logger, is restored.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

import mindspore as ms

from telechat_ms.runtime_env import mindformers_log_dir

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def ms_dtype(name: str) -> ms.dtype:
    """MindSpore dtype of a config dtype name ('float32', 'float16', 'bfloat16')."""
    return _DTYPES[name]


def _import_quietly():
    """Import mindformers with its stdout handlers captured, then point them at stderr for errors only."""
    mindformers_log_dir()
    shown = warnings.showwarning
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        import mindformers  # noqa: F401  (the package import registers every model: ~10 s)
    warnings.showwarning = shown
    for name in list(logging.root.manager.loggerDict):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if getattr(handler, "stream", None) is captured:
                handler.setStream(sys.stderr)
                handler.setLevel(logging.ERROR)


_import_quietly()

# pylint: disable=wrong-import-position
from mindformers.core.optim import AdamW  # noqa: E402
from mindformers.models.llama.llama_layer import LlamaEmbedding, LlamaRMSNorm, LlamaSiLU  # noqa: E402
from mindformers.modules.flash_attention import FlashAttention  # noqa: E402
from mindformers.modules.layers import Linear  # noqa: E402

__all__ = ["AdamW", "FlashAttention", "LlamaEmbedding", "LlamaRMSNorm", "LlamaSiLU", "Linear", "ms_dtype"]
