"""The lm-evaluation-harness model `telechat_ms` (lm-eval 0.4.13): `loglikelihood`, `loglikelihood_rolling` and
`generate_until` on the MindSpore model, batched (the scorer of eval/scoring.py; greedy generation through the
serving engine), from a model directory (`--model_args pretrained=DIR`) or a predict YAML (`config=PREDICT.yaml`).
`telechat-ms harness ARGS` runs lm-eval's own CLI with it registered (as MindFormers' harness adapter does), so any
lm-eval task, local task YAMLs included, runs on telechat_ms:

    telechat-ms harness --model telechat_ms --model_args pretrained=DIR --tasks mmlu --batch_size 8
"""
from __future__ import annotations

import os
import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from telechat_ms.errors import ConfigError
from telechat_ms.eval.generation import GenRequest, generate_greedy
from telechat_ms.eval.scoring import encode_pair
from telechat_ms.special_tokens import BOS_ID


def _bool(x: Any) -> bool:
    return x if isinstance(x, bool) else str(x).lower() in ("1", "true", "yes")


@register_model("telechat_ms")
class TeleChatLM(LM):
    """lm-eval's LM over a TeleChat2 checkpoint loaded by telechat_ms."""

    def __init__(self, pretrained: str | None = None, config: str | None = None, tokenizer: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, use_jit: bool | str = False,
                 **_ignored: Any):
        super().__init__()
        from telechat_ms.eval.model import load_eval_model
        if isinstance(batch_size, str):
            if batch_size.startswith("auto"):
                raise ConfigError("telechat_ms: --batch_size auto is not supported; give a number")
            batch_size = int(batch_size)
        if config:
            from telechat_ms.parallel.predict_job import load_predict_job
            job = load_predict_job(config, [])
            if job.model_parallel or job.parallel.parallel_mode != "stand_alone":
                raise ConfigError(f"{config}: the telechat_ms lm-eval model runs one stand_alone process; for a "
                                  "model-parallel model use serve --config and lm-eval's local-completions")
            pretrained, max_length = job.load_checkpoint, max_length or job.model_config.seq_length
            batch_size = job.batch_size
        if not pretrained:
            raise ConfigError("telechat_ms: --model_args pretrained=MODEL_DIR (or config=PREDICT.yaml)")
        self.em = load_eval_model(pretrained, tokenizer, int(batch_size), int(max_length) if max_length else None,
                                  use_jit=_bool(use_jit))
        self.max_length = self.em.scorer.max_len
        self.prefix_token_id = BOS_ID

    # ------------------------------------------------------------------ lm-eval's interface
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        enc = self.em.tokenizer.encode
        pairs = [encode_pair(enc, *req.args[:2], prefix_token_id=self.prefix_token_id) for req in requests]
        return self.em.scorer.score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        pairs, owner = [], []
        for i, req in enumerate(requests):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.em.tokenizer.encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            for ctx, cont in windows:
                pairs.append((list(ctx), list(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self.em.scorer.score(pairs)):
            totals[i] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        reqs = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] or {})
            if _bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0) or 0) > 0:
                raise ConfigError("telechat_ms: generate_until with do_sample: only greedy decoding is supported")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            reqs.append(GenRequest(self.em.tokenizer.encode(context), tuple(until),
                                   int(kwargs.get("max_gen_toks", 256))))
        return generate_greedy(self.em.engine, reqs, self.em.stop_ids)

    # lm-eval asks these of chat-capable models
    @property
    def tokenizer_name(self) -> str:
        return "telechat2"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from telechat_ms.chat_template import apply_chat_template
        return apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


def run_cli(argv: list[str]) -> int:
    """lm-eval's own CLI (`lm-eval run ...`) with the telechat_ms model registered; nothing reaches the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.__main__ import cli_evaluate
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = saved
    return 0
