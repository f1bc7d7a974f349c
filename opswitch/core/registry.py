"""Finds backends through pluggy, picks one, and resolves its op table.

Registration goes through hooks; dispatch does not.  ``OpTable`` resolves
every catalogue op to a plain callable once, so the hot loop pays an
attribute read per op (``ops.linear(...)``), never a hook call.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import pluggy

from opswitch.core import hookspecs
from opswitch.core.backend import Backend, Probe
from opswitch.core.errors import BackendError
from opswitch.core.ops import CATALOGUE, OP_NAMES

ENTRY_POINT_GROUP = "opswitch"
BUILTIN_PLUGINS = (
    "opswitch.backends.naive",
    "opswitch.backends.blas",
    "opswitch.backends.opencl",
)
ENV_BACKEND = "OPSWITCH_BACKEND"
ENV_NO_AUTOLOAD = "OPSWITCH_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded, kept so listings can show why."""

    name: str
    source: str
    error: str


@dataclass(frozen=True)
class BackendStatus:
    """One row of ``opswitch backends``."""

    name: str
    priority: int
    source: str
    probe: Probe
    native_ops: tuple[str, ...]
    description: str = ""

    @property
    def fallback_ops(self) -> tuple[str, ...]:
        return tuple(op for op in OP_NAMES if op not in self.native_ops)


@dataclass
class Selection:
    """The backend a spec resolved to, and a sentence saying why."""

    backend: Backend
    reason: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _is_host_passthrough(x: Any) -> bool:
    """Scalars, None and integer index arrays never move between devices."""
    if x is None or isinstance(x, (bool, int, float, str, np.integer, np.floating)):
        return True
    return isinstance(x, np.ndarray) and x.dtype.kind in "iub"


def _fallback(backend: Backend, reference: Callable) -> Callable:
    """Run ``reference`` on the host for a backend that lacks the op."""
    to_host, to_device = backend.to_host, backend.to_device

    def run(*args: Any, **kwargs: Any) -> Any:
        args = [a if _is_host_passthrough(a) else to_host(a) for a in args]
        kwargs = {k: v if _is_host_passthrough(v) else to_host(v) for k, v in kwargs.items()}
        out = reference(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(to_device(o) for o in out)
        return to_device(out)

    run.__name__ = f"fallback_{reference.__name__}"
    return run


class OpTable:
    """A backend's ops resolved to plain callables, plus what fell back."""

    __slots__ = (*OP_NAMES, "backend", "fallbacks")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        native = backend.native_ops()
        for name in OP_NAMES:
            impl = getattr(backend, name) if name in native else None
            setattr(self, name, impl or _fallback(backend, CATALOGUE[name].reference))
        self.fallbacks: tuple[str, ...] = tuple(op for op in OP_NAMES if op not in native)


class Registry:
    """All known backends: built-ins, entry-point plugins, and runtime ones."""

    def __init__(self, autoload: bool | None = None) -> None:
        if autoload is None:
            autoload = os.environ.get(ENV_NO_AUTOLOAD, "").strip() not in ("1", "true", "yes")
        self.autoload = autoload
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, str] = {}  # plugin name -> "built-in" / "dist 1.0"
        self._load_broken: list[BrokenPlugin] = []  # import failures
        self._hook_broken: list[BrokenPlugin] = []  # bad hook results
        self._classes: dict[str, tuple[type[Backend], str]] | None = None
        self._instances: dict[tuple[str, str], Backend] = {}
        for module in BUILTIN_PLUGINS:
            self._load_module(module, module, "built-in")
        if autoload:
            self._load_entry_points()

    # -- discovery -------------------------------------------------------
    def _load_module(self, plugin_name: str, module: str, source: str) -> None:
        try:
            self.register(importlib.import_module(module), plugin_name, source)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._load_broken.append(BrokenPlugin(plugin_name, source, error))

    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            source = f"{dist.name} {dist.version}" if dist else f"entry point {ep.value}"
            if self._pm.get_plugin(ep.name) is not None or ep.name in self._sources:
                continue
            try:
                self.register(ep.load(), ep.name, source)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                self._load_broken.append(BrokenPlugin(ep.name, source, error))

    def register(self, plugin: Any, name: str | None = None, source: str = "runtime") -> None:
        """Add a plugin (a module or object with ``@hookimpl`` functions)."""
        name = self._pm.register(plugin, name=name)
        self._sources[name] = source
        self._classes = None

    def _backend_classes(self) -> dict[str, tuple[type[Backend], str]]:
        if self._classes is not None:
            return self._classes
        classes: dict[str, tuple[type[Backend], str]] = {}
        self._hook_broken = []
        for impl in self._pm.hook.opswitch_backends.get_hookimpls():
            source = self._sources.get(impl.plugin_name, "runtime")
            try:
                provided = list(impl.function())
            except Exception as exc:
                error = f"opswitch_backends() raised {type(exc).__name__}: {exc}"
                self._hook_broken.append(BrokenPlugin(impl.plugin_name, source, error))
                continue
            for cls in provided:
                problem = _contract_problem(cls)
                if problem is None and cls.name in classes:
                    problem = f"backend name {cls.name!r} is already provided by {classes[cls.name][1]}"
                if problem:
                    self._hook_broken.append(BrokenPlugin(impl.plugin_name, source, problem))
                else:
                    classes[cls.name] = (cls, source)
        self._classes = classes
        return classes

    # -- queries ---------------------------------------------------------
    @property
    def broken(self) -> list[BrokenPlugin]:
        """Plugins that failed to import or broke the contract, with why."""
        self._backend_classes()
        return self._load_broken + self._hook_broken

    def names(self) -> list[str]:
        """Backend names, highest priority first."""
        classes = self._backend_classes()
        return sorted(classes, key=lambda n: (-classes[n][0].priority, n))

    def backend(self, name: str, dtype: str = "float32") -> Backend:
        """The (cached) instance of a backend by exact name; not yet probed."""
        classes = self._backend_classes()
        if name not in classes:
            for broken in self.broken:
                if broken.name == name:
                    raise BackendError(
                        f"backend {name!r} is unavailable: its plugin ({broken.source}) failed to load:"
                        f" {broken.error}; reinstall or fix the plugin, or pick another backend"
                    )
            raise BackendError(
                f"unknown backend {name!r}; available backends: {', '.join(self.available()) or 'none'}"
                " (`opswitch backends` lists every known one and why it may be unavailable)"
            )
        key = (name, str(np.dtype(dtype)))
        if key not in self._instances:
            self._instances[key] = classes[name][0](dtype=key[1])
        return self._instances[key]

    def statuses(self) -> list[BackendStatus]:
        """Probe every backend; one row each, highest priority first."""
        rows = []
        for name in self.names():
            cls, source = self._backend_classes()[name]
            probe = self.backend(name).probe()
            priority = probe.priority if probe.priority is not None else cls.priority
            rows.append(BackendStatus(name, priority, source, probe, cls.native_ops(), cls.description))
        return sorted(rows, key=lambda row: -row.priority)

    def available(self) -> list[str]:
        return [name for name in self.names() if self.backend(name).probe().available]

    # -- selection -------------------------------------------------------
    def select(self, spec: str | None = None, dtype: str = "float32") -> Selection:
        """Resolve ``auto``, ``name`` or ``a,b,c`` (default: $OPSWITCH_BACKEND or auto)."""
        spec = (spec or os.environ.get(ENV_BACKEND) or "auto").strip().lower()
        wanted = [part.strip() for part in spec.split(",") if part.strip()] or ["auto"]
        if len(wanted) == 1 and wanted[0] != "auto":
            self.backend(wanted[0], dtype)  # an unknown single name: the "unknown backend" error
        skipped: list[tuple[str, str]] = []
        tried: set[str] = set()
        for i, choice in enumerate(wanted):
            for name in self._by_probed_priority(dtype) if choice == "auto" else [choice]:
                if name in tried:
                    continue
                tried.add(name)
                if choice != "auto" and name not in self._backend_classes():
                    # a list is a preference order across machines: a backend this one
                    # lacks is skipped, visibly, like an unavailable one
                    skipped.append((name, "no backend of that name is installed"))
                    continue
                backend = self.backend(name, dtype) if choice != "auto" else self._try(name, dtype)
                if backend is None:
                    continue
                probe = backend.probe()
                if probe.available:
                    return Selection(backend, _why(choice, name, i, skipped, probe), skipped)
                skipped.append((name, probe.reason))
        if len(wanted) == 1 and wanted[0] != "auto":
            raise BackendError(
                f"backend {wanted[0]!r} is unavailable: {skipped[0][1]}; "
                f"available backends: {', '.join(self.available()) or 'none'}"
            )
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped) or "no backends are registered"
        raise BackendError(
            f"no backend of {spec!r} is available ({reasons}); "
            f"available backends: {', '.join(self.available()) or 'none'}"
        )

    def _by_probed_priority(self, dtype: str) -> list[str]:
        """For auto: names by the priority each probe reports (a GPU may rank higher);
        unavailable ones keep their class priority, so auto can say why it passed them."""

        def rank(name: str) -> int:
            backend = self._try(name, dtype)
            probe = backend.probe() if backend is not None else None
            if probe is not None and probe.available and probe.priority is not None:
                return probe.priority
            return self._backend_classes()[name][0].priority

        return sorted(self.names(), key=lambda n: -rank(n))

    def _try(self, name: str, dtype: str) -> Backend | None:
        """For auto: a backend that cannot compute in ``dtype`` is just skipped."""
        try:
            return self.backend(name, dtype)
        except BackendError:
            return None

    def bind(self, backend: Backend) -> OpTable:
        """Resolve ``backend``'s op table (it must probe as available)."""
        probe = backend.probe()
        if not probe.available:
            raise BackendError(f"backend {backend.name!r} is unavailable: {probe.reason}")
        return OpTable(backend)


def _contract_problem(cls: Any) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        return f"opswitch_backends() returned {cls!r}, which is not an opswitch Backend subclass"
    if not cls.name or cls.name != cls.name.strip().lower() or "," in cls.name:
        return f"backend class {cls.__name__} needs a lower-case `name` without commas"
    if cls.name == "auto":
        return "a backend may not be called 'auto'"
    return None


def _why(choice: str, name: str, index: int, skipped: list, probe: Probe) -> str:
    where = f" on {probe.device}" if probe.device else ""
    if choice == "auto":
        reason = f"{name}{where}: highest-priority available backend (auto)"
    elif index == 0 and not skipped:
        reason = f"{name}{where}: requested"
    else:
        reason = f"{name}{where}: first available in the requested list"
    if skipped:
        reason += "; skipped " + "; ".join(f"{n} ({r})" for n, r in skipped)
    return reason


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


def reset_registry() -> None:
    """Forget the process-wide registry (tests, or after installing a plugin)."""
    global _default
    _default = None


def select_backend(spec: str | None = None, dtype: str = "float32") -> Selection:
    return get_registry().select(spec, dtype)
