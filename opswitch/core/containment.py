"""Running third-party code (plugin imports, constructors, probes) safely.

A plugin runs in our process, so it is trusted code: it could do anything.
What we can contain is what plugins do by accident: raise (even
``SystemExit``), hang, or print.  ``contained`` runs a call in a worker
thread with a time limit, catches every exception, and keeps whatever it
writes to stdout/stderr (Python-level and file-descriptor-level, where
kernel compilers write) away from the user's terminal.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

ENV_PROBE_TIMEOUT = "OPSWITCH_PROBE_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
_capture_lock = threading.RLock()  # fd redirection is process-wide: one at a time


@dataclass
class Outcome:
    """What a contained call did: its value, or the error / time-out, and its output."""

    value: Any = None
    error: str | None = None  # "ValueError: ..." / "SystemExit: 3" / "timed out after 10 s"
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def probe_timeout(backend_default: float | None = None) -> float:
    """Seconds a plugin call may take: $OPSWITCH_PROBE_TIMEOUT when set, else the
    backend's own default (a probe that compiles kernels needs longer), else 10."""
    fallback = max(DEFAULT_TIMEOUT, backend_default or 0.0)
    try:
        value = float(os.environ.get(ENV_PROBE_TIMEOUT, fallback))
    except ValueError:
        return fallback
    return value if value > 0 and math.isfinite(value) else fallback


@contextlib.contextmanager
def captured_output() -> Iterator[io.StringIO]:
    """Send fds 1 and 2 (and sys.stdout/err) to a buffer for the duration."""
    buffer = io.StringIO()
    with _capture_lock, tempfile.TemporaryFile(mode="w+b") as sink:
        saved, streams = [], (sys.stdout, sys.stderr)
        for stream in streams:
            with contextlib.suppress(Exception):
                stream.flush()
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
            except OSError:  # a closed fd: nothing to protect
                pass
        sys.stdout = sys.stderr = io.TextIOWrapper(sink, write_through=True, errors="replace")
        try:
            yield buffer
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            sys.stdout, sys.stderr = streams
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            buffer.write(sink.read(1 << 16).decode(errors="replace"))


def contained(fn: Callable[[], Any], timeout: float | None = None) -> Outcome:
    """Call ``fn()`` in a worker thread; never raises, never prints, never hangs past ``timeout``."""
    timeout = probe_timeout() if timeout is None else timeout
    outcome = Outcome()

    def work() -> None:
        try:
            outcome.value = fn()
        except BaseException as exc:
            outcome.error = f"{type(exc).__name__}: {exc}".rstrip(": ")

    with captured_output() as out:
        worker = threading.Thread(target=work, name="opswitch-plugin-call", daemon=True)
        worker.start()
        worker.join(timeout)
    outcome.output = out.getvalue()
    if worker.is_alive():
        outcome.value = None
        outcome.error = f"timed out after {timeout:g} s (set {ENV_PROBE_TIMEOUT} to wait longer)"
    return outcome
