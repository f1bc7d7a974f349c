"""``opswitch generate``: load once, then generate from a prompt or a REPL.

Text goes to stdout (streamed token by token, so it can be piped);
everything else (model summary, backend, settings, speed) to stderr.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from opswitch.api import load_model
from opswitch.cli.model_args import add_model_arguments, loading_label
from opswitch.cli.parsing import UsageError
from opswitch.cli.progress import Progress
from opswitch.cli.repl import Repl
from opswitch.cli.session import Console, generate_once, model_summary, show_settings
from opswitch.core.errors import GenerationError
from opswitch.generation import GenerationConfig
from opswitch.generation.loop import EMPTY_PROMPT, check_request, resolve_stop_token

if TYPE_CHECKING:
    from opswitch.api import LanguageModel

MAX_N = 128  # as the server's n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt (or interactively)",
        description="Generate text with a GPT-2-family model. Without --model, the small demo "
        "model shipped with opswitch is used.",
    )
    add_model_arguments(p)
    p.add_argument("--prompt", metavar="TEXT",
                   help="prompt text; '-' reads stdin (also the default when piped)")
    p.add_argument("--interactive", "-i", action="store_true", help="interactive prompt loop (REPL)")
    p.add_argument("--max-tokens", type=int, default=100, metavar="N",
                   help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, metavar="K", help="0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P", help="0 = off (default 0.9)")
    p.add_argument("--seed", type=int, metavar="N", help="random seed (default: a fresh one, printed)")
    p.add_argument("--stop-token", type=int, metavar="ID",
                   help="stop at this token id; -1 = never (default: <|endoftext|>)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end the text where TEXT first appears (not printed); repeat for up to four")
    p.add_argument("-n", type=int, default=1, metavar="N",
                   help="N completions of the prompt, seeds SEED, SEED+1, ... as the server's n (default 1)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the generated text")
    p.set_defaults(run=run)


def settings_from(args: argparse.Namespace) -> GenerationConfig:
    """Validate every flag before anything slow happens."""
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens {args.max_tokens}: max_new_tokens must be at least 1")
    if not 1 <= args.n <= MAX_N:
        raise UsageError(f"-n {args.n}: the number of completions must be between 1 and {MAX_N}")
    if args.n > 1 and args.interactive:
        raise UsageError("-n is for one prompt, not --interactive")
    return GenerationConfig(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(2**31),
        stop_token="eos" if args.stop_token is None else args.stop_token,
        use_kv_cache=not args.no_kv_cache,
        stop=tuple(args.stop or ()),
    )


def read_prompt(args: argparse.Namespace) -> str | None:
    if args.interactive:
        if args.prompt not in (None, "-"):
            return args.prompt
        return None
    if args.prompt == "-" or (args.prompt is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
        return text[:-1] if text.endswith("\n") else text
    if args.prompt is None:
        raise UsageError("no prompt: give --prompt TEXT, pipe text on stdin, or use --interactive")
    return args.prompt


def load(args: argparse.Namespace) -> tuple[LanguageModel, list[str]]:
    """Load through ``opswitch.load_model`` (the one load path), with progress on a TTY.

    Returns the model and its summary lines, printed by the caller once every
    check has passed, so that any failure is exactly one line on stderr.
    """
    with Progress(loading_label(args)):
        lm = load_model(args.model, args.backend, tokenizer=args.tokenizer or None, revision=args.revision,
                        weights=args.weights, kv_cache=args.kv_cache)
    if lm.tokenizer is None:  # text in, text out: the CLI needs one (said in its own flags)
        raise UsageError(f"{args.model or lm.source} has no tokenizer files (ONNX files never do): "
                         "pass --tokenizer DIR, a folder with vocab.json and merges.txt or tokenizer.json")
    same = args.model and Path(args.model).expanduser().resolve() == Path(lm.source).resolve()
    label = None if same else (args.model or "the built-in demo model")
    return lm, model_summary(lm, label)


def check_fits(lm: LanguageModel, prompt: str | None, config: GenerationConfig) -> None:
    """Settings that depend on the model (stop token, prompt length), checked before
    anything is printed; the REPL's later prompts are checked as they come."""
    if prompt:
        check_request(lm.model, lm.encode_prompt(prompt), config)
    else:
        resolve_stop_token(lm.model, config)


def run(args: argparse.Namespace) -> int:
    console = Console(args.quiet)
    config = settings_from(args)
    prompt = read_prompt(args)
    if not args.interactive and not prompt:
        raise GenerationError(EMPTY_PROMPT)
    lm, summary = load(args)
    check_fits(lm, prompt, config)
    for line in summary:
        console.info(line)
    show_settings(console, config)
    if args.interactive:
        return Repl(lm, config, console, first_prompt=prompt).run()
    assert prompt is not None and config.seed is not None  # required when not interactive; set above
    for i in range(args.n):
        one = config if i == 0 else config.replace(seed=config.seed + i)
        if args.n > 1:
            console.info(f"Completion {i + 1} of {args.n} (seed {one.seed}):")
        result = generate_once(lm, prompt, one, console)
        if result.stop_reason == "interrupted":
            return 130
    return 0
