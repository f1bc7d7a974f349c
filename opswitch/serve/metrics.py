"""Server metrics in Prometheus' text format, without a client library.

Written by two threads (the event loop records requests, the model thread
records tokens), so every update takes one lock; scraping reads a snapshot.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_WINDOW = 10.0  # seconds over which tokens/s is averaged


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus expects."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge:g}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                f"{name}_count {self.count}"]
        return out


class Metrics:
    """Counters, gauges and histograms of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[int, int] = {}  # status code -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.latency = Histogram()
        self.ttft = Histogram()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A value read at scrape time (queue length, running sequences...)."""
        self.gauges[name] = (help_text, read)

    def counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A running total kept elsewhere (the engine's), read at scrape time."""
        self.counters[name] = (help_text, read)

    def request_done(self, status: int, latency: float | None = None) -> None:
        with self._lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            if latency is not None:
                self.latency.observe(latency)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def tokens(self, n_generated: int, n_prompt: int = 0) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += n_generated
            self.prompt_tokens += n_prompt
            if n_generated:
                self._recent.append((now, n_generated))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW seconds."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        rate = self.tokens_per_second()
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, values: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *values])

        for name, (help_text, read) in self.gauges.items():
            metric(name, "gauge", help_text, [f"{name} {_number(read())}"])
        for name, (help_text, read) in self.counters.items():
            metric(name, "counter", help_text, [f"{name} {_number(read())}"])
        with self._lock:
            metric("opswitch_tokens_per_second", "gauge",
                   f"Generated tokens per second over the last {RATE_WINDOW:g} s.",
                   [f"opswitch_tokens_per_second {rate:.3f}"])
            metric("opswitch_generated_tokens_total", "counter", "Tokens generated.",
                   [f"opswitch_generated_tokens_total {self.generated_tokens}"])
            metric("opswitch_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
                   [f"opswitch_prompt_tokens_total {self.prompt_tokens}"])
            metric("opswitch_requests_total", "counter", "HTTP requests to /v1 by status code.",
                   [f'opswitch_requests_total{{status="{code}"}} {n}'
                    for code, n in sorted(self.requests.items())])
            metric("opswitch_request_latency_seconds", "histogram",
                   "Completion request latency, arrival to last token.",
                   self.latency.lines("opswitch_request_latency_seconds"))
            metric("opswitch_time_to_first_token_seconds", "histogram",
                   "Completion request arrival to its first generated token.",
                   self.ttft.lines("opswitch_time_to_first_token_seconds"))
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Integers exactly (byte counts), other values to 6 significant digits."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"
