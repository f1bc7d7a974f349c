"""``opswitch``: the entry point, sub-command dispatch and error policy.

Exit codes: 0 ok, 2 a usage or input error (one line on stderr saying what is
wrong and what to do), 1 an unexpected failure (a bug: we show the traceback
only with ``OPSWITCH_DEBUG=1``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from opswitch import __version__
from opswitch.core.errors import OpswitchError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(OpswitchError):
    """A bad flag or value on the command line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a UsageError (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> OneLineParser:
    from opswitch.cli import commands

    parser = OneLineParser(
        prog="opswitch",
        description="Run GPT-2-family language models on any compute backend.",
    )
    parser.add_argument("--version", action="version", version=f"opswitch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for register in commands.REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.run(args) or EXIT_OK
    except OpswitchError as exc:
        print(f"opswitch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nopswitch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `opswitch generate ... | head` closed the pipe: not an error
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # a bug: say so plainly, keep the details one flag away
        if os.environ.get("OPSWITCH_DEBUG"):
            traceback.print_exc()
        print(
            f"opswitch: internal error: {type(exc).__name__}: {exc} "
            "(set OPSWITCH_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
