"""Asking a backend instance what it can do, contained: probe, devices, prepare.

A backend's own ``probe()``, ``list_devices()`` and ``prepare()`` are
third-party code; here each runs through ``containment.contained`` with a
time limit, so a listing or a selection gets an answer in words (a
``Probe`` saying why not, an empty device list, a failure reason), never a
crash or a hang.  ``BackendStatus`` is one row of ``opswitch backends``.
"""

from __future__ import annotations

from dataclasses import dataclass

from opswitch.core.backend import Backend, Device, Probe
from opswitch.core.containment import contained, probe_timeout
from opswitch.core.ops import OP_NAMES

PREPARE_SECONDS = 300  # building kernels may take minutes; a hang may not


@dataclass(frozen=True)
class BackendStatus:
    """One row of ``opswitch backends``."""

    name: str
    priority: int
    source: str
    probe: Probe
    native_ops: tuple[str, ...]
    description: str = ""
    dtypes: tuple[str, ...] = ("float32",)
    devices: tuple[str, ...] = ()
    weight_formats: tuple[str, ...] = ("f32",)
    thread_safe: bool = True

    @property
    def fallback_ops(self) -> tuple[str, ...]:
        return tuple(op for op in OP_NAMES if op not in self.native_ops)


def probe(backend: Backend) -> Probe:
    """``backend.probe()``, contained: quiet, time-limited, never raising (cached on the instance)."""
    if backend._probe is None:
        outcome = contained(backend.probe, timeout=probe_timeout(probe_seconds(type(backend))))
        if not outcome.ok:
            backend._probe = Probe.missing(f"probe {outcome.error}")
        elif not isinstance(outcome.value, Probe):
            backend._probe = Probe.missing(f"probe returned {outcome.value!r}, not an opswitch Probe")
        else:
            backend._probe = outcome.value  # also for a probe() that overrides the caching one
    return backend._probe


def devices(cls: type[Backend]) -> list[Device]:
    """``cls.list_devices()``, contained: a broken one lists none."""
    outcome = contained(cls.list_devices, timeout=probe_timeout(probe_seconds(cls)))
    if not outcome.ok or not isinstance(outcome.value, list):
        return []
    return [d for d in outcome.value if isinstance(d, Device)]


def prepare(backend: Backend) -> str | None:
    """``backend.prepare()``, contained; the reason on failure, else None."""
    outcome = contained(backend.prepare, timeout=None if backend._prepared else PREPARE_SECONDS)
    if outcome.ok:
        return None
    return f"failed to prepare: {(outcome.error or '').removeprefix('BackendError: ')}"


def status(cls: type[Backend], source: str, found: Probe) -> BackendStatus:
    """The listing row of a backend class whose default instance probed as ``found``."""
    priority = found.priority if isinstance(found.priority, int) else cls.priority
    listed = tuple(f"{cls.name}:{d.id} {d.description}" for d in devices(cls))  # also when none works
    return BackendStatus(
        cls.name, priority, source, found, cls.native_ops(), cls.description, tuple(cls.dtypes),
        listed, tuple(cls.weight_formats), cls.thread_safe,
    )  # fmt: skip


def probe_seconds(cls: type[Backend]) -> float | None:
    """A backend's own probe time budget, if it declares a sane one."""
    value = getattr(cls, "probe_seconds", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 3600:
        return float(value)
    return None
