"""A measured figure: the samples of one thing on one implementation, and their median.

Comparisons are ratios within one run, never absolute times across runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Row:
    """One measured thing on one implementation: median over repeats."""

    what: str
    impl: str
    samples: list[float] = field(default_factory=list)
    unit: str = "s"
    work: float = 0.0  # e.g. FLOPs or bytes per call, for rates

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def as_json(self) -> dict:
        """What ``--json`` writes for the row: every sample, not only the median."""
        return {"what": self.what, "impl": self.impl, "unit": self.unit, "median": self.median,
                "samples": self.samples}


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> Callable[[], float]:
    """A repeat that returns the wall time of one call of ``fn``."""

    def run() -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return run
