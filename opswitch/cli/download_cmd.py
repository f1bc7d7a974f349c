"""``opswitch download``: put a hub model into the local cache ahead of time.

For machines that are offline later (or to pay the download once): the
folder goes to stdout so scripts can use it, everything else to stderr,
where huggingface_hub draws its progress bars when stderr is a terminal.
Failures are ModelNotFoundError / WeightsError, so `cli.main` prints one
line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from opswitch.model.hub import cache_dir, checked_hub_id, download, offline_mode


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="fetch a Hugging Face model into the local cache",
        description="Download a GPT-2-family model's config, safetensors weights and tokenizer files "
        "(never pickled weights) into the Hugging Face cache ($HF_HUB_CACHE, or $HF_HOME/hub), "
        "so that `opswitch generate --model NAME` works later without network access. "
        "Prints the local folder.",
    )
    p.add_argument("name", metavar="NAME", help="Hugging Face model id: gpt2, distilgpt2, org/name")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit hash (default: main)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    repo = checked_hub_id(args.name) + (f"@{args.revision}" if args.revision else "")
    if not offline_mode():
        print(f"Downloading {repo} into {cache_dir()}...", file=sys.stderr, flush=True)
    folder = download(args.name, revision=args.revision)
    note = " (HF_HUB_OFFLINE is set: not checked for updates)" if offline_mode() else ""
    print(f"✓ {repo} is in the cache{note}", file=sys.stderr)
    print(folder)
    return 0
