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
most one call per ``PROBE_MAX_S`` seconds once the choice is settled) runs
one call with the other count; when that count is faster on the same
kernel and shape, it becomes the choice.  A probe costs at most one slow
call, so the rate never falls far below the better of the two, in either
direction: a busy machine gets one thread, an idle one all of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

PROBE_MIN_S = 0.02  # first probe this long after a change of choice...
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
        self._local = threading.local()  # the count last applied on each calling thread
        self.switches = 0  # how often the choice changed (shown by benchmarks, read by tests)

    def run(self, key: Hashable, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with the thread count the timings favour for ``key``."""
        if self.most == 1:
            return fn(*args, **kwargs)
        start = self._clock()
        probe = start >= self._next_probe
        if probe:
            threads = 1 if self.choice == self.most else self.most
        else:
            threads = self.choice
        local = self._local
        if getattr(local, "threads", None) != threads:
            self._apply(threads)
            local.threads = threads
        result = fn(*args, **kwargs)
        seconds = self._clock() - start
        if probe:
            self._record_probe(key, threads, seconds)
        else:  # the common call, inline: it runs some 50 times a token
            slot = (key, threads)
            old = self._mean.get(slot)
            self._mean[slot] = seconds if old is None else old + ALPHA * (seconds - old)
        return result

    def _record_probe(self, key: Hashable, threads: int, seconds: float) -> None:
        slot = (key, threads)
        old = self._mean.get(slot)
        self._mean[slot] = seconds if old is None else old + ALPHA_PROBE * (seconds - old)
        mine = self._mean.get((key, self.choice))
        if mine is not None and self._mean[slot] < SWITCH_MARGIN * mine:
            self.choice, self.switches = threads, self.switches + 1
            self._wait = PROBE_MIN_S
        elif mine is None or seconds >= mine:  # losing: look again later, and less often
            self._wait = min(PROBE_MAX_S, 2 * self._wait)
        else:  # winning, not yet on average: look again sooner
            self._wait = max(PROBE_MIN_S, self._wait / 2)
        self._next_probe = self._clock() + self._wait
