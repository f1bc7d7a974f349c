"""The contract a backend fulfils: identity, probing, array movement, ops.

A backend is a class.  Constructing it must be cheap and must not fail (so a
listing never breaks); ``probe()`` does the real work of finding hardware and
libraries, and says in words why the backend cannot run when it cannot.  Ops
are ordinary methods named after the catalogue (``opswitch.core.ops``); any
the class lacks are filled in by the registry with the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from opswitch.core.ops import OP_NAMES


@dataclass(frozen=True)
class Probe:
    """What a backend found: can it run here, on what, and if not, why."""

    available: bool
    device: str = ""
    reason: str = ""  # why unavailable, phrased as something a user can act on
    priority: int | None = None  # overrides the class priority for what was found (a GPU)

    @classmethod
    def ok(cls, device: str, priority: int | None = None) -> Probe:
        return cls(True, device=device, priority=priority)

    @classmethod
    def missing(cls, reason: str) -> Probe:
        return cls(False, reason=reason)


class Backend:
    """Base class for backends.  Subclasses set the ClassVars and add ops.

    ``to_device``/``to_host`` move arrays across the boundary; the model
    uploads weights once with ``to_device`` and reads only logits back with
    ``to_host``.  Host arrays are numpy; device arrays are whatever the
    backend likes, and nothing above the core looks inside them.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # auto picks the highest available
    description: ClassVar[str] = ""
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)

    def __init__(self, dtype: str = "float32") -> None:
        if dtype not in self.dtypes:
            from opswitch.core.errors import BackendError

            raise BackendError(
                f"backend {self.name!r} computes in {', '.join(self.dtypes)}, not {dtype}"
            )
        self.dtype = np.dtype(dtype)
        self._probe: Probe | None = None

    def probe(self) -> Probe:
        """Find out (once) whether this backend can run here."""
        if self._probe is None:
            try:
                self._probe = self._probe_impl()
            except Exception as exc:  # a probe must explain, never crash a listing
                self._probe = Probe.missing(f"probe failed: {type(exc).__name__}: {exc}")
        return self._probe

    def _probe_impl(self) -> Probe:
        return Probe.ok("host CPU")

    def to_device(self, x: Any) -> Any:
        """Host numpy array -> backend array, in the backend's compute dtype."""
        return np.ascontiguousarray(x, dtype=self.dtype)

    def to_host(self, x: Any) -> np.ndarray:
        """Backend array -> host numpy array."""
        return np.asarray(x)

    def synchronize(self) -> None:
        """Wait for queued work (for timing); host backends have none."""

    @classmethod
    def native_ops(cls) -> tuple[str, ...]:
        """Catalogue ops this class implements itself (the rest fall back)."""
        return tuple(op for op in OP_NAMES if callable(getattr(cls, op, None)))
