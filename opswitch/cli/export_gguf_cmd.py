"""``opswitch export-gguf``: write a model as a GGUF file for llama.cpp (architecture gpt2).

The file is written to a temporary name beside ``--out``, fsynced and renamed
once complete; an existing file is replaced only with ``--overwrite``, and
never one the model was read from (its file, or any file of its folder, or
the tokenizer's).  Its path is printed on stdout, a summary on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from opswitch.model.gguf_write import EXPORT_TYPES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-gguf",
        help="export a model as a GGUF file (for llama.cpp and its tools)",
        description="Write a GPT-2 as GGUF v3 (architecture gpt2) in llama.cpp's tensor layout, with its "
        "hyper-parameters and GPT-2 tokenizer: norms, biases and position embeddings in F32, the other "
        "matrices in --weights.",
    )
    p.add_argument("--model", metavar="PATH_OR_NAME",
                   help="model directory, .gguf, .onnx or .safetensors file, or Hugging Face id;"
                   " default: the demo model")
    p.add_argument("--revision", metavar="REV", help="hub revision (branch, tag or commit) to pin")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer files (default: the model's own)")
    p.add_argument("--out", metavar="FILE", required=True, help="the .gguf file to write")
    p.add_argument("--weights", default="f32", choices=EXPORT_TYPES,
                   help="the type of the weight matrices (default f32; q8_0/q4_0 as ggml quantises)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from opswitch.cli.parsing import UsageError
    from opswitch.cli.progress import Progress
    from opswitch.model.gguf_write import save_gguf
    from opswitch.tokenizer.ggml_vocab import to_ggml_vocab

    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".gguf":
        raise UsageError(f"--out {args.out}: name the file with the .gguf suffix")
    if os.path.lexists(out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; pass --overwrite to replace it, or give another name")
    if os.path.lexists(out) and not out.is_file():
        raise UsageError(f"--out {args.out} is not a regular file; give another name")
    if not out.parent.is_dir():
        raise UsageError(f"--out {args.out}: the folder {out.parent} does not exist")
    with Progress("Exporting") as progress:
        from opswitch.api import load_model

        lm = load_model(args.model, "naive", tokenizer=args.tokenizer or None, revision=args.revision)
        _refuse_inputs(out, [lm.source, args.tokenizer], UsageError)
        vocab = to_ggml_vocab(lm.tokenizer)
        counts = save_gguf(out, lm.config, lm.model.host_params, weights=args.weights, vocab=vocab,
                           name=Path(lm.source).name)
    types = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    said = "tokenizer included" if vocab else "no tokenizer (GGUF holds GPT-2 BPE tokenizers only)"
    print(f"✓ Wrote {out} ({out.stat().st_size / 2**20:.1f} MB; tensors: {types}; {said}) "
          f"in {progress.elapsed:.2f}s", file=sys.stderr)
    print(out)
    return 0


def _refuse_inputs(out: Path, sources: list[str | None], error: type[Exception]) -> None:
    """``out`` must not be a file the model or tokenizer came from (by path or by inode)."""
    try:
        target = os.stat(out)
    except OSError:
        return  # a new file: nothing of the inputs can be it
    for source in sources:
        if not source:
            continue
        path = Path(source).expanduser()
        inputs = [e.path for e in os.scandir(path)] if path.is_dir() else [path]
        for item in inputs:
            try:
                same = os.path.samestat(os.stat(item), target)
            except OSError:
                continue
            if same:
                raise error(f"--out {out} is {item}, a file the model was read from: give another name")
