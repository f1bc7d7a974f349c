"""Finds backends through pluggy, picks one, and resolves its op table.

Registration goes through hooks; dispatch does not.  ``OpTable`` resolves
every catalogue op to a plain callable once, so the hot loop pays an
attribute read per op (``ops.linear(...)``), never a hook call.

Everything a plugin does (import, ``opswitch_backends()``, construction,
probe, prepare) runs contained (``containment.contained``): an exception,
``SystemExit``, a hang or output becomes a "broken" or "unavailable" row
with the reason, never a crash of the tool.

Specs name an instance: ``name[:device][:dtype]`` (``blas``, ``opencl:1``,
``naive:float64``, ``cuda:0:float16``); ``auto`` and comma lists choose
among them.
"""

from __future__ import annotations

import heapq
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import pluggy

from opswitch.core import formats, hookspecs
from opswitch.core.backend import DTYPES, Backend, Device, Probe
from opswitch.core.containment import contained, probe_timeout
from opswitch.core.errors import BackendError
from opswitch.core.ops import CATALOGUE, OP_NAMES
from opswitch.core.step import LayerStep

ENTRY_POINT_GROUP = "opswitch"
BUILTIN_PLUGINS = (
    "opswitch.backends.naive",
    "opswitch.backends.blas",
    "opswitch.backends.cpu",
    "opswitch.backends.opencl",
    "opswitch.backends.cuda",
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
    dtypes: tuple[str, ...] = ("float32",)
    devices: tuple[str, ...] = ()
    weight_formats: tuple[str, ...] = ("f32",)
    thread_safe: bool = True

    @property
    def fallback_ops(self) -> tuple[str, ...]:
        return tuple(op for op in OP_NAMES if op not in self.native_ops)


@dataclass
class Selection:
    """The backend a spec resolved to, and a sentence saying why."""

    backend: Backend
    reason: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Spec:
    """A parsed ``name[:device][:dtype]``."""

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


# -- the op table -------------------------------------------------------------
def _is_host_passthrough(x: Any) -> bool:
    """Scalars, None and integer index arrays never move between devices."""
    if x is None or isinstance(x, (bool, int, float, str, np.integer, np.floating)):
        return True
    return isinstance(x, np.ndarray) and x.dtype.kind in "iub"


def _tree(fn: Callable, x: Any) -> Any:
    """Apply ``fn`` to every array in ``x`` (lists and tuples of arrays, a step's caches)."""
    if isinstance(x, LayerStep):
        return x.with_caches(_tree(fn, x.caches))
    if isinstance(x, (list, tuple)) and not _is_host_passthrough(x):
        if all(_is_host_passthrough(v) for v in x):
            return x  # a list of ints (starts, counts)
        return type(x)(_tree(fn, v) for v in x)
    return x if _is_host_passthrough(x) else fn(x)


def _store_tree(backend: Backend, device: Any, host: Any) -> None:
    if isinstance(device, LayerStep):
        _store_tree(backend, device.caches, host.caches)
    elif isinstance(device, (list, tuple)):
        for d, h in zip(device, host):
            _store_tree(backend, d, h)
    elif not _is_host_passthrough(device):
        backend.store(device, host)


def _fallback(backend: Backend, name: str) -> Callable:
    """Run the reference of ``name`` on the host for a backend that lacks the op;
    arguments the op writes in place are copied back to the device."""
    spec = CATALOGUE[name]
    reference, writes = spec.reference, spec.writes
    to_host, to_device = backend.to_host, backend.to_device

    def run(*args: Any, **kwargs: Any) -> Any:
        host_args = [_tree(to_host, a) for a in args]
        host_kwargs = {k: _tree(to_host, v) for k, v in kwargs.items()}
        out = reference(*host_args, **host_kwargs)
        for i in writes:
            if i < len(args):
                _store_tree(backend, args[i], host_args[i])
        if isinstance(out, tuple):
            return tuple(to_device(o) for o in out)
        return to_device(out)

    run.__name__ = f"fallback_{name}"
    return run


def _attention_per_sequence(table: OpTable) -> Callable:
    """``attention_batch`` for a backend with single-sequence ``attention`` only:
    split the rows, attend per sequence, join (each through the table's ops)."""

    def run(qkv, n_head, step):
        if len(step.caches) == 1:
            k_cache, v_cache = step.caches[0]
            return table.attention(qkv, n_head, k_cache, v_cache, step.starts[0])
        outs = [
            table.attention(table.slice_rows(qkv, a, b), n_head, k_cache, v_cache, start)
            for (a, b), (k_cache, v_cache), start in zip(step.bounds, step.caches, step.starts)
        ]
        return table.concat_rows(outs)

    run.__name__ = "attention_per_sequence"
    return run


class OpTable:
    """A backend's ops resolved to plain callables, plus what fell back.

    ``fallbacks`` are ops the host reference computes; ``per_sequence`` is
    set when the backend has single-sequence ``attention`` but no
    ``attention_batch``, so batches are attended one sequence at a time.
    """

    __slots__ = (*OP_NAMES, "backend", "fallbacks", "per_sequence")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        native = backend.native_ops()
        for name in OP_NAMES:
            impl = getattr(backend, name) if name in native else None
            setattr(self, name, impl or _fallback(backend, name))
        self.per_sequence = "attention_batch" not in native and "attention" in native
        if self.per_sequence:
            self.attention_batch = _attention_per_sequence(self)
        self.fallbacks: tuple[str, ...] = tuple(
            op for op in OP_NAMES if op not in native and not (op == "attention_batch" and self.per_sequence)
        )

    def describe_fallbacks(self) -> str:
        """One line for users: what runs on the host, and what runs per sequence."""
        parts = list(self.fallbacks)
        if self.per_sequence:
            parts.append("attention_batch (per sequence through attention)")
        return ", ".join(parts)


# -- the registry -------------------------------------------------------------
class Registry:
    """All known backends: built-ins, entry-point plugins, and runtime ones."""

    def __init__(self, autoload: bool | None = None) -> None:
        if autoload is None:
            autoload = os.environ.get(ENV_NO_AUTOLOAD, "").strip().lower() not in ("1", "true", "yes")
        self.autoload = autoload
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, str] = {}  # plugin name -> "built-in" / "dist 1.0"
        self._load_broken: list[BrokenPlugin] = []  # import failures
        self._hook_broken: list[BrokenPlugin] = []  # bad hook results, constructors that raise
        self._classes: dict[str, tuple[type[Backend], str, str]] | None = None  # name -> cls, source, plugin
        self._instances: dict[tuple[str, str | None, str], Backend] = {}
        for module in BUILTIN_PLUGINS:
            self._load_module(module, module, "built-in")
        if autoload:
            self._load_entry_points()

    # -- discovery -------------------------------------------------------
    def _load_module(self, plugin_name: str, module: str, source: str) -> None:
        outcome = contained(lambda: importlib.import_module(module))
        if outcome.ok:
            self.register(outcome.value, plugin_name, source)
        else:
            self._load_broken.append(BrokenPlugin(plugin_name, source, outcome.error))

    def _load_entry_points(self) -> None:
        try:
            eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        except Exception as exc:  # broken distribution metadata
            self._load_broken.append(BrokenPlugin("entry points", ENTRY_POINT_GROUP, str(exc)))
            return
        for ep in eps:
            dist = getattr(ep, "dist", None)
            source = f"{dist.name} {dist.version}" if dist else f"entry point {ep.value}"
            if self._pm.get_plugin(ep.name) is not None or ep.name in self._sources:
                continue
            outcome = contained(ep.load)
            if not outcome.ok:
                self._load_broken.append(BrokenPlugin(ep.name, source, outcome.error))
                continue
            try:
                self.register(outcome.value, ep.name, source)
            except Exception as exc:  # pluggy rejects the module (e.g. a bad hookimpl)
                self._load_broken.append(BrokenPlugin(ep.name, source, f"{type(exc).__name__}: {exc}"))

    def register(self, plugin: Any, name: str | None = None, source: str = "runtime") -> None:
        """Add a plugin (a module or object with ``@hookimpl`` functions)."""
        name = self._pm.register(plugin, name=name)
        self._sources[name] = source
        self._classes = None

    def _backend_classes(self) -> dict[str, tuple[type[Backend], str, str]]:
        if self._classes is not None:
            return self._classes
        classes: dict[str, tuple[type[Backend], str, str]] = {}
        self._hook_broken = []
        for impl in self._pm.hook.opswitch_backends.get_hookimpls():
            source = self._sources.get(impl.plugin_name, "runtime")
            outcome = contained(lambda impl=impl: list(impl.function()))
            if not outcome.ok:
                error = f"opswitch_backends() failed: {outcome.error}"
                self._hook_broken.append(BrokenPlugin(impl.plugin_name, source, error))
                continue
            for cls in outcome.value:
                problem = contract_problem(cls)
                if problem is None and cls.name in classes:
                    problem = f"backend name {cls.name!r} is already provided by {classes[cls.name][1]}"
                if problem:
                    self._hook_broken.append(BrokenPlugin(impl.plugin_name, source, problem))
                else:
                    classes[cls.name] = (cls, source, impl.plugin_name)
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

    def backend_class(self, name: str) -> type[Backend]:
        classes = self._backend_classes()
        if name not in classes:
            raise self._unknown(name)
        return classes[name][0]

    def _unknown(self, name: str) -> BackendError:
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
                raise BackendError(
                    f"backend {name!r} computes in {', '.join(cls.dtypes)}, not {dtype}"
                )
            outcome = contained(lambda: cls(dtype=dtype, device=device))
            if not outcome.ok or not isinstance(outcome.value, Backend):
                error = outcome.error or f"its constructor returned {outcome.value!r}"
                source = self._backend_classes()[name][1]
                raise BackendError(f"backend {name!r} ({source}) is broken: {error}")
            self._instances[key] = outcome.value
        return self._instances[key]

    def probe(self, backend: Backend) -> Probe:
        """``backend.probe()``, contained: quiet, time-limited, never raising."""
        if backend._probe is None:
            outcome = contained(backend.probe, timeout=probe_timeout(_probe_seconds(type(backend))))
            if not outcome.ok:
                backend._probe = Probe.missing(f"probe {outcome.error}")
            elif not isinstance(outcome.value, Probe):
                backend._probe = Probe.missing(f"probe returned {outcome.value!r}, not an opswitch Probe")
        return backend._probe

    def statuses(self) -> list[BackendStatus]:
        """Probe every backend; one row each, highest priority first."""
        rows = []
        for name in self.names():
            cls, source, _ = self._backend_classes()[name]
            try:
                probe = self.probe(self.backend(name, cls.dtypes[0]))
            except BackendError as exc:
                probe = Probe.missing(str(exc))
            priority = probe.priority if isinstance(probe.priority, int) else cls.priority
            devices = self._devices(cls)  # each with whether it works, also when none does
            rows.append(BackendStatus(
                name, priority, source, probe, cls.native_ops(), cls.description, tuple(cls.dtypes),
                devices, tuple(cls.weight_formats), cls.thread_safe,
            ))  # fmt: skip
        return sorted(rows, key=lambda row: -row.priority)

    def devices(self, name: str) -> list[Device]:
        """``name``'s devices (``list_devices``, contained: a broken one lists none)."""
        cls = self.backend_class(name)
        outcome = contained(cls.list_devices, timeout=probe_timeout(_probe_seconds(cls)))
        if not outcome.ok or not isinstance(outcome.value, list):
            return []
        return [d for d in outcome.value if isinstance(d, Device)]

    def _devices(self, cls: type[Backend]) -> tuple[str, ...]:
        return tuple(f"{cls.name}:{d.id} {d.description}" for d in self.devices(cls.name))

    def available(self) -> list[str]:
        """Every available backend (probes them all: for listings and errors)."""
        return [name for name in self.names() if self._available(name)]

    def _available(self, name: str) -> bool:
        try:
            return self.probe(self.backend(name, self.backend_class(name).dtypes[0])).available
        except BackendError:
            return False

    # -- selection -------------------------------------------------------
    def select(self, spec: str | None = None, dtype: str = "float32") -> Selection:
        """Resolve ``auto``, ``name[:device][:dtype]`` or ``a,b,c`` (default:
        $OPSWITCH_BACKEND or auto) to a probed, prepared backend."""
        text = (spec or os.environ.get(ENV_BACKEND) or "auto").strip().lower()
        wanted = [part.strip() for part in text.split(",") if part.strip()] or ["auto"]
        single = len(wanted) == 1 and wanted[0] != "auto"
        skipped: list[tuple[str, str]] = []
        tried: set[tuple[str, str | None, str]] = set()
        for i, choice in enumerate(wanted):
            parsed = Spec.parse(choice, dtype) if choice != "auto" else None
            if parsed is not None and parsed.name not in self._backend_classes():
                if single:
                    raise self._unknown(parsed.name)
                # a list is a preference order across machines: a backend this one
                # lacks is skipped, visibly; a broken one says so
                skipped.append((parsed.name, self._missing_reason(parsed.name)))
                continue
            if parsed is None:
                chosen = self._select_auto(dtype, tried, skipped)
                if chosen is not None:
                    return Selection(chosen[0], _why("auto", chosen[0], i, skipped, chosen[1]), skipped)
                continue
            key = (parsed.name, parsed.device, parsed.dtype or dtype)
            if key in tried:
                continue
            tried.add(key)
            found = self._probed(parsed, dtype, skipped, raise_errors=single)
            if found is None:
                continue
            backend, probe = found
            failure = self._prepare(backend)
            if failure:
                skipped.append((backend.spec, failure))
                continue
            return Selection(backend, _why(choice, backend, i, skipped, probe), skipped)
        if single:
            raise BackendError(
                f"backend {wanted[0]!r} is unavailable: {skipped[0][1]}; "
                f"available backends: {', '.join(self.available()) or 'none'}"
            )
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped) or "no backends are registered"
        raise BackendError(
            f"no backend of {text!r} is available ({reasons}); "
            f"available backends: {', '.join(self.available()) or 'none'}"
        )

    def _probed(self, spec: Spec, dtype: str, skipped: list, raise_errors: bool = False,
                ) -> tuple[Backend, Probe] | None:
        """The instance for ``spec`` and its probe, if available; else None, with why in ``skipped``."""
        try:
            backend = self.backend(spec.name, spec.dtype or dtype, spec.device)
        except BackendError as exc:
            if raise_errors:
                raise
            skipped.append((spec.name, str(exc)))
            return None
        probe = self.probe(backend)
        if not probe.available:
            skipped.append((backend.spec, probe.reason))
            return None
        return backend, probe

    def _select_auto(self, dtype: str, tried: set, skipped: list) -> tuple[Backend, Probe] | None:
        """The best backend for ``auto``: probe in order of the highest priority each
        could report, stop once nothing further down can beat a probed one, and
        prepare only the winner (the next best if the winner fails to prepare)."""
        ranked: list[tuple[int, int, Backend, Probe]] = []  # (-rank, order, backend, probe)

        def prepare_best(floor: int | None) -> tuple[Backend, Probe] | None:
            while ranked and (floor is None or -ranked[0][0] >= floor):
                _, _, backend, probe = heapq.heappop(ranked)
                failure = self._prepare(backend)
                if not failure:
                    return backend, probe
                skipped.append((backend.spec, failure))
            return None

        for order, cand in enumerate(self._auto_order(dtype)):
            key = (cand.name, cand.device, cand.dtype or dtype)
            if key in tried:
                continue
            tried.add(key)
            cls = self.backend_class(cand.name)
            ceiling = _ceiling(cls)
            chosen = prepare_best(floor=ceiling)  # what is probed already beats anything from here on
            if chosen:
                return chosen
            found = self._probed(cand, dtype, skipped)
            if found is None:
                continue
            backend, probe = found
            rank = probe.priority if isinstance(probe.priority, int) else cls.priority
            rank = min(rank, max(ceiling, cls.priority))  # a probe may not outrank its declared ceiling
            heapq.heappush(ranked, (-rank, order, backend, probe))
        return prepare_best(floor=None)

    def _missing_reason(self, name: str) -> str:
        message = str(self._unknown(name))
        return message if "is broken" in message else "no backend of that name is installed"

    def _auto_order(self, dtype: str) -> list[Spec]:
        """For auto: every backend that computes in ``dtype``, by the highest
        priority its probe could report (so a possible GPU is probed first)."""
        classes = self._backend_classes()

        names = [n for n in self.names() if dtype in classes[n][0].dtypes]
        return [Spec(n, None, dtype) for n in sorted(names, key=lambda n: (-_ceiling(classes[n][0]), n))]

    @staticmethod
    def _prepare(backend: Backend) -> str | None:
        """``backend.prepare()``, contained; the reason on failure, else None."""
        outcome = contained(backend.prepare, timeout=None if backend._prepared else 300)
        if outcome.ok:
            return None
        return f"failed to prepare: {outcome.error.removeprefix('BackendError: ')}"

    def bind(self, backend: Backend) -> OpTable:
        """Resolve ``backend``'s op table (it must probe as available)."""
        probe = self.probe(backend)
        if not probe.available:
            raise BackendError(f"backend {backend.spec!r} is unavailable: {probe.reason}")
        failure = self._prepare(backend)
        if failure:
            raise BackendError(f"backend {backend.spec!r} {failure}")
        return OpTable(backend)


def failing_op(exc: BaseException) -> str | None:
    """The catalogue op in whose implementation ``exc`` was raised, from its traceback."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        name = tb.tb_frame.f_code.co_name
        if name in CATALOGUE or name.removeprefix("fallback_") in CATALOGUE:
            found = name.removeprefix("fallback_")
        tb = tb.tb_next
    return found


def contract_problem(cls: Any) -> str | None:
    """What is wrong with a class a plugin offers as a backend, or None."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        return f"opswitch_backends() returned {cls!r}, which is not an opswitch Backend subclass"
    label = f"backend class {cls.__name__}"
    name = cls.__dict__.get("name", cls.name)
    if not isinstance(name, str) or not name or name != name.strip().lower() or any(c in name for c in ",: "):
        return f"{label} needs a lower-case string `name` without commas, colons or spaces, got {name!r}"
    if name == "auto":
        return "a backend may not be called 'auto'"
    for attr in ("priority", "max_priority"):
        value = getattr(cls, attr)
        if attr == "max_priority" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{label}: `{attr}` must be an integer, got {value!r}"
    if not isinstance(cls.description, str):
        return f"{label}: `description` must be a string, got {cls.description!r}"
    dtypes = cls.dtypes
    if not isinstance(dtypes, (tuple, list)) or not dtypes or any(d not in DTYPES for d in dtypes):
        return f"{label}: `dtypes` must be a non-empty tuple of {', '.join(DTYPES)}, got {dtypes!r}"
    wf = cls.weight_formats
    if not isinstance(wf, (tuple, list)) or any(f not in formats.FORMATS for f in wf):
        return f"{label}: `weight_formats` must be a tuple of {', '.join(formats.FORMATS)}, got {wf!r}"
    if not isinstance(cls.thread_safe, bool):
        return f"{label}: `thread_safe` must be True or False, got {cls.thread_safe!r}"
    return None


def _ceiling(cls: type[Backend]) -> int:
    """The highest priority a backend's probe may report (auto probes in this order)."""
    return cls.max_priority if isinstance(cls.max_priority, int) else cls.priority


def _probe_seconds(cls: type[Backend]) -> float | None:
    """A backend's own probe time budget, if it declares a sane one."""
    value = getattr(cls, "probe_seconds", None)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 3600
    return float(value) if ok else None


def _why(choice: str, backend: Backend, index: int, skipped: list, probe: Probe) -> str:
    where = f" on {probe.device}" if probe.device else ""
    name = backend.spec
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
