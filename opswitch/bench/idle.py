"""A quiet machine: wait for idle before each repeat, and report the load others caused.

The machine is shared and noisy, so every figure is a median over repeats,
each repeat starts only once the machine is idle (read from /proc/stat), and
the interference seen while measuring is reported, not hidden.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Interference:
    """How much CPU other processes took while we measured."""

    repeats: int = 0
    disturbed: int = 0
    worst: float = 0.0  # the largest share of the machine others used during a repeat
    waited: float = 0.0  # seconds spent waiting for an idle machine

    def summary(self) -> str:
        if not self.repeats:
            return "interference: not measured"
        return (
            f"interference: {self.disturbed} of {self.repeats} repeats saw other load "
            f"(worst {self.worst:.0%} of the machine); waited {self.waited:.1f}s for idle"
        )


class Quiet:
    """Waits for an idle machine before a repeat and measures others' load during it."""

    def __init__(self, threshold: float = 0.15, max_wait: float = 10.0) -> None:
        self.threshold, self.max_wait = threshold, max_wait
        self.report = Interference()
        self.available = os.path.exists("/proc/stat")
        self.ncpu = os.cpu_count() or 1

    def wait_idle(self) -> None:
        if not self.available:
            return
        start = time.perf_counter()
        while time.perf_counter() - start < self.max_wait:
            busy0, total0 = _cpu_times()
            time.sleep(0.2)
            busy1, total1 = _cpu_times()
            if (busy1 - busy0) / max(total1 - total0, 1.0) < self.threshold:
                break
        self.report.waited += time.perf_counter() - start

    def measure(self, fn: Callable[[], float]) -> float:
        """Run one repeat after waiting for idle; record others' CPU share during it."""
        self.wait_idle()
        if not self.available:
            return fn()
        busy0, _ = _cpu_times()
        own0, wall0 = _own_cpu_seconds(), time.perf_counter()
        value = fn()
        busy1, _ = _cpu_times()
        own = _own_cpu_seconds() - own0
        wall = time.perf_counter() - wall0
        clock = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        others = max((busy1 - busy0) / clock - own, 0.0) / max(wall * self.ncpu, 1e-9)
        self.report.repeats += 1
        if others > self.threshold:
            self.report.disturbed += 1
        self.report.worst = max(self.report.worst, others)
        return value
