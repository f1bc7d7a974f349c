"""The flags that say which model to load and where: one definition for every command."""

from __future__ import annotations

import argparse

from opswitch.core.formats import FORMATS


def backend_names() -> str:
    """The registered backends, for --help (what is installed, not what we wish were)."""
    from opswitch.core.registry import get_registry

    return ", ".join(get_registry().names()) or "none"


def add_model_arguments(p: argparse.ArgumentParser, *, weights: bool = True, tokenizer: bool = True) -> None:
    """--model, --revision, --tokenizer, --backend and --weights, as ``opswitch.load_model`` takes them."""
    p.add_argument("--model", metavar="PATH_OR_NAME",
                   help="model directory, weights file, .onnx file or Hugging Face id (gpt2, org/name);"
                   " default: the demo model")
    p.add_argument("--revision", metavar="REV", help="hub revision (branch, tag or commit) to pin")
    if tokenizer:
        p.add_argument("--tokenizer", metavar="PATH", help="tokenizer files (default: the model's own)")
    p.add_argument("--backend", metavar="SPEC[,SPEC...]",
                   help=f"auto, or NAME[:DEVICE][:DTYPE] with NAME one of {backend_names()}"
                   " (e.g. opencl:1, naive:float64); a comma list tries in order"
                   " (default: $OPSWITCH_BACKEND or auto)")
    if weights:
        p.add_argument("--weights", default="f32", choices=FORMATS,
                       help="storage format of the weight matrices on the backend (default f32)")
