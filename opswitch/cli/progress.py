"""A quiet-until-slow progress line on stderr, for loading models.

Nothing is printed for work that finishes within ``delay`` seconds or when
stderr is not a terminal, so pipes and logs stay clean.
"""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    """``with Progress("Loading model"):`` shows an elapsed-time ticker if slow."""

    def __init__(self, label: str, delay: float = 0.5, stream=None) -> None:
        self.label, self.delay = label, delay
        self.stream = stream or sys.stderr
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False
        self.elapsed = 0.0

    def __enter__(self) -> Progress:
        self._start = time.perf_counter()
        if self.stream.isatty():
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def _tick(self) -> None:
        if self._done.wait(self.delay):
            return
        frames = "|/-\\"
        i = 0
        while not self._done.wait(0.1):
            spent = time.perf_counter() - self._start
            self.stream.write(f"\r{frames[i % 4]} {self.label}... {spent:.1f}s")
            self.stream.flush()
            self._shown = True
            i += 1

    def __exit__(self, *exc) -> None:
        self.elapsed = time.perf_counter() - self._start
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


class Bar:
    """``bar(done, total)`` redraws a progress bar on stderr, only when it is a terminal."""

    def __init__(self, label: str, stream=None, width: int = 30) -> None:
        self.label, self.width = label, width
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        filled = self.width * done // max(total, 1)
        spent = time.perf_counter() - self._start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
                          f"{spent:.1f}s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
