"""The list of sub-commands; each module adds its parser and a ``run``."""

from opswitch.cli import (
    backends_cmd,
    batch_cmd,
    bench_cmd,
    download_cmd,
    eval_cmd,
    export_cmd,
    export_gguf_cmd,
    generate_cmd,
    inspect_cmd,
    serve_cmd,
)

REGISTRARS = [generate_cmd.register, download_cmd.register, backends_cmd.register, bench_cmd.register]
REGISTRARS += [eval_cmd.register, export_cmd.register, export_gguf_cmd.register, inspect_cmd.register]
REGISTRARS += [serve_cmd.register]
REGISTRARS += [batch_cmd.register]
