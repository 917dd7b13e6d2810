"""The command line, one module per subcommand:
``python -m llamabind info|generate|chat|embed|bench|serve`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import sys

from . import bench, chat, embed, generate, info, serve
from .common import set_logging


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand with its options."""
    ap = argparse.ArgumentParser(prog="python -m llamabind",
                                 description="llamabind's command line: llama.cpp through llamabind, "
                                             "with default models from PyPI packages")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for command in (info, generate, chat, embed, bench, serve):
        command.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (errors are one line on stderr)."""
    args = build_parser().parse_args(argv)
    set_logging(args.verbose)
    import llamabind as lb

    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, lb.LlamaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
