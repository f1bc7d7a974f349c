"""``opswitch export-onnx``: write a model as a standard ONNX file.

The file goes where ``--out`` says, written to a temporary name and renamed
only once it is complete and passes ``onnx.checker``; its path is printed on
stdout, a summary on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opswitch.api import load_model
from opswitch.cli.parsing import UsageError
from opswitch.cli.progress import Progress
from opswitch.onnx import is_onnx_path, require_onnx
from opswitch.onnx.export import export_onnx


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export a model as an ONNX file (for ONNX Runtime, TensorRT, OpenVINO...)",
        description="Write a GPT-2 as an ONNX graph (opset 17, dynamic batch and sequence axes, "
        "initializers named like the checkpoint). --with-past adds the KV cache as inputs "
        "past_key_values.N.key/value and outputs present.N.key/value, as optimum names them.",
    )
    p.add_argument("--model", metavar="PATH_OR_NAME",
                   help="model directory, .onnx file or Hugging Face id; default: the demo model")
    p.add_argument("--revision", metavar="REV", help="hub revision (branch, tag or commit) to pin")
    p.add_argument("--out", metavar="FILE", required=True, help="the .onnx file to write")
    p.add_argument("--with-past", action="store_true", help="include the KV-cache inputs and outputs")
    p.add_argument("--external-data", action="store_true",
                   help="keep the weights in FILE.data beside the graph (automatic above 2 GB)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if not is_onnx_path(out):
        raise UsageError(f"--out {args.out}: name the file with the .onnx suffix")
    require_onnx()
    with Progress("Exporting") as progress:
        lm = load_model(args.model, "naive", revision=args.revision)  # the one load path, no compute
        config, params = lm.config, lm.model.host_params
        export_onnx(config, params, out, with_past=args.with_past,
                    external_data=True if args.external_data else None)
    size = out.stat().st_size + sum(p.stat().st_size for p in out.parent.glob(f"{out.name}.data"))
    print(f"✓ Wrote {out} ({size / 2**20:.1f} MB, opset 17{', with past' if args.with_past else ''}) "
          f"in {progress.elapsed:.2f}s; onnx.checker passed", file=sys.stderr)
    print(out)
    return 0
