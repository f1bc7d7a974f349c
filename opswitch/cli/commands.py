"""The list of sub-commands; each module adds its parser and a ``run``."""

from opswitch.cli import backends_cmd, generate_cmd

REGISTRARS = [generate_cmd.register, backends_cmd.register]
