"""``opswitch eval``: how well a model predicts a text (loss, perplexity, bits per byte).

The figures go to stdout (a table, or one JSON object with ``--json``); the
model, backend and a progress bar (on a terminal only) go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from opswitch.api import load_model
from opswitch.cli.model_args import add_model_arguments, loading_label
from opswitch.cli.parsing import UsageError
from opswitch.cli.progress import Bar, Progress
from opswitch.core.files import not_a_file
from opswitch.generation.evaluate import evaluate


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure a model's loss and perplexity on a text file",
        description="Score a text with a model: tokens scored, mean loss (nats/token), perplexity and "
        "bits per byte. Texts longer than the model's context are scored in sliding windows of the "
        "context's length, one every --stride tokens, each scoring only the tokens not scored before "
        "(Hugging Face's method for fixed-length models).",
    )
    add_model_arguments(p)
    p.add_argument("--text", metavar="FILE", required=True, help="UTF-8 text file to score; '-' reads stdin")
    p.add_argument("--stride", type=int, metavar="N",
                   help="tokens between window starts (default: the context, i.e. disjoint windows)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens of the text")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run)


def read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    problem = not_a_file(path)
    if problem == "missing":
        raise UsageError(f"no such text file: {path}")
    if problem:
        raise UsageError(f"{path} is {problem}, not a text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"no such text file: {path}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


def run(args: argparse.Namespace) -> int:
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UsageError("--max-tokens must be at least 2 (one token of context, one scored)")
    text = read_text(args.text)
    with Progress(loading_label(args)):
        lm = load_model(args.model, backend=args.backend, tokenizer=args.tokenizer,
                        weights=args.weights, revision=args.revision, kv_cache=args.kv_cache)
    if lm.tokenizer is None:
        raise UsageError(f"{args.model} carries no tokenizer (ONNX files never do): pass --tokenizer PATH")
    context = lm.config.n_positions
    if args.stride is not None and not 1 <= args.stride <= context:
        raise UsageError(f"--stride must be between 1 and the model's context ({context}), not {args.stride}")
    ids = lm.encode(text)[: args.max_tokens]
    if len(ids) < 2:
        raise UsageError(f"{args.text} holds {len(ids)} token(s): scoring needs at least two")
    print(f"Model: {lm.source}", file=sys.stderr)
    print(f"✓ Backend: {lm.selection_reason}", file=sys.stderr)
    bar = Bar("Scoring")
    started = time.perf_counter()
    try:
        result = evaluate(lm.model, ids, stride=args.stride, on_window=bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    n_bytes = len(lm.tokenizer.decode_bytes(result.scored_ids(ids)))
    figures = {
        "model": lm.source,
        "backend": lm.backend.name,
        "text": args.text,
        "tokens": len(ids),
        "tokens_scored": result.tokens,
        "bytes_scored": n_bytes,
        "windows": len(result.windows),
        "context": context,
        "stride": args.stride or context,
        "loss": result.loss,
        "perplexity": result.perplexity,
        "bits_per_byte": result.bits_per_byte(n_bytes),
        "seconds": round(seconds, 3),
    }
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"Scored {result.tokens} of {len(ids)} tokens in {len(result.windows)} window(s) of up to "
          f"{context} (stride {figures['stride']}) in {seconds:.2f}s")
    print(f"  loss        {result.loss:.4f} nats/token")
    print(f"  perplexity  {result.perplexity:.2f}")
    print(f"  bits/byte   {figures['bits_per_byte']:.4f}")
    return 0
