"""The contract a backend fulfils: identity, devices, probing, memory, ops.

A backend is a class; an instance belongs to one (backend, device, dtype).
Constructing it must be cheap and must not fail (so a listing never
breaks); ``probe()`` finds hardware and libraries cheaply and says in words
why the backend cannot run when it cannot; ``prepare()`` does the heavy
set-up (building kernels) once the backend has been chosen.  Ops are
ordinary methods named after the catalogue (``opswitch.core.ops``); any the
class lacks are filled in by the registry with the reference.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from opswitch.core import formats
from opswitch.core.errors import BackendError
from opswitch.core.ops import OP_NAMES
from opswitch.core.step import Step

DTYPES = ("float16", "float32", "float64")  # the compute dtypes a spec may name
ENV_THREADS = "OPSWITCH_NUM_THREADS"  # the compute threads a backend starts its pools with


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


@dataclass(frozen=True)
class Device:
    """One device a backend can run on: ``id`` is what follows ``name:`` in a spec."""

    id: str
    description: str
    memory_bytes: int | None = None
    works: bool | None = None  # None: not checked; False: ``description`` says why not
    runtime: str = ""  # the driver/compiler stack ("PoCL 3.0-rc2 (LLVM 14.0.6)"), when a backend has several


@dataclass(frozen=True)
class Spec:
    """A parsed ``name[:device][:dtype]``: how a user names one backend instance."""

    name: str
    device: str | None = None
    dtype: str | None = None

    @classmethod
    def parse(cls, text: str, dtype: str | None = None) -> Spec:
        name, *rest = [part.strip() for part in text.strip().lower().split(":")]
        device = None
        for part in rest:
            if part in DTYPES:
                dtype = part
            elif device is None and part:
                device = part
            else:
                raise BackendError(
                    f"cannot read backend spec {text!r}: write NAME[:DEVICE][:DTYPE], e.g. opencl:1,"
                    f" naive:float64 (dtypes: {', '.join(DTYPES)})"
                )
        return cls(name, device, dtype)


class Backend:
    """Base class for backends.  Subclasses set the ClassVars and add ops.

    ``to_device``/``to_host`` move arrays across the boundary; the model
    uploads weights once (``upload_weight``), allocates its KV caches with
    ``alloc``, and reads only logits back with ``to_host``; ``begin_step`` and
    ``end_step`` bracket each forward step (``core.step.Step``).  Host arrays are
    numpy; device arrays are whatever the backend likes, and nothing above
    the core looks inside them.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # auto picks the highest available
    # the highest priority a probe may report (a GPU found): auto probes in this order
    max_priority: ClassVar[int | None] = None
    description: ClassVar[str] = ""
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    # storage formats kept natively (opswitch.core.formats); others arrive decoded as f32
    weight_formats: ClassVar[tuple[str, ...]] = ("f32",)
    # KV-cache formats (opswitch.core.formats.KV_FORMATS) this backend's attention reads
    kv_formats: ClassVar[tuple[str, ...]] = ("f32",)
    # may two threads call ops at once?  If not, the model layer serialises calls.
    thread_safe: ClassVar[bool] = True
    # seconds probe() and list_devices() may take unless $OPSWITCH_PROBE_TIMEOUT says
    # otherwise (None: 10); a probe that builds kernels to check a device needs more
    probe_seconds: ClassVar[float | None] = None

    def __init__(self, dtype: str = "float32", device: str | None = None) -> None:
        if dtype not in self.dtypes:
            raise BackendError(f"backend {self.name!r} computes in {', '.join(self.dtypes)}, not {dtype}")
        self.dtype = np.dtype(dtype)
        self.device_id = device
        self.lock = threading.RLock()
        self._probe: Probe | None = None
        self._prepared = False

    @property
    def spec(self) -> str:
        """How to name this instance: ``name[:device][:dtype]``."""
        parts = [self.name]
        if self.device_id is not None:
            parts.append(self.device_id)
        if str(self.dtype) != "float32":
            parts.append(str(self.dtype))
        return ":".join(parts)

    # -- devices and probing ----------------------------------------------
    @classmethod
    def list_devices(cls) -> list[Device]:
        """The devices this backend could run on here (one host device by default)."""
        return [Device("0", "host CPU")]

    def probe(self) -> Probe:
        """Find out (once) whether this backend can run here; cheap and quiet."""
        if self._probe is None:
            try:
                self._probe = self._probe_impl()
            except Exception as exc:  # a probe must explain, never crash a listing
                self._probe = Probe.missing(f"probe failed: {type(exc).__name__}: {exc}")
        return self._probe

    def _probe_impl(self) -> Probe:
        if self.device_id not in (None, "0"):
            return Probe.missing(f"{self.name} has one device, '0'; there is no device {self.device_id!r}")
        return Probe.ok("host CPU")

    def prepare(self) -> None:
        """Heavy set-up once chosen (e.g. building kernels); raise BackendError on failure."""
        if not self._prepared:
            self._prepare_impl()
            self._prepared = True

    def _prepare_impl(self) -> None:
        pass

    # -- memory ------------------------------------------------------------
    def to_device(self, x: Any) -> Any:
        """Host numpy array -> backend array, in the backend's compute dtype."""
        return np.ascontiguousarray(x, dtype=self.dtype)

    def to_host(self, x: Any) -> np.ndarray:
        """Backend array -> host numpy array."""
        return np.asarray(x)

    def alloc(self, shape: tuple[int, ...]) -> Any:
        """A zeroed backend array in the compute dtype (KV-cache buffers)."""
        return self.to_device(np.zeros(shape, dtype=np.float32))

    def alloc_kv(self, shape: tuple[int, ...], fmt: str = "f32") -> Any:
        """A zeroed KV-cache buffer in ``fmt``, one of ``kv_formats``.  The default gives a host
        numpy array for f16 (what the host backends' ops read); a device backend that lists
        f16 in ``kv_formats`` overrides this."""
        if fmt == "f32":
            return self.alloc(shape)
        return np.zeros(shape, dtype=np.float16)

    def store(self, dst: Any, src: np.ndarray) -> None:
        """Overwrite all of ``dst`` with host ``src`` (how fallbacks write caches back)."""
        if src is not dst:
            dst[...] = src

    def copy_rows(self, dst: Any, src: Any, n: int) -> None:
        """Copy the first ``n`` positions (axis 1) of cache buffer ``src`` into ``dst``, for
        prefix reuse.  The default goes through the host; numpy buffers copy in place."""
        if isinstance(dst, np.ndarray) and isinstance(src, np.ndarray):
            dst[:, :n] = src[:, :n]
            return
        host = np.array(self.to_host(dst), copy=True)
        host[:, :n] = self.to_host(src)[:, :n]
        self.store(dst, host)

    def upload_weight(self, stored: formats.Stored) -> Any:
        """A weight, once, at bind time.  Only formats in ``weight_formats`` arrive
        here undecoded; the default keeps the float32 values."""
        return self.to_device(formats.decode(stored))

    def synchronize(self) -> None:
        """Wait for queued work (for timing); host backends have none."""

    # -- steps -------------------------------------------------------------
    def begin_step(self, step: Step) -> None:
        """A forward step begins: the ops until ``end_step`` are its forward pass,
        whose attention gets ``step``'s layers.  A backend that records or captures
        steps (CUDA graphs) starts here; the default does nothing."""

    def end_step(self) -> None:
        """The step's ops have all been called (its logits are read next).  Called
        after every ``begin_step``, also when an op raised; the default does nothing."""

    @classmethod
    def native_ops(cls) -> tuple[str, ...]:
        """Catalogue ops this class implements itself (the rest fall back)."""
        return tuple(op for op in OP_NAMES if callable(getattr(cls, op, None)))
