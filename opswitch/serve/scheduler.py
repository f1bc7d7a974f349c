"""The thread<->asyncio bridge: one model thread steps the engine; the event loop queues and reads.

Who runs when is the engine's business (``opswitch.generation.Engine``: FIFO
admission within ``max_batch`` and the KV-cache budget, chunked prefill,
prefix reuse, text and stop strings).  This module only hands requests to it
from the event loop, steps it on the model thread, and hands each step's
output (text, logprobs, finish) to the request's asyncio queue with
``call_soon_threadsafe``.  A cancelled request (its client went away) leaves
the queue, or the batch with its cache freed, at once.  The event loop never
runs the model, so it keeps accepting, validating and streaming while a step
computes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opswitch.core.errors import OpswitchError
from opswitch.generation import DEFAULT_PREFILL_CHUNK, Generation, GenerationConfig, StepOutput
from opswitch.serve.metrics import Metrics

if TYPE_CHECKING:
    from opswitch.api import LanguageModel

FINISH = {"length": "length", "context_full": "length", "stop_token": "stop", "stop": "stop"}
SHUTTING_DOWN = "the server is shutting down: retry on another server or later"
#: Stream output waiting for a client to read it, in deltas, before the request is cancelled.
STREAM_BUFFER = 4096


class QueueFull(OpswitchError):
    """The waiting queue is full: the client should retry later (429)."""


class NotServing(OpswitchError):
    """The model thread has stopped (shutdown or failure): 503."""


@dataclass
class SequenceSpec:
    """One sequence to generate: a prompt with its settings."""

    prompt_ids: list[int]
    config: GenerationConfig  # its ``stop`` holds the stop strings
    logprobs: int | None = None  # top alternatives to report per token; None = no logprobs


@dataclass
class Delta:
    """New output of one choice: text (maybe empty), and at the end why it finished."""

    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)  # (chosen, top)
    finish_reason: str | None = None
    error: str | None = None
    status: int = 500  # for an error: 500 (generation failed) or 503 (not serving: shutdown, dead thread)


class Ticket:
    """One request as both threads see it: its sequences and the queue its output arrives on."""

    def __init__(self, sequences: list[SequenceSpec], stream: bool, buffer: int = STREAM_BUFFER) -> None:
        self.sequences = sequences
        self.stream = stream  # False: only whole-choice results are posted, at the end
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[list[Delta]] = asyncio.Queue()
        self.buffer, self.buffered = buffer, 0  # deltas posted and not yet read, at most buffer
        self.cancelled = False
        self.choices: list = []  # the scheduler's, once submitted
        self.arrived = time.perf_counter()
        self.first_token: float | None = None  # seconds from arrival to the first token
        self.completion_tokens = 0

    def post(self, deltas: list[Delta]) -> None:
        """From the model thread: hand output to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self._put, deltas)
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening
            pass

    def _put(self, deltas: list[Delta]) -> None:
        """On the event loop: queue output, or cancel a stream whose client stopped reading.

        Without the bound, a client that never reads would hold every token of its
        request here for as long as its connection lasted."""
        if self.cancelled:
            return
        self.buffered += len(deltas)
        if self.stream and self.buffered > self.buffer:
            self.cancelled = True  # the model thread drops its sequences at the next step
            while not self.events.empty():
                self.events.get_nowait()
            deltas = [Delta(0, error=f"the client did not read its stream: over {self.buffer} events"
                                     " were waiting; the request was cancelled")]
        self.events.put_nowait(deltas)

    async def get(self) -> list[Delta]:
        """The next output (on the event loop)."""
        deltas = await self.events.get()
        self.buffered -= len(deltas)
        return deltas


class _Choice:
    """One sequence of a ticket, as the model thread follows it."""

    def __init__(self, ticket: Ticket, index: int, generation: Generation) -> None:
        self.ticket, self.index, self.generation = ticket, index, generation
        self.whole = Delta(index)  # the full output, for requests that do not stream


class Scheduler:
    """Steps the engine on one thread and routes its output to the requests' queues."""

    def __init__(self, lm: LanguageModel, max_batch: int, max_queue: int, cache_bytes: int,
                 metrics: Metrics | None = None, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix_cache: bool = True) -> None:
        self.lm = lm
        self.tokenizer = lm.require_tokenizer()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.engine = lm.engine(cache_bytes, max_batch=max_batch, prefill_chunk=prefill_chunk,
                                prefix_cache=prefix_cache)
        self.metrics = metrics or Metrics()
        self._choices: dict[Generation, _Choice] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self.failure: str | None = None
        self._thread: threading.Thread | None = None
        self._prompt_tokens = 0  # the engine's count already given to the metrics
        engine, pool = self.engine, self.engine.pool
        assert pool is not None
        self.metrics.gauge("opswitch_queue_length", "Sequences waiting for a batch slot.",
                           lambda: len(engine.waiting))
        self.metrics.gauge("opswitch_running_sequences", "Sequences in the running batch.",
                           lambda: len(engine.running))
        self.metrics.gauge("opswitch_kv_cache_bytes_in_use", "KV-cache memory held by running sequences.",
                           lambda: pool.bytes_in_use)
        self.metrics.gauge("opswitch_kv_cache_bytes_spare",
                           "KV-cache memory kept for reuse (prefixes; evicted when room is needed).",
                           lambda: pool.spare_bytes)
        self.metrics.gauge("opswitch_kv_cache_budget_bytes", "The KV-cache memory budget (--cache-mib).",
                           lambda: pool.budget_bytes)
        self.metrics.counter("opswitch_prefix_cache_hit_tokens_total",
                             "Prompt tokens whose keys and values were reused, not computed.",
                             lambda: engine.stats.prefix_hit_tokens)
        self.metrics.counter("opswitch_prefix_cache_evictions_total",
                             "Spare KV caches dropped to make room.", lambda: pool.evictions)

    # -- event-loop side ---------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="opswitch-model", daemon=True)
        self._thread.start()

    def begin_stop(self) -> None:
        """Refuse new requests; the model thread finishes its step, then fails the rest with 503."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def stop(self) -> None:
        """begin_stop, and wait for the model thread to end."""
        self.begin_stop()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether such a sequence could ever fit the cache budget."""
        return self.engine.fits(prompt_tokens, max_new_tokens)

    def submit(self, ticket: Ticket) -> None:
        """Queue a request's sequences; QueueFull when the queue cannot take them all."""
        with self._cond:
            if self._stopping or not self.alive:
                raise NotServing(self.failure or SHUTTING_DOWN)
            waiting = len(self.engine.waiting)
            if waiting + len(ticket.sequences) > self.max_queue:
                raise QueueFull(
                    f"the server's queue is full ({waiting} sequences waiting,"
                    f" at most {self.max_queue}): retry later"
                )
            added: list[_Choice] = []
            try:
                for i, spec in enumerate(ticket.sequences):
                    gen = self.engine.add(spec.prompt_ids, spec.config, logprobs=spec.logprobs)
                    added.append(_Choice(ticket, i, gen))
            except BaseException:
                for choice in added:
                    self.engine.cancel(choice.generation)
                raise
            for choice in added:
                if choice.generation.done:  # nothing to generate (max_new_tokens 0)
                    choice.ticket.post([Delta(choice.index, finish_reason="length")])
                else:
                    self._choices[choice.generation] = choice
            ticket.choices = added
            self._cond.notify()

    def cancel(self, ticket: Ticket) -> None:
        """The client is gone: its sequences leave the queue or the batch, caches freed, now."""
        ticket.cancelled = True
        with self._cond:
            self._drop_cancelled()
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        return len(self.engine.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.running)

    # -- model thread ----------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self.engine.has_work):
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._drop_cancelled()
                self._deliver(self.engine.step())
        except BaseException as exc:  # a bug or a broken backend: say so to everyone waiting
            self.failure = f"the model thread failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._fail_all(self.failure or SHUTTING_DOWN)

    def _drop_cancelled(self) -> None:
        """(cond held) Cancelled tickets' sequences leave the engine, their caches freed."""
        for gen, choice in list(self._choices.items()):
            if choice.ticket.cancelled:
                self.engine.cancel(gen)
                del self._choices[gen]

    def _deliver(self, outputs: list[StepOutput]) -> None:
        now = time.perf_counter()
        out: dict[Ticket, list[Delta]] = {}
        n_new = 0
        with self._cond:
            for step_out in outputs:
                choice = self._choices.get(step_out.generation)
                if choice is None:
                    continue
                if step_out.error:
                    del self._choices[step_out.generation]
                    choice.ticket.post([Delta(choice.index, error=step_out.error)])
                    continue
                n_new += step_out.token is not None
                self._add(out, choice, self._delta(choice, step_out, now))
        prompt_tokens, self._prompt_tokens = self.engine.stats.prompt_tokens - self._prompt_tokens, \
            self.engine.stats.prompt_tokens
        self.metrics.tokens(n_new, prompt_tokens)
        for ticket, deltas in out.items():
            if deltas:
                ticket.post(deltas)

    def _delta(self, choice: _Choice, step_out: StepOutput, now: float) -> Delta:
        """One step's output of a sequence as a delta: text, token and logprobs, finish."""
        ticket = choice.ticket
        delta = Delta(choice.index, text=step_out.text)
        if step_out.token is not None:
            ticket.completion_tokens += 1
            if ticket.first_token is None:
                ticket.first_token = now - ticket.arrived
                self.metrics.first_token(ticket.first_token)
            delta.tokens.append(step_out.token)
            if step_out.logprobs is not None:
                delta.logprobs.append(step_out.logprobs)
        if step_out.finish_reason is not None:
            del self._choices[step_out.generation]
            delta.finish_reason = FINISH.get(step_out.finish_reason, step_out.finish_reason)
        return delta

    def _add(self, out: dict[Ticket, list[Delta]], choice: _Choice, delta: Delta) -> None:
        """Stream the delta, or fold it into the whole result (sent when it finishes)."""
        if choice.ticket.stream:
            if delta.text or delta.finish_reason or delta.logprobs:
                out.setdefault(choice.ticket, []).append(delta)
            return
        whole = choice.whole
        whole.text += delta.text
        whole.tokens += delta.tokens
        whole.logprobs += delta.logprobs
        if delta.finish_reason:
            whole.finish_reason = delta.finish_reason
            out.setdefault(choice.ticket, []).append(whole)

    def _fail_all(self, message: str) -> None:
        with self._cond:
            for gen, choice in list(self._choices.items()):
                choice.ticket.post([Delta(choice.index, error=message, status=503)])
                self.engine.cancel(gen)
            self._choices.clear()
