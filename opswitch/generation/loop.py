"""A generation request's checks and its result, shared by the engine and its callers.

The loop itself is the engine's (``engine.py``); ``run.py`` drives it for
one caller (one prompt is the batch of one, not a second code path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from opswitch.core.errors import GenerationError
from opswitch.generation.config import DEFAULT_STOP, GenerationConfig
from opswitch.model.gpt2 import GPT2, as_ids

EMPTY_PROMPT = "the prompt is empty: give at least one token of text"


def context_message(n_tokens: str, n_ctx: int) -> str:
    """The one message for a prompt that does not fit the context."""
    return f"the prompt is {n_tokens} tokens but the model's context is {n_ctx}: shorten it"


@dataclass
class GenerationResult:
    """New token ids, why generation stopped, and how fast it went."""

    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    # "length" | "stop_token" | "stop" (a stop string) | "context_full" | "interrupted" | "cancelled"
    # | "error"
    stop_reason: str = "length"
    text: str = ""  # the output processor's text: stop strings cut, held-back bytes flushed
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time they took."""
        steps = len(self.new_ids) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


def resolve_stop_token(model: GPT2, config: GenerationConfig) -> int | None:
    """The id that ends generation, or None; an id the model cannot produce is an error."""
    n_vocab = model.config.vocab_size
    if config.stop_token == DEFAULT_STOP:
        eos = model.config.eos_token_id
        return eos if eos is not None and 0 <= eos < n_vocab else None
    if config.stop_token == -1:
        return None
    if config.stop_token >= n_vocab:  # type: ignore[operator]  # a name was resolved above
        raise GenerationError(
            f"stop token {config.stop_token} is outside the model's vocabulary (0..{n_vocab - 1})"
        )
    return int(config.stop_token)


def check_request(model: GPT2, prompt_ids: Sequence[int], config: GenerationConfig) -> int | None:
    """Everything that must hold before generating, in one place with one message each:
    a non-empty prompt of valid ids that fits the context, and a stop token the model
    can produce (returned, resolved)."""
    ids = as_ids(prompt_ids, model.config.vocab_size, "the prompt's token ids")
    if ids.size == 0:
        raise GenerationError(EMPTY_PROMPT)
    n_ctx = model.config.n_positions
    if ids.size > n_ctx:
        raise GenerationError(context_message(str(ids.size), n_ctx))
    return resolve_stop_token(model, config)
