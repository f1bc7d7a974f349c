"""What a generation session shows: where output goes, the settings, one turn.

Shared by ``opswitch generate`` and its REPL (neither imports the other).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from opswitch.core import formats
from opswitch.generation import GenerationConfig, GenerationResult

if TYPE_CHECKING:
    from opswitch.api import LanguageModel


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


def model_summary(lm: LanguageModel, label: str | None) -> list[str]:
    """The lines printed once a model is loaded: what, where, on which backend."""
    config, directory = lm.config, lm.source
    summary = [
        f"Model: {directory}" if label is None else f"Model: {label} ({directory})",
        f"✓ Model loaded (vocab={config.vocab_size}, dim={config.n_embd}, layers={config.n_layer}, "
        f"heads={config.n_head}, context={config.n_positions}, params={_millions(config.n_params)}) "
        f"in {lm.load_seconds:.2f}s",
        f"✓ Backend: {lm.selection_reason}",
    ]
    fallbacks = lm.model.ops.describe_fallbacks()
    if fallbacks:
        summary.append(f"  ops computed by the host reference (fallback): {fallbacks}")
    if lm.model.weights not in (None, "f32"):  # None: as the file stores them (a GGUF's types, in a note)
        stored = formats.storage_note(lm.model.weights, lm.model.stored_formats)
        summary.append(f"  weights stored as {stored}")
    if lm.model.kv_cache != "f32":
        summary.append(f"  KV cache stored as {lm.model.kv_cache}")
    summary.append(f"✓ Tokenizer loaded (vocab size={lm.require_tokenizer().vocab_size})")
    summary += [f"  note: {note}" for note in lm.notes]
    return summary


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


SHOWN_IDS = 24  # a prompt near the context would print thousands


def describe_ids(ids: list[int]) -> str:
    """ "3 tokens: [1, 2, 3]", with long lists cut to their first and last few ids."""
    count = f"{len(ids)} token{'' if len(ids) == 1 else 's'}"
    if len(ids) <= SHOWN_IDS:
        return f"{count}: {ids}"
    head, tail = ids[: SHOWN_IDS - 4], ids[-4:]
    return f"{count}: [{', '.join(map(str, head))}, ... ({len(ids) - len(head) - 4} more) ..., " \
        f"{', '.join(map(str, tail))}]"


def generate_once(lm: LanguageModel, prompt: str, config: GenerationConfig,
                  console: Console) -> GenerationResult:
    """Stream one completion; Ctrl-C stops it cleanly, keeping what was printed."""
    ids = lm.encode_prompt(prompt)
    console.info(f"Prompt: {prompt}")
    console.info(f"Encoded to {describe_ids(ids)}")
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
        "stop": "stopped at a stop string",
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


