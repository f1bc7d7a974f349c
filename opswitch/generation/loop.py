"""The autoregressive loop: any number of sequences advanced together.

``BatchGenerator`` keeps a set of running sequences, each with its own
prompt, sampling settings, random generator, stop condition and KV cache;
``step()`` advances all of them through one forward pass (new prompts are
prefilled in the same pass as the others' next token) and samples each.
Sequences can be added and cancelled between steps: that is continuous
batching, and the server's scheduler is a thin layer over it.  Generating
one prompt is the batch of one (``stream_ids``), not a second code path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from opswitch.core.errors import GenerationError, NonFiniteLogitsError
from opswitch.generation.config import DEFAULT_STOP, GenerationConfig
from opswitch.generation.sampling import sample_next
from opswitch.model.gpt2 import GPT2, as_ids
from opswitch.model.kvcache import CachePool, KVCache

EMPTY_PROMPT = "the prompt is empty: give at least one token of text"


def context_message(n_tokens: str, n_ctx: int) -> str:
    """The one message for a prompt that does not fit the context."""
    return f"the prompt is {n_tokens} tokens but the model's context is {n_ctx}: shorten it"


@dataclass
class GenerationResult:
    """New token ids, why generation stopped, and how fast it went."""

    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    stop_reason: str = "length"  # "length" | "stop_token" | "context_full" | "interrupted" | "cancelled"
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


@dataclass(eq=False)
class Running:
    """One sequence being generated: its settings, state and result so far."""

    config: GenerationConfig
    result: GenerationResult
    stop: int | None
    rng: np.random.Generator
    cache: KVCache | None  # None: recompute the whole sequence each step (no KV cache)
    sequence: list[int]
    pending: list[int]  # ids fed at the next step (the prompt, then the last token)
    n_vocab_allowed: int | None = None
    done: bool = False
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)
    logits: np.ndarray | None = field(default=None, repr=False)  # the last step's (masked), for logprobs

    @property
    def steps(self) -> int:
        return len(self.result.new_ids)


class BatchGenerator:
    """Advance many sequences together, one forward pass per step."""

    def __init__(
        self, model: GPT2, pool: CachePool | None = None, n_vocab_allowed: int | None = None,
        unused_ids: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.pool = pool
        self.n_vocab_allowed = n_vocab_allowed  # ids at or past this are never sampled (padded vocabularies)
        # ids inside the tokenizer's table that have no text (gaps): never sampled either, as
        # a sampled one could not be turned into text
        self.unused_ids = np.asarray(unused_ids, dtype=np.int64)
        self.running: list[Running] = []

    def cache_tokens(self, prompt_len: int, config: GenerationConfig) -> int:
        """Positions a request's cache must hold."""
        return min(self.model.config.n_positions, prompt_len + max(config.max_new_tokens, 1))

    def add(
        self, prompt_ids: Sequence[int], config: GenerationConfig, result: GenerationResult | None = None
    ) -> Running:
        """Start a sequence (prefilled at the next step); raises CacheFullError if the pool is full.
        ``result`` (optional) is the object its ids and timings are written to."""
        stop = check_request(self.model, prompt_ids, config)
        prompt = [int(t) for t in prompt_ids]
        cache = None
        if config.use_kv_cache:
            n = self.cache_tokens(len(prompt), config)
            cache = self.pool.acquire(n) if self.pool is not None else self.model.new_cache(n)
        if result is None:
            result = GenerationResult(list(prompt))
        result.stop_reason = "length"
        seq = Running(
            config, result, stop, np.random.default_rng(config.seed), cache,
            list(prompt), list(prompt), self.n_vocab_allowed,
        )  # fmt: skip
        if config.max_new_tokens == 0:
            self._finish(seq, "length")
        else:
            self.running.append(seq)
        return seq

    def cancel(self, seq: Running, reason: str = "cancelled") -> None:
        """Stop ``seq`` now and free its cache."""
        if not seq.done:
            self._finish(seq, reason)
        if seq in self.running:
            self.running.remove(seq)

    def _finish(self, seq: Running, reason: str) -> None:
        seq.done = True
        seq.result.stop_reason = reason
        if seq.cache is not None:
            seq.cache.release()

    def step(self) -> list[tuple[Running, int | None]]:
        """One forward pass over every running sequence; returns ``(seq, token)`` for
        each, ``token`` None when the sequence finished at this step (see its
        ``result.stop_reason``; ``error`` is set when its logits were not finite)."""
        n_ctx = self.model.config.n_positions
        active = [s for s in self.running if not s.done]
        for seq in active:
            if len(seq.sequence) >= n_ctx:
                self._finish(seq, "context_full")
        active = [s for s in active if not s.done]
        events: list[tuple[Running, int | None]] = [(s, None) for s in self.running if s.done]
        if active:
            batch = []
            for seq in active:
                if seq.cache is not None:
                    batch.append((seq.pending, seq.cache))
                else:
                    batch.append((seq.sequence, self.model.new_cache(len(seq.sequence))))
            logits = self.model.step(batch)
            now = time.perf_counter()
            for seq, row in zip(active, logits):
                events.append((seq, self._advance(seq, row, now)))
        self.running = [s for s in self.running if not s.done]
        return events

    def _advance(self, seq: Running, logits: np.ndarray, now: float) -> int | None:
        elapsed, seq.started = now - seq.started, now
        if seq.steps == 0:
            seq.result.prefill_seconds += elapsed
        else:
            seq.result.decode_seconds += elapsed
        if seq.n_vocab_allowed is not None and seq.n_vocab_allowed < logits.size:
            logits = logits.copy()
            logits[seq.n_vocab_allowed :] = -np.inf
        if self.unused_ids.size:
            logits = logits.copy()
            logits[self.unused_ids[self.unused_ids < logits.size]] = -np.inf
        seq.logits = logits  # the server's logprobs read them
        try:
            token = sample_next(logits, seq.config, seq.rng)
        except NonFiniteLogitsError as exc:
            seq.error = f"{exc} (at step {seq.steps + 1}, on backend {self.model.backend.spec})"
            self._finish(seq, "error")
            return None
        if token == seq.stop:
            self._finish(seq, "stop_token")
            return None
        seq.sequence.append(token)
        seq.pending = [token]
        seq.result.new_ids.append(token)
        if seq.steps >= seq.config.max_new_tokens:
            self._finish(seq, "length")
        return token


def stream_ids(
    model: GPT2,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    result: GenerationResult | None = None,
    n_vocab_allowed: int | None = None,
    unused_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield each new token id as soon as it is sampled.

    The prompt must fit the context; generation stops early, with
    ``stop_reason = "context_full"``, when the context fills up (documented
    truncation rather than an error halfway through a stream).  The stop
    token itself is not yielded.
    """
    generator = BatchGenerator(model, n_vocab_allowed=n_vocab_allowed, unused_ids=unused_ids)
    seq = generator.add(prompt_ids, config, result)
    try:
        while generator.running:
            for _, token in generator.step():
                if seq.error:
                    raise NonFiniteLogitsError(seq.error)
                if token is not None:
                    yield token
    finally:
        if not seq.done:  # the consumer stopped early (Ctrl-C, or it closed the generator)
            generator.cancel(seq, "interrupted")


def generate_ids(
    model: GPT2, prompt_ids: Sequence[int], config: GenerationConfig, n_vocab_allowed: int | None = None,
    unused_ids: Sequence[int] = (),
) -> GenerationResult:
    """Run generation to the end and return everything at once."""
    result = GenerationResult(list(prompt_ids))
    for _ in stream_ids(model, prompt_ids, config, result, n_vocab_allowed, unused_ids):
        pass
    return result


def generate_batch(
    model: GPT2,
    prompts: Sequence[Sequence[int]],
    configs: Sequence[GenerationConfig],
    pool: CachePool | None = None,
    n_vocab_allowed: int | None = None,
    unused_ids: Sequence[int] = (),
) -> list[GenerationResult]:
    """Generate for every prompt together (each with its own settings); the same ids
    as generating each alone.  With a ``pool``, sequences wait for cache room."""
    if len(prompts) != len(configs):
        raise GenerationError(f"{len(prompts)} prompts but {len(configs)} settings")
    for prompt, config in zip(prompts, configs):
        check_request(model, prompt, config)
    generator = BatchGenerator(model, pool, n_vocab_allowed, unused_ids)
    waiting = list(range(len(prompts)))
    seqs: dict[int, Running] = {}
    while waiting or generator.running:
        while waiting and (pool is None or pool.can_fit(generator.cache_tokens(len(prompts[waiting[0]]),
                                                                               configs[waiting[0]]))):
            i = waiting.pop(0)
            seqs[i] = generator.add(prompts[i], configs[i])
        if not generator.running and waiting:
            i = waiting.pop(0)  # too large for the pool even when empty: the pool says why
            seqs[i] = generator.add(prompts[i], configs[i])
        for seq, _ in generator.step():
            if seq.error:
                raise NonFiniteLogitsError(seq.error)
    return [seqs[i].result for i in range(len(prompts))]
