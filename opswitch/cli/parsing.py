"""The CLI's parser type and its usage error, below every command module.

They live apart from ``main`` so that each ``*_cmd`` module can import them
at the top while ``main`` imports the commands: no import circle.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from opswitch.core.errors import OpswitchError


class UsageError(OpswitchError):
    """A bad flag or value on the command line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a UsageError (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")
