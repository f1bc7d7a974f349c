"""``opswitch inspect``: the tensors (and for ONNX, the graph) in a weights file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opswitch.onnx.inspect import format_report, inspect_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list the tensors in a .onnx or .safetensors file, or a model directory",
        description="Print each tensor's name, dtype, shape and size and the totals; for ONNX also "
        "the opset, producer, inputs and outputs, and node counts per op type. Reads headers only.",
    )
    p.add_argument("path", metavar="FILE", help=".onnx or .safetensors file, or a model directory")
    p.add_argument("--json", action="store_true", help="print one JSON object (a list for a directory)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    reports = inspect_path(Path(args.path).expanduser())
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 and not Path(args.path).is_dir() else reports))
        return 0
    for i, report in enumerate(reports):
        if i:
            print()
        print("\n".join(format_report(report)))
    return 0
