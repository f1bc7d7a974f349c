"""The list of sub-commands; each module adds its parser and a ``run``."""

from opswitch.cli import backends_cmd, batch_cmd, bench_cmd, download_cmd, generate_cmd

REGISTRARS = [
    generate_cmd.register,
    batch_cmd.register,
    download_cmd.register,
    backends_cmd.register,
    bench_cmd.register,
]
