"""The registry: every known backend, one cached instance per spec, and binding.

It composes the core's pieces: ``plugins`` finds the backend classes
(built-ins and entry points, contained), ``probing`` asks an instance what
it can do (contained), ``select`` is the policy that picks one, and
``optable`` is what a bound model calls.  Registration goes through hooks;
dispatch does not (``bind`` resolves the op table once).

Specs name an instance: ``name[:device][:dtype]`` (``blas``, ``opencl:1``,
``naive:float64``, ``cuda:0:float16``); ``auto`` and comma lists choose
among them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from opswitch.core import probing, select
from opswitch.core.backend import DTYPES, Backend, Device, Probe, Spec
from opswitch.core.containment import contained
from opswitch.core.errors import BackendError
from opswitch.core.optable import OpTable
from opswitch.core.plugins import BrokenPlugin, Plugins, autoload_from_env
from opswitch.core.probing import BackendStatus
from opswitch.core.select import Selection


class Registry:
    """All known backends: built-ins, entry-point plugins, and runtime ones."""

    def __init__(self, autoload: bool | None = None) -> None:
        self.autoload = autoload_from_env() if autoload is None else autoload
        self.plugins = Plugins(self.autoload)
        self._instances: dict[tuple[str, str | None, str], Backend] = {}

    def register(self, plugin: Any, name: str | None = None, source: str = "runtime") -> None:
        """Add a plugin (a module or object with ``@hookimpl`` functions)."""
        self.plugins.register(plugin, name, source)

    @property
    def broken(self) -> list[BrokenPlugin]:
        """Plugins that failed to import or broke the contract, with why."""
        return self.plugins.broken

    def names(self) -> list[str]:
        """Backend names, highest priority first."""
        offered = self.plugins.offered()
        return sorted(offered, key=lambda n: (-offered[n].cls.priority, n))

    def backend_class(self, name: str) -> type[Backend]:
        offered = self.plugins.offered()
        if name not in offered:
            raise self.unknown(name)
        return offered[name].cls

    def unknown(self, name: str) -> BackendError:
        """The error for a name no installed backend answers to (saying so if its plugin broke)."""
        for broken in self.broken:
            if broken.name == name or broken.name.rsplit(".", 1)[-1] == name:
                return BackendError(
                    f"backend {name!r} is broken: its plugin ({broken.source}) failed: {broken.error};"
                    " reinstall or fix the plugin, or pick another backend"
                )
        return BackendError(
            f"unknown backend {name!r}; available backends: {', '.join(self.available()) or 'none'}"
            " (`opswitch backends` lists each and why it may be unavailable)"
        )

    def backend(self, name: str, dtype: str = "float32", device: str | None = None) -> Backend:
        """The (cached) instance for ``name`` on ``device`` in ``dtype``; not yet probed.

        ``name`` may be a whole spec (``naive:float64``, ``opencl:1``)."""
        spec = Spec.parse(name, None)
        name, device, dtype = spec.name, spec.device or device, spec.dtype or dtype
        cls = self.backend_class(name)
        dtype = str(np.dtype(dtype)) if dtype in DTYPES else dtype
        key = (name, device, dtype)
        if key not in self._instances:
            if dtype not in cls.dtypes:
                raise BackendError(f"backend {name!r} computes in {', '.join(cls.dtypes)}, not {dtype}")
            outcome = contained(lambda: cls(dtype=dtype, device=device))
            if not outcome.ok or not isinstance(outcome.value, Backend):
                error = outcome.error or f"its constructor returned {outcome.value!r}"
                source = self.plugins.offered()[name].source
                raise BackendError(f"backend {name!r} ({source}) is broken: {error}")
            self._instances[key] = outcome.value
        return self._instances[key]

    def probe(self, backend: Backend) -> Probe:
        """``backend.probe()``, contained: quiet, time-limited, never raising."""
        return probing.probe(backend)

    def devices(self, name: str) -> list[Device]:
        """``name``'s devices (``list_devices``, contained: a broken one lists none)."""
        return probing.devices(self.backend_class(name))

    def statuses(self) -> list[BackendStatus]:
        """Probe every backend; one row each, highest priority first."""
        rows = []
        for name in self.names():
            offered = self.plugins.offered()[name]
            try:
                found = probing.probe(self.backend(name, offered.cls.dtypes[0]))
            except BackendError as exc:
                found = Probe.missing(str(exc))
            rows.append(probing.status(offered.cls, offered.source, found))
        return sorted(rows, key=lambda row: -row.priority)

    def available(self) -> list[str]:
        """Every available backend (probes them all: for listings and errors)."""
        return [name for name in self.names() if self._available(name)]

    def _available(self, name: str) -> bool:
        try:
            return probing.probe(self.backend(name, self.backend_class(name).dtypes[0])).available
        except BackendError:
            return False

    def select(self, spec: str | None = None, dtype: str = "float32") -> Selection:
        """Resolve a spec to a probed, prepared backend (the policy: ``core.select``)."""
        return select.select(self, spec, dtype)

    def bind(self, backend: Backend) -> OpTable:
        """Resolve ``backend``'s op table (it must probe as available)."""
        found = probing.probe(backend)
        if not found.available:
            raise BackendError(f"backend {backend.spec!r} is unavailable: {found.reason}")
        failure = probing.prepare(backend)
        if failure:
            raise BackendError(f"backend {backend.spec!r} {failure}")
        return OpTable(backend)


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


@contextlib.contextmanager
def use_registry(registry: Registry | None) -> Iterator[Registry | None]:
    """Make ``registry`` the process-wide one for a block (tests, an app that
    installed a plugin at run time); ``None`` means "build a fresh one on next use".
    The previous one is restored afterwards."""
    global _default
    previous, _default = _default, registry
    try:
        yield registry
    finally:
        _default = previous


def select_backend(spec: str | None = None, dtype: str = "float32") -> Selection:
    """Resolve ``spec`` with the process-wide registry (see ``Registry.select``)."""
    return get_registry().select(spec, dtype)
