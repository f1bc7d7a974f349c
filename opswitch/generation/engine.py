"""The engine: one scheduler, one model runner, one output processor, under every entry point.

vLLM v1's split at this project's scale.  ``Engine.add`` queues a request
(FIFO); each ``Engine.step``

1. *schedules*: admits waiting requests while the batch has room
   (``max_batch``) and the cache pool's byte budget can hold their caches
   (the FIFO head first, nobody overtakes it, so nobody starves; a request too
   big for the empty pool fails with the pool's message), reusing the rows of
   a cached prefix; then picks this step's tokens: one for every decoding
   sequence, and prompt chunks of at most ``prefill_chunk`` tokens within the
   step's token budget (``max_batch_tokens``), so a long prompt is prefilled
   over several steps while the others keep decoding;
2. *runs the model* once over all of it (``GPT2.step``);
3. *processes the output*: samples each sequence whose prompt is complete,
   and turns the token into text (``output.OutputProcessor``: incremental
   decoding, stop strings, logprobs, stop token).

Caches are allocated at full capacity on admission, so a running sequence
never needs more memory: "the pool is full" only ever means "new ones wait".
Cancelling a request frees its cache at once (at the end of the step in
progress, if another thread cancels while one runs).

Prefix reuse: a new prompt that starts with tokens whose keys and values a
running sequence or a spare cache of the pool already holds gets those rows
copied (or the spare itself) instead of computing them, in blocks of
``PREFIX_BLOCK`` tokens.  The last prompt token is always computed, since
its logits are needed.  The rows are the same float32 values a prefill
computes, grouped differently into matrix products, so logits agree to
float32 rounding and greedy ids are the same (tests/test_engine.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from opswitch.core.errors import GenerationError, NonFiniteLogitsError
from opswitch.generation.config import GenerationConfig
from opswitch.generation.loop import GenerationResult, check_request
from opswitch.generation.output import HasStreamDecoder, OutputProcessor, StreamDecoder, token_logprobs
from opswitch.generation.sampling import sample_next
from opswitch.model.gpt2 import GPT2
from opswitch.model.kvcache import CacheFullError, CachePool, KVCache, copy_prefix, sequence_positions

DEFAULT_PREFILL_CHUNK = 256
PREFIX_BLOCK = 16  # prefix hits count whole blocks of this many tokens, like vLLM's block size


@dataclass(eq=False)
class Generation:
    """One request as the engine runs it: settings, state, result and text so far."""

    prompt_ids: list[int]
    config: GenerationConfig
    result: GenerationResult
    stop_id: int | None
    output: OutputProcessor
    logprobs: int | None = None  # top alternatives to report per token; None = none
    rng: np.random.Generator = field(default_factory=np.random.default_rng, repr=False)
    cache: KVCache | None = field(default=None, repr=False)
    tokens: list[int] = field(default_factory=list)  # prompt and generated ids
    pending: list[int] = field(default_factory=list)  # ids still to feed (prompt rest, last token)
    state: str = "waiting"  # "waiting" | "running" | "done"
    cancel_reason: str | None = None
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)
    prefix_hit: int = 0  # prompt tokens whose rows were reused
    reuse_pending: bool = False  # a prefix lookup is due before the first prefill step
    started: float = 0.0
    logits: np.ndarray | None = field(default=None, repr=False)  # the last sampled step's (masked)

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def prefilling(self) -> bool:
        return len(self.pending) > 1 or (self.steps == 0 and bool(self.pending))

    @property
    def steps(self) -> int:
        return len(self.result.new_ids)


@dataclass
class StepOutput:
    """What one step produced for one sequence: a token and its text, and the end, if it ended."""

    generation: Generation
    token: int | None = None
    text: str = ""
    logprobs: tuple[float, dict[int, float]] | None = None
    finish_reason: str | None = None  # the result's stop_reason, once finished
    error: str | None = None


@dataclass
class EngineStats:
    """Counters for /metrics and tests."""

    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0  # prompt tokens of admitted requests
    steps: int = 0


class Engine:
    """Continuous batching over ``model``, within ``pool``'s budget (unbounded without one).

    Thread-safe in the way a server needs: ``add`` and ``cancel`` may come from
    any thread while one thread calls ``step``.
    """

    def __init__(
        self,
        model: GPT2,
        pool: CachePool | None = None,
        *,
        tokenizer: HasStreamDecoder | None = None,
        max_batch: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_batch_tokens: int | None = None,
        prefix_cache: bool = True,
        n_vocab_allowed: int | None = None,
        unused_ids: Sequence[int] = (),
    ) -> None:
        if max_batch is not None and max_batch < 1:
            raise GenerationError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_chunk < 0:
            raise GenerationError(f"the prefill chunk must be >= 0 tokens (0 = whole prompts),"
                                  f" got {prefill_chunk}")
        self.model, self.pool, self.tokenizer = model, pool, tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk or None  # None: whole prompts in one step
        if max_batch_tokens is None and self.prefill_chunk is not None:
            # every decode, and one chunk's worth of prompt: a step's time stays bounded
            max_batch_tokens = self.prefill_chunk + (max_batch or 64)
        self.max_batch_tokens = max_batch_tokens
        self.prefix_cache = prefix_cache
        self.n_vocab_allowed = n_vocab_allowed  # ids at or past this are never sampled (padded vocabularies)
        # ids inside the tokenizer's table that have no text (gaps): never sampled either
        self.unused_ids = np.asarray(unused_ids, dtype=np.int64)
        self.stats = EngineStats()
        self.waiting: deque[Generation] = deque()
        self.running: list[Generation] = []
        self._lock = threading.RLock()
        self._in_step = False
        self._cancelled: list[Generation] = []

    # -- sizes: the one place a request's cache is sized -------------------------
    def cache_positions(self, prompt_len: int, max_new_tokens: int) -> int:
        return sequence_positions(prompt_len, max_new_tokens, self.model.config.n_positions)

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        """Whether such a request could ever fit the pool's budget (always, without a pool)."""
        if self.pool is None:
            return True
        return self.pool.bytes_for(self.cache_positions(prompt_len, max_new_tokens)) <= self.pool.budget_bytes

    # -- requests ----------------------------------------------------------------
    def add(
        self, prompt_ids: Sequence[int], config: GenerationConfig, *, logprobs: int | None = None,
        result: GenerationResult | None = None,
    ) -> Generation:
        """Queue a request (checked now: GenerationError with one line if it cannot run)."""
        stop_id = check_request(self.model, prompt_ids, config)
        if config.stop and self.tokenizer is None:
            raise GenerationError("stop strings need text: this model has no tokenizer")
        prompt = [int(t) for t in prompt_ids]
        decoder: StreamDecoder | None = None
        if self.tokenizer is not None:
            decoder = self.tokenizer.stream_decoder()
        if result is None:
            result = GenerationResult(list(prompt))
        result.stop_reason = "length"
        gen = Generation(prompt, config, result, stop_id, OutputProcessor(decoder, config.stop), logprobs,
                         np.random.default_rng(config.seed), tokens=list(prompt), pending=list(prompt))
        if config.max_new_tokens == 0:
            gen.state = "done"
            return gen
        with self._lock:
            self.waiting.append(gen)
        return gen

    def cancel(self, gen: Generation, reason: str = "cancelled") -> None:
        """Stop ``gen``: a waiting one leaves the queue, a running one frees its cache now
        (or, while another thread is in a step, as soon as that step ends)."""
        with self._lock:
            if gen.done:
                return
            if gen.state == "waiting":
                self.waiting.remove(gen)
                self._finish(gen, reason)
            elif self._in_step:
                gen.cancel_reason = reason
                self._cancelled.append(gen)
            else:
                self._finish(gen, reason)
                self.running.remove(gen)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def bytes_in_use(self) -> int:
        return self.pool.bytes_in_use if self.pool is not None else 0

    @property
    def evictions(self) -> int:
        return self.pool.evictions if self.pool is not None else 0

    # -- one step ----------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Admit, run one forward pass over this step's tokens, sample, make text.

        Returns one output per sequence that produced a token or finished (an
        admission failure, the context filling up, a stop) in this step."""
        with self._lock:
            self._in_step = True
            outputs = self._admit()
            outputs += self._end_full_contexts()
            batch = self._schedule()
        try:
            outputs += self._run(batch)
        finally:
            with self._lock:
                self._in_step = False
                for gen in self._cancelled:
                    if not gen.done:
                        self._finish(gen, gen.cancel_reason or "cancelled")
                self._cancelled.clear()
                self.running = [g for g in self.running if not g.done]
        self.stats.steps += 1
        return outputs

    # scheduler ------------------------------------------------------------------
    def _admit(self) -> list[StepOutput]:
        """FIFO admission while the batch and the pool have room (lock held)."""
        outputs = []
        while self.waiting and (self.max_batch is None or len(self.running) < self.max_batch):
            gen = self.waiting[0]
            need = self.cache_positions(len(gen.prompt_ids), gen.config.max_new_tokens)
            if gen.config.use_kv_cache and self.pool is not None and self.running \
                    and not self.pool.can_fit(need):
                break  # wait for a running sequence to free its cache
            self.waiting.popleft()
            try:
                self._start(gen)
            except CacheFullError as exc:  # too big for the empty pool: the pool says why
                gen.error, gen.exception = str(exc), exc
                self._finish(gen, "error")
                outputs.append(StepOutput(gen, finish_reason="error", error=gen.error))
                continue
            self.running.append(gen)
        return outputs

    def _start(self, gen: Generation) -> None:
        """Give ``gen`` its cache and start its clock.  A spare cache holding the longest
        prefix of its prompt, if it is large enough, becomes its cache as it is; other
        reuse waits for the first prefill step (``_reuse``)."""
        n_prompt = len(gen.prompt_ids)
        self.stats.prompt_tokens += n_prompt
        gen.started = time.perf_counter()
        gen.state = "running"
        if not gen.config.use_kv_cache:
            return
        need = self.cache_positions(n_prompt, gen.config.max_new_tokens)
        source, hit = self._prefix_source(gen.prompt_ids) if self.prefix_cache else (None, 0)
        pool = self.pool
        spare = source if source is not None and pool is not None and pool.is_spare(source) else None
        if spare is not None and pool is not None and spare.capacity >= pool.capacity_for(need):
            taken = pool.take(spare)  # the spare itself: nothing to copy
            if taken is not None:
                taken.length, taken.tokens = hit, ()
                gen.cache = taken
                self._reused(gen, hit)
                return
        gen.cache = pool.acquire(need, keep=spare) if pool is not None else self.model.new_cache(need)
        gen.reuse_pending = self.prefix_cache

    def _reused(self, gen: Generation, hit: int) -> None:
        gen.prefix_hit, gen.reuse_pending = hit, False
        gen.pending = gen.prompt_ids[hit:]
        self.stats.prefix_hit_tokens += hit

    def _reuse(self, gen: Generation, ahead: list[Generation]) -> bool:
        """Before ``gen``'s first prefill step: copy the longest cached prefix of its prompt
        into its cache.  False (wait a step) while a sequence admitted before it is still
        prefilling a longer common prefix: then it reuses those rows instead of computing
        them too (sixteen requests with one system prompt compute it once)."""
        source, hit = self._prefix_source(gen.prompt_ids)
        limit = _block_limit(gen.prompt_ids)
        for other in ahead:
            if other.prefilling and other.cache is not None and other.cache.length < limit \
                    and _common_blocks(other.prompt_ids, gen.prompt_ids, limit) > hit:
                return False
        if source is not None and hit > 0 and gen.cache is not None:
            copy_prefix(self.model.backend, gen.cache, source, hit)
            self._reused(gen, hit)
        else:
            gen.reuse_pending = False
        return True

    def _prefix_source(self, prompt: list[int]) -> tuple[KVCache | None, int]:
        """The cache holding the longest prefix of ``prompt`` (whole blocks, never the last token):
        a running sequence's computed rows, or a spare's."""
        limit = _block_limit(prompt)
        if limit < PREFIX_BLOCK:
            return None, 0
        candidates: list[tuple[KVCache, Sequence[int]]] = [
            (g.cache, g.tokens[: g.cache.length]) for g in self.running if g.cache is not None]
        if self.pool is not None:
            candidates += [(c, c.tokens) for c in reversed(self.pool.spares()) if c.tokens]
        best, best_len = None, 0
        for cache, held in candidates:
            if min(limit, len(held), cache.length) <= best_len:
                continue
            common = _common_blocks(held[: cache.length], prompt, limit)
            if common > best_len:
                best, best_len = cache, common
        return best, best_len

    def _end_full_contexts(self) -> list[StepOutput]:
        n_ctx = self.model.config.n_positions
        outputs = []
        for gen in self.running:
            if not gen.done and not gen.prefilling and len(gen.tokens) >= n_ctx:
                outputs.append(self._finished_output(gen, "context_full"))
        return outputs

    def _schedule(self) -> list[tuple[Generation, list[int]]]:
        """This step's tokens: every decode, then prompt chunks in admission order (lock held)."""
        active = [g for g in self.running if not g.done]
        batch = [(g, g.pending) for g in active if g.cache is not None and not g.prefilling]
        batch += [(g, g.tokens) for g in active if g.cache is None]  # no KV cache: the whole text again
        budget = None  # prompt tokens this step; at least a chunk, so prompts always progress
        if self.max_batch_tokens is not None:
            budget = max(self.max_batch_tokens - len(batch), self.prefill_chunk or 1)
        for k, gen in enumerate(active):
            if gen.cache is None or not gen.prefilling:
                continue
            if gen.reuse_pending and not self._reuse(gen, active[:k]):
                continue  # its prefix is being computed by one ahead of it
            n = len(gen.pending) if self.prefill_chunk is None else min(len(gen.pending), self.prefill_chunk)
            if budget is not None:
                n = min(n, budget)
                if n <= 0:
                    break  # later prompts wait for the next step, in order
                budget -= n
            batch.append((gen, gen.pending[:n]))
        return batch

    # model runner ---------------------------------------------------------------
    def _run(self, batch: list[tuple[Generation, list[int]]]) -> list[StepOutput]:
        if not batch:
            return []
        try:
            logits = self.model.step([(ids, g.cache if g.cache is not None
                                       else self.model.new_cache(len(ids))) for g, ids in batch])
        except Exception as exc:  # the backend failed: this batch fails, the engine goes on
            outputs = []
            with self._lock:
                for gen, _ in batch:
                    gen.error, gen.exception = f"generation failed: {exc}", exc
                    outputs.append(self._finished_output(gen, "error"))
            return outputs
        now = time.perf_counter()
        outputs = []
        for (gen, ids), row in zip(batch, logits):
            if gen.cache is not None:
                gen.pending = gen.pending[len(ids):]
                if gen.pending:
                    continue  # a prompt chunk that is not the last: its logits are not needed
            out = self._advance(gen, row, now)
            if out is not None:
                outputs.append(out)
        return outputs

    # output processor -------------------------------------------------------------
    def _advance(self, gen: Generation, logits: np.ndarray, now: float) -> StepOutput | None:
        if gen.done or gen.cancel_reason is not None:
            return None
        elapsed, gen.started = now - gen.started, now
        if gen.steps == 0:
            gen.result.prefill_seconds += elapsed
        else:
            gen.result.decode_seconds += elapsed
        logits = self._mask(logits)
        gen.logits = logits
        try:
            token = sample_next(logits, gen.config, gen.rng)
        except NonFiniteLogitsError as exc:
            gen.error = f"{exc} (at step {gen.steps + 1}, on backend {self.model.backend.spec})"
            gen.exception = NonFiniteLogitsError(gen.error)
            return self._finished_output(gen, "error")
        if token == gen.stop_id:
            return self._finished_output(gen, "stop_token")
        gen.tokens.append(token)
        gen.pending = [token]
        gen.result.new_ids.append(token)
        out = StepOutput(gen, token)
        try:
            if gen.logprobs is not None:
                out.logprobs = token_logprobs(logits, token, gen.logprobs)
            out.text, hit = gen.output.push(token)
        except Exception as exc:  # text or logprobs failed: this request fails, not the engine
            gen.error = f"generation failed after token {token}: {type(exc).__name__}: {exc}"
            gen.exception = exc
            out.error = gen.error
            self._finish(gen, "error")
            out.finish_reason = "error"
            return out
        if hit:
            self._finish(gen, "stop")
            out.finish_reason = "stop"
        elif gen.steps >= gen.config.max_new_tokens:
            return self._finished_output(gen, "length", out)
        return out

    def _mask(self, logits: np.ndarray) -> np.ndarray:
        if self.n_vocab_allowed is not None and self.n_vocab_allowed < logits.size:
            logits = logits.copy()
            logits[self.n_vocab_allowed :] = -np.inf
        if self.unused_ids.size:
            logits = logits.copy()
            logits[self.unused_ids[self.unused_ids < logits.size]] = -np.inf
        return logits

    def _finished_output(self, gen: Generation, reason: str, out: StepOutput | None = None) -> StepOutput:
        """Finish ``gen`` and say so, with the text the processor held back until now."""
        out = out or StepOutput(gen)
        if reason != "error":
            try:
                tail, hit = gen.output.finish()
            except Exception as exc:
                gen.error, gen.exception = f"generation failed: {type(exc).__name__}: {exc}", exc
                tail, hit, reason = "", False, "error"
            out.text += tail
            if hit:
                reason = "stop"
        self._finish(gen, reason)
        out.finish_reason, out.error = reason, gen.error
        return out

    def _finish(self, gen: Generation, reason: str) -> None:
        if gen.done:
            return
        gen.state = "done"
        gen.result.stop_reason = reason
        gen.result.text = gen.output.text
        if gen.cache is not None and gen.cache._pool is not None:  # (kept on gen: it had one)
            if self.prefix_cache and gen.cache.length:
                gen.cache.tokens = tuple(gen.tokens[: gen.cache.length])
            gen.cache.release()


def _block_limit(prompt: Sequence[int]) -> int:
    """The most prompt positions reuse may cover: whole blocks, and never the last token."""
    return (len(prompt) - 1) // PREFIX_BLOCK * PREFIX_BLOCK


def _common_blocks(held: Sequence[int], prompt: Sequence[int], limit: int) -> int:
    """Positions, in whole blocks up to ``limit``, where ``held`` and ``prompt`` agree from the start."""
    n = min(limit, len(held), len(prompt))
    if n < PREFIX_BLOCK:
        return 0
    differ = np.flatnonzero(np.asarray(held[:n]) != np.asarray(prompt[:n]))
    common = int(differ[0]) if differ.size else n
    return common // PREFIX_BLOCK * PREFIX_BLOCK
