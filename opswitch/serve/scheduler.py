"""Continuous batching: one model thread; the event loop only queues and reads.

Requests wait in a FIFO queue.  At every step the model thread admits
waiting sequences while the batch has room (``max_batch``) and the KV-cache
pool can hold them, runs one ``BatchGenerator.step`` over every running
sequence (new prompts are prefilled in the same pass), turns each new token
into text, looks for stop strings in that text, and hands the text to the
request's asyncio queue with ``call_soon_threadsafe``.  A cancelled request
(its client went away) leaves the queue, or the batch with its cache freed,
at the next step.  The event loop never runs the model, so it keeps
accepting, validating and streaming while a step computes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from opswitch.core.errors import OpswitchError
from opswitch.generation import BatchGenerator, GenerationConfig
from opswitch.generation.loop import Running
from opswitch.model.kvcache import CacheFullError
from opswitch.serve.metrics import Metrics

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
    config: GenerationConfig
    stop: tuple[str, ...] = ()
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


class _TextStops:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop string was reached."""
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class _Choice:
    """The model thread's state for one sequence of a ticket."""

    def __init__(self, ticket: Ticket, index: int, spec: SequenceSpec, decoder) -> None:
        self.ticket, self.index, self.spec = ticket, index, spec
        self.decoder = decoder
        self.stops = _TextStops(spec.stop)
        self.seq: Running | None = None
        self.whole = Delta(index)  # the full output, for requests that do not stream


class Scheduler:
    """Runs every admitted sequence in one batch, on one thread."""

    def __init__(self, lm, max_batch: int, max_queue: int, cache_bytes: int,
                 metrics: Metrics | None = None) -> None:
        self.lm = lm
        self.tokenizer = lm.require_tokenizer()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.pool = lm.model.cache_pool(cache_bytes)
        self.generator = BatchGenerator(lm.model, self.pool, lm.n_vocab_allowed, lm.unused_ids)
        self.metrics = metrics or Metrics()
        self._waiting: deque[_Choice] = deque()
        self._running: dict[Running, _Choice] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self.failure: str | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.metrics.gauge("opswitch_queue_length", "Sequences waiting for a batch slot.",
                           lambda: len(self._waiting))
        self.metrics.gauge("opswitch_running_sequences", "Sequences in the running batch.",
                           lambda: len(self._running))
        self.metrics.gauge("opswitch_kv_cache_bytes_in_use", "KV-cache memory held by running sequences.",
                           lambda: self.pool.bytes_in_use)
        self.metrics.gauge("opswitch_kv_cache_budget_bytes", "The KV-cache memory budget (--cache-mib).",
                           lambda: self.pool.budget_bytes)

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

    def fits(self, n_tokens: int) -> bool:
        """Whether a sequence of ``n_tokens`` positions could ever fit the cache budget."""
        return self.pool.bytes_for(n_tokens) <= self.pool.budget_bytes

    def submit(self, ticket: Ticket) -> None:
        """Queue a request's sequences; QueueFull when the queue cannot take them all."""
        with self._cond:
            if self._stopping or not self.alive:
                raise NotServing(self.failure or SHUTTING_DOWN)
            if len(self._waiting) + len(ticket.sequences) > self.max_queue:
                raise QueueFull(
                    f"the server's queue is full ({len(self._waiting)} sequences waiting,"
                    f" at most {self.max_queue}): retry later"
                )
            for i, spec in enumerate(ticket.sequences):
                self._waiting.append(_Choice(ticket, i, spec, self.tokenizer.stream_decoder()))
            self._cond.notify()

    def cancel(self, ticket: Ticket) -> None:
        """The client is gone: drop its sequences at the next step."""
        ticket.cancelled = True
        with self._cond:
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # -- model thread ----------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._running):
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._drop_cancelled()
                    admitted = self._admit()
                if self._running:
                    self._step(admitted)
        except BaseException as exc:  # a bug or a broken backend: say so to everyone waiting
            self.failure = f"the model thread failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._fail_all(self.failure or SHUTTING_DOWN)

    def _drop_cancelled(self) -> None:
        self._waiting = deque(c for c in self._waiting if not c.ticket.cancelled)
        for seq, choice in list(self._running.items()):
            if choice.ticket.cancelled:
                self.generator.cancel(seq)  # frees its cache now
                del self._running[seq]

    def _admit(self) -> list[_Choice]:
        """Move waiting sequences into the batch while there is room (FIFO, no overtaking)."""
        admitted = []
        while self._waiting and len(self._running) < self.max_batch:
            choice = self._waiting[0]
            spec = choice.spec
            if not self.pool.can_fit(self.generator.cache_tokens(len(spec.prompt_ids), spec.config)) \
                    and self._running:
                break  # wait for a running sequence to free its cache
            self._waiting.popleft()
            try:
                choice.seq = self.generator.add(spec.prompt_ids, spec.config)
            except (CacheFullError, OpswitchError) as exc:
                self._post(choice, Delta(choice.index, error=str(exc)))
                continue
            except Exception as exc:  # a bug in one request must not end the model thread
                message = f"generation failed: {type(exc).__name__}: {exc}"
                self._post(choice, Delta(choice.index, error=message))
                continue
            if choice.seq.done:  # nothing to generate (max_new_tokens 0)
                self._finish(choice, choice.seq.result.stop_reason)
                continue
            self._running[choice.seq] = choice
            admitted.append(choice)
        return admitted

    def _step(self, admitted: list[_Choice]) -> None:
        try:
            events = self.generator.step()
        except Exception as exc:  # the backend failed: fail this batch, keep serving
            for seq, choice in list(self._running.items()):
                self.generator.cancel(seq, "error")
                self._post(choice, Delta(choice.index, error=f"generation failed: {exc}"))
            self._running.clear()
            return
        self.steps += 1
        now = time.perf_counter()
        out: dict[Ticket, list[Delta]] = {}
        n_new = 0
        for seq, token in events:
            choice = self._running.get(seq)  # type: ignore[assignment]
            if choice is None:
                continue
            if seq.error:
                self._post(choice, Delta(choice.index, error=seq.error))
                del self._running[seq]
                continue
            try:
                delta = self._output(choice, seq, token, now)
            except Exception as exc:  # text, stop strings, logprobs: this request fails, not the thread
                self.generator.cancel(seq, "error")
                self._running.pop(seq, None)
                self._post(choice, Delta(choice.index, error=f"generation failed after token {token}:"
                                                               f" {type(exc).__name__}: {exc}"))
                continue
            n_new += token is not None
            self._add(out, choice, delta)
        self.metrics.tokens(n_new, sum(len(c.spec.prompt_ids) for c in admitted))
        for ticket, deltas in out.items():
            if deltas:
                ticket.post(deltas)

    def _output(self, choice: _Choice, seq: Running, token: int | None, now: float) -> Delta:
        """One sequence's new token as a delta: its text (stop strings cut), logprobs, finish."""
        ticket = choice.ticket
        delta = Delta(choice.index)
        reason = seq.result.stop_reason if seq.done else None
        stopped = False
        if token is not None:
            ticket.completion_tokens += 1
            if ticket.first_token is None:
                ticket.first_token = now - ticket.arrived
                self.metrics.first_token(ticket.first_token)
            delta.tokens.append(token)
            if choice.spec.logprobs is not None:
                delta.logprobs.append(_logprobs(seq.logits, token, choice.spec.logprobs))
            text, stopped = choice.stops.push(choice.decoder.push(token))
            delta.text = text
            if stopped:
                self.generator.cancel(seq, "stop")  # frees its cache now (no-op if done)
                reason = "stop"
        if reason is not None:
            del self._running[seq]
            if not stopped:  # the end of the text: what the decoder and the stop check held back
                tail, stopped = choice.stops.push(choice.decoder.flush())
                delta.text += tail if stopped else tail + choice.stops.flush()
            delta.finish_reason = "stop" if stopped else FINISH.get(reason, reason)
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

    def _finish(self, choice: _Choice, reason: str) -> None:
        self._post(choice, Delta(choice.index, finish_reason=FINISH.get(reason, reason)))

    def _post(self, choice: _Choice, delta: Delta) -> None:
        choice.ticket.post([delta])

    def _fail_all(self, message: str) -> None:
        with self._cond:
            for choice in list(self._waiting) + list(self._running.values()):
                self._post(choice, Delta(choice.index, error=message, status=503))
            for seq in list(self._running):
                self.generator.cancel(seq)
            self._waiting.clear()
            self._running.clear()


def _logprobs(logits: np.ndarray | None, token: int, top: int) -> tuple[float, dict[int, float]]:
    """The chosen token's log-probability under the model, and the ``top`` likeliest."""
    if logits is None:
        return float("nan"), {}
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    lp = x - np.log(np.exp(x).sum())
    best = np.argpartition(-lp, top)[:top] if 0 < top < lp.size else np.arange(lp.size if top else 0)
    best = sorted(best, key=lambda i: -lp[i])  # type: ignore[assignment]
    return float(lp[token]), {int(i): float(lp[i]) for i in best}
