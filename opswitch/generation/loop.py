"""The autoregressive loop: prefill, then one token per step, streamed."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from opswitch.core.errors import GenerationError
from opswitch.generation.config import DEFAULT_STOP, GenerationConfig
from opswitch.generation.sampling import sample_next
from opswitch.model.gpt2 import GPT2


@dataclass
class GenerationResult:
    """New token ids, why generation stopped, and how fast it went."""

    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    stop_reason: str = "length"  # "length" | "stop_token" | "context_full" | "interrupted"
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
    if config.stop_token >= n_vocab:
        raise GenerationError(
            f"stop token {config.stop_token} is outside the model's vocabulary (0..{n_vocab - 1})"
        )
    return int(config.stop_token)


def check_request(model: GPT2, prompt_ids: Sequence[int], config: GenerationConfig) -> int | None:
    """What must hold before generating: a non-empty prompt that fits the context,
    and a stop token the model can produce (returned, resolved)."""
    if not prompt_ids:
        raise GenerationError("the prompt is empty: give at least one token of text")
    n_ctx = model.config.n_positions
    if len(prompt_ids) > n_ctx:
        raise GenerationError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {n_ctx}: shorten it"
        )
    return resolve_stop_token(model, config)


def stream_ids(
    model: GPT2, prompt_ids: Sequence[int], config: GenerationConfig, result: GenerationResult | None = None
) -> Iterator[int]:
    """Yield each new token id as soon as it is sampled.

    The prompt must fit the context; generation stops early, with
    ``stop_reason = "context_full"``, when the context fills up (documented
    truncation rather than an error halfway through a stream).  The stop
    token itself is not yielded.
    """
    result = result if result is not None else GenerationResult(list(prompt_ids))
    prompt = [int(t) for t in prompt_ids]
    stop = check_request(model, prompt, config)
    n_ctx = model.config.n_positions
    rng = np.random.default_rng(config.seed)
    cache = model.new_cache() if config.use_kv_cache else None
    sequence, pending = list(prompt), list(prompt)
    clock = time.perf_counter()
    for step in range(config.max_new_tokens):
        if len(sequence) >= n_ctx:
            result.stop_reason = "context_full"
            return
        logits = model.next_logits(pending if cache is not None else sequence, cache)
        token = sample_next(logits, config, rng)
        now = time.perf_counter()
        if step == 0:
            result.prefill_seconds = now - clock
        else:
            result.decode_seconds += now - clock
        clock = now
        if token == stop:
            result.stop_reason = "stop_token"
            return
        sequence.append(token)
        pending = [token]
        result.new_ids.append(token)
        yield token
    result.stop_reason = "length"


def generate_ids(model: GPT2, prompt_ids: Sequence[int], config: GenerationConfig) -> GenerationResult:
    """Run generation to the end and return everything at once."""
    result = GenerationResult(list(prompt_ids))
    for _ in stream_ids(model, prompt_ids, config, result):
        pass
    return result
