"""``opswitch``: the entry point, sub-command dispatch and error policy.

Exit codes: 0 ok, 2 a usage or input error (one line on stderr saying what is
wrong and what to do), 1 an unexpected failure (a bug: we show the traceback
only with ``OPSWITCH_DEBUG=1``), 130 interrupted.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
import warnings

from opswitch import __version__
from opswitch.cli import commands
from opswitch.cli.model_args import apply_threads
from opswitch.cli.parsing import OneLineParser
from opswitch.core.errors import OpswitchError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> OneLineParser:
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
    _replace_closed_streams()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        apply_threads(args)
        code = args.run(args) or EXIT_OK
        sys.stdout.flush()  # a full disk fails here, not in the interpreter's exit
        return code
    except OpswitchError as exc:
        _say(f"opswitch: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say("\nopswitch: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `opswitch generate ... | head` closed the pipe: not an error
        sys.stderr.close()
        return EXIT_OK
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            return _internal_error(exc)
        _discard_stdout()
        _say(f"opswitch: error: cannot write the output: {exc.strerror}")
        return EXIT_USAGE
    except Exception as exc:
        return _internal_error(exc)


# Writing stdout fails with these on a full disk (`>/dev/full`) or a vanished terminal;
# everything opswitch writes itself (weights, --json) reports its own errors.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _internal_error(exc: Exception) -> int:
    """A bug: say so plainly, keep the details one flag away."""
    if os.environ.get("OPSWITCH_DEBUG"):
        traceback.print_exc()
    _say(
        f"opswitch: internal error: {type(exc).__name__}: {exc} "
        "(set OPSWITCH_DEBUG=1 for the traceback, and please report it)"
    )
    return EXIT_FAILURE


def _say(line: str) -> None:
    """One line on stderr; if stderr itself cannot be written, the exit code still tells."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. an eos_token_id outside the vocabulary) as one line, like errors."""
    _say(f"opswitch: warning: {message}")


def _replace_closed_streams() -> None:
    """Python leaves a closed stdin/stdout/stderr (`<&-`, `>&-`, `2>&-`) as None, and
    print(file=None) writes to stdout: an error would land in the text output.  Use
    /dev/null instead, so input reads empty and the exit code alone tells."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode, encoding="utf-8"))


def _discard_stdout() -> None:
    """Point stdout at /dev/null so the exit's flush of what is buffered cannot fail again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass
