"""The command line, one module per subcommand: ``python -m llamabind generate|chat|embed|bench|info``."""

from __future__ import annotations

import argparse
import sys

from . import bench, chat, embed, generate, info, serve
from .common import set_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llamabind", description="llamabind command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for command in (info, generate, chat, embed, bench, serve):
        command.add_parser(sub)
    args = ap.parse_args(argv)
    set_logging(args.verbose)
    import llamabind as lb

    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, lb.LlamaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
