"""The list of sub-commands; each module adds its parser and a ``run``."""

from opswitch.cli import backends_cmd

REGISTRARS = [backends_cmd.register]
