"""`telechat-ms <command>`: one table of sub-commands, one override syntax, one error handler.

Every command module in telechat_ms/commands registers its parsers; commands that read a job YAML take
`--key.path=value` overrides (MindFormers style) after their own options. Bad input of any kind ends with
"telechat-ms COMMAND: error: ..." on stderr and the error's exit code (2; 3 for a training stop), no traceback.
"""
from __future__ import annotations

import argparse
import sys

from telechat_ms.commands import checkpoints, data, infer, plan, serve, train
from telechat_ms.commands import eval as eval_cmd
from telechat_ms.errors import TeleChatError

COMMANDS = (checkpoints, data, train, infer, plan, serve, eval_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The telechat-ms parser with every command of COMMANDS."""
    parser = argparse.ArgumentParser(prog="telechat-ms", description="TeleChat2 on MindSpore: convert, prepare "
                                     "data, train, plan, infer, serve, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def split_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> None:
    """Leftover `--key.path=value` arguments become args.overrides for commands that read a YAML."""
    if not unknown:
        return
    if not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    bad = [u for u in unknown if not (u.startswith("--") and "=" in u)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (YAML overrides are written --key.path=value)")
    args.overrides = list(args.overrides) + unknown


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    split_overrides(parser, args, unknown)
    try:
        return int(args.func(args) or 0)
    except (TeleChatError, FileExistsError, PermissionError, FileNotFoundError) as exc:
        print(f"telechat-ms {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)


if __name__ == "__main__":
    sys.exit(main())
