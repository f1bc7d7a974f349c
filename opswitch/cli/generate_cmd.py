"""``opswitch generate``: load once, then generate from a prompt or a REPL.

Text goes to stdout (streamed token by token, so it can be piped);
everything else (model summary, backend, settings, speed) to stderr.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from opswitch.core.errors import OpswitchError
from opswitch.generation import GenerationConfig, GenerationResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt (or interactively)",
        description="Generate text with a GPT-2-family model. Without --model, the small demo "
        "model shipped with opswitch is used.",
    )
    p.add_argument("--model", metavar="PATH_OR_NAME",
                   help="model directory or Hugging Face id (gpt2, org/name); default: the demo model")
    p.add_argument("--revision", metavar="REV", help="hub revision (branch, tag or commit) to pin")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer files (default: the model's own)")
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
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--backend", metavar="NAME[,NAME...]",
                   help="auto, naive, blas, opencl, cuda or a plugin's name; a comma list tries in order"
                   " (default: $OPSWITCH_BACKEND or auto)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the generated text")
    p.set_defaults(run=run)


def settings_from(args: argparse.Namespace) -> GenerationConfig:
    """Validate every flag before anything slow happens."""
    return GenerationConfig(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(2**31),
        stop_token="eos" if args.stop_token is None else args.stop_token,
        use_kv_cache=not args.no_kv_cache,
    )


class Console:
    """Where output goes: text to stdout, the rest to stderr unless quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, line: str = "") -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        print(f"opswitch: error: {message}", file=sys.stderr, flush=True)

    def text(self, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()


def read_prompt(args: argparse.Namespace) -> str | None:
    from opswitch.cli.main import UsageError

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


def load(args: argparse.Namespace):
    """Select the backend first (fast failure), then load weights and tokenizer.

    Returns the model and its summary lines, printed by the caller once every
    check has passed, so that any failure is exactly one line on stderr.
    """
    from opswitch.api import LanguageModel
    from opswitch.cli.progress import Progress
    from opswitch.core.registry import get_registry
    from opswitch.model.gpt2 import GPT2
    from opswitch.model.hub import resolve_model
    from opswitch.model.weights import load_gpt2
    from opswitch.tokenizer import load_tokenizer

    selection = get_registry().select(args.backend)
    # Nothing is printed until loading succeeds, so a failure is exactly one line.
    with Progress("Loading model") as progress:
        directory = resolve_model(args.model, revision=args.revision)
        config, params = load_gpt2(directory)
        tokenizer = load_tokenizer(args.tokenizer or directory)
        model = GPT2(config, params, selection.backend)
    model.selection_reason = selection.reason
    if tokenizer.vocab_size > config.vocab_size:
        raise OpswitchError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}:"
            " pass the model's own tokenizer with --tokenizer"
        )
    label = args.model or "the built-in demo model"
    same = args.model and Path(args.model).expanduser().resolve() == Path(directory).resolve()
    summary = [
        f"Model: {directory}" if same else f"Model: {label} ({directory})",
        f"✓ Model loaded (vocab={config.vocab_size}, dim={config.n_embd}, layers={config.n_layer}, "
        f"heads={config.n_head}, context={config.n_positions}, params={_millions(config.n_params)}) "
        f"in {progress.elapsed:.2f}s",
        f"✓ Backend: {selection.reason}",
    ]
    if model.fallbacks:
        summary.append(f"  ops computed by the host reference (fallback): {', '.join(model.fallbacks)}")
    summary.append(f"✓ Tokenizer loaded (vocab size={tokenizer.vocab_size})")
    return LanguageModel(model, tokenizer, str(directory)), summary


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def show_settings(console: Console, config: GenerationConfig) -> None:
    console.info()
    console.info("Generation settings:")
    for line in describe_settings(config):
        console.info(f"  {line}")
    console.info()


def describe_settings(config: GenerationConfig) -> list[str]:
    stop = "<|endoftext|>" if config.stop_token == "eos" else (
        "none" if config.stop_token == -1 else str(config.stop_token))
    return [
        f"Max tokens:  {config.max_new_tokens}",
        f"Temperature: {config.temperature:.2f}" + ("  (greedy)" if config.greedy else ""),
        f"Top-k:       {config.top_k}" + ("  (off)" if config.top_k == 0 else ""),
        f"Top-p:       {config.top_p:.2f}" + ("  (off)" if config.top_p in (0, 1) else ""),
        f"Seed:        {config.seed}",
        f"Stop token:  {stop}",
        f"KV cache:    {'on' if config.use_kv_cache else 'off'}",
    ]


def generate_once(lm, prompt: str, config: GenerationConfig, console: Console) -> GenerationResult:
    """Stream one completion; Ctrl-C stops it cleanly, keeping what was printed."""
    ids = lm.encode(prompt)
    console.info(f"Prompt: {prompt}")
    console.info(f"Encoded to {len(ids)} tokens: {ids}")
    console.info()
    result = GenerationResult(ids)
    if not console.quiet:
        console.text(prompt)
    started = time.perf_counter()
    try:
        for piece in lm.stream(ids, result=result, config=config):
            console.text(piece)
    except KeyboardInterrupt:
        result.stop_reason = "interrupted"
    console.text("\n")
    total = time.perf_counter() - started
    why = {
        "stop_token": "stopped at the stop token",
        "context_full": f"stopped: the model's context of {lm.config.n_positions} tokens is full",
        "interrupted": "interrupted",
        "length": "reached max tokens",
    }[result.stop_reason]
    console.info()
    console.info(
        f"Generated {len(result.new_ids)} tokens in {total:.2f}s ({why}); "
        f"prefill {result.prefill_seconds * 1000:.0f} ms, decode {result.tokens_per_second:.1f} tokens/s"
    )
    return result


def check_fits(lm, prompt: str | None, config: GenerationConfig) -> None:
    """Settings that depend on the model (stop token, prompt length), checked before
    anything is printed; the REPL's later prompts are checked as they come."""
    from opswitch.generation.loop import check_request, resolve_stop_token

    if prompt:
        check_request(lm.model, lm.encode(prompt), config)
    else:
        resolve_stop_token(lm.model, config)


def run(args: argparse.Namespace) -> int:
    console = Console(args.quiet)
    config = settings_from(args)
    prompt = read_prompt(args)
    if not args.interactive and not prompt:
        from opswitch.cli.main import UsageError

        raise UsageError("the prompt is empty: give some text to continue")
    lm, summary = load(args)
    check_fits(lm, prompt, config)
    for line in summary:
        console.info(line)
    show_settings(console, config)
    if args.interactive:
        from opswitch.cli.repl import Repl

        return Repl(lm, config, console, first_prompt=prompt).run()
    result = generate_once(lm, prompt, config, console)
    return 130 if result.stop_reason == "interrupted" else 0
