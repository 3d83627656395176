"""`train`: a job YAML (MindFormers' vocabulary) with --key.path=value overrides, in one process or under msrun."""
from __future__ import annotations

import argparse

YAML_KEYS_HELP = ("YAML keys: every section and key is documented next to its field in telechat_ms/job_config.py "
                  "(summary in the README's Training section); override any of them as --section.key=value, "
                  "e.g. --runner_config.max_steps=100 --resume=auto.")


def _train(args: argparse.Namespace) -> int:
    from telechat_ms.job_config import load_job_config
    from telechat_ms.train.trainer import train
    train(load_job_config(args.config, args.overrides))
    return 0


def register(sub: "argparse._SubParsersAction") -> None:
    """Add train."""
    p = sub.add_parser("train", allow_abbrev=False, help="train / fine-tune from a YAML job config (also under msrun)",
                       description="Train from a job YAML. Exit 0 when done, 2 on bad input, 3 when training "
                                   "stopped on a non-finite loss.", epilog=YAML_KEYS_HELP)
    p.add_argument("--config", required=True, help="job YAML (see yaml_configs/)")
    p.set_defaults(func=_train, overrides=[], takes_overrides=True)
