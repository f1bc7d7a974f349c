"""How many threads a parallel CPU kernel gets, chosen from what the calls take.

Why: a thread pool splits a kernel into one static share per thread and the
caller waits at a barrier for every share.  When another process keeps a
core busy, one of our threads is descheduled for a whole scheduling quantum
(milliseconds) in most calls, so a 2-thread decode step waits for quanta
instead of computing: on a 2-core machine with one CPU-bound process beside
it, 2-thread decode ran up to 8x slower than 1 thread (docs/cpu-speed.md).
Neither OpenMP's barrier nor OpenBLAS's busy-waiting workers can avoid it.

So the backend times each parallel call, keyed by its kernel and shape, and
keeps a moving average per key for each of two thread counts: all of them
and one.  It runs the count it has chosen, and now and then (a *probe*: at
most one per ``PROBE_MAX_S`` seconds once the choice is settled) runs every
call for ``PROBE_SPAN_S`` with the other count; when those calls took less
than the chosen count's averages say they would have, the other count
becomes the choice.  A probe spans many calls, not one, because a busy
machine's cost is in rare long stalls: most 2-thread calls are fast and one
in ten waits for a descheduled worker, so one call compared with an average
said "two threads" most of the time (measured: int8 decode at 2 threads
fell to 24-33 tok/s in some runs beside a busy process, 48-57 at 1 thread).
A probe costs at most ``PROBE_SPAN_S`` of slower calls, so the rate never
falls far below the better of the two, in either direction: a busy machine
gets one thread, an idle one all of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

PROBE_MIN_S = 0.02  # first probe this long after a change of choice...
PROBE_SPAN_S = 0.01  # a probe runs every call for this long (at least one call) with the other count
PROBE_MAX_S = 4.0  # ...each probe that does not change it doubles the wait, up to this
SWITCH_MARGIN = 0.9  # the other count must be 10 % faster than the choice to replace it
ALPHA = 0.3  # moving-average weight of a new sample of the chosen count
ALPHA_PROBE = 0.5  # ...and of a probe's: the other count's average is old news by then, but one
# lucky sample on a busy machine must not move the choice (a wrong move to more threads costs stalls)


class ThreadGovernor:
    """Runs calls with ``most`` threads or one, whichever the timings show is faster now.

    ``apply(n)`` makes the calling thread's next parallel calls use ``n``
    threads (numba's and OpenBLAS's counts are per calling thread, or cheap
    to set); it is called only when the count for this thread changes.
    """

    def __init__(
        self, most: int, apply: Callable[[int], None], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.most = max(1, int(most))
        self.choice = self.most
        self._apply, self._clock = apply, clock
        self._mean: dict[tuple[Hashable, int], float] = {}
        self._wait = PROBE_MIN_S
        self._next_probe = clock() + PROBE_MIN_S
        self._probe_end: float | None = None  # while a probe runs: when it ends
        self._probe_spent = self._probe_expected = 0.0  # its calls' seconds; theirs at the choice
        self._local = threading.local()  # the count last applied on each calling thread
        self.switches = 0  # how often the choice changed (shown by benchmarks, read by tests)

    def run(self, key: Hashable, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with the thread count the timings favour for ``key``."""
        if self.most == 1:
            return fn(*args, **kwargs)
        start = self._clock()
        probe = self._probe_end is not None
        if not probe and start >= self._next_probe:
            self._probe_end, self._probe_spent, self._probe_expected = start + PROBE_SPAN_S, 0.0, 0.0
            probe = True
        if probe:
            threads = 1 if self.choice == self.most else self.most
        else:
            threads = self.choice
        self._use(threads)
        result = fn(*args, **kwargs)
        end = self._clock()
        seconds = end - start
        if probe:
            self._record_probe(key, threads, seconds, end)
        else:  # the common call, inline: it runs some 50 times a token
            slot = (key, threads)
            old = self._mean.get(slot)
            self._mean[slot] = seconds if old is None else old + ALPHA * (seconds - old)
        return result

    def follow(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` with the chosen count, never a probe's, untimed: for calls whose results
        depend on the thread count in their last bits (OpenBLAS's sgemm), so that a probe
        does not make two computations of the same loss differ; the choice still moves
        with the machine (decided by the calls ``run`` times)."""
        if self.most > 1:
            self._use(self.choice)
        return fn(*args, **kwargs)

    def _use(self, threads: int) -> None:
        """Make the calling thread's next parallel calls use ``threads`` (set only on a change)."""
        local = self._local
        if getattr(local, "threads", None) != threads:
            self._apply(threads)
            local.threads = threads

    def _record_probe(self, key: Hashable, threads: int, seconds: float, now: float) -> None:
        slot = (key, threads)
        old = self._mean.get(slot)
        self._mean[slot] = seconds if old is None else old + ALPHA_PROBE * (seconds - old)
        mine = self._mean.get((key, self.choice))
        if mine is not None:  # a key never run at the chosen count says nothing either way
            self._probe_spent += seconds
            self._probe_expected += mine
        if self._probe_end is None or now < self._probe_end:
            return
        self._probe_end = None
        spent, expected = self._probe_spent, self._probe_expected
        if expected > 0 and spent < SWITCH_MARGIN * expected:
            self.choice, self.switches = threads, self.switches + 1
            self._wait = PROBE_MIN_S
        elif expected == 0 or spent >= expected:  # losing: look again later, and less often
            self._wait = min(PROBE_MAX_S, 2 * self._wait)
        else:  # winning, not yet by the margin: look again sooner
            self._wait = max(PROBE_MIN_S, self._wait / 2)
        self._next_probe = now + self._wait
