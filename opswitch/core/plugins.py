"""Plugin discovery: built-ins and entry points, loaded through pluggy, contained.

Everything a plugin does here (its import, its ``opswitch_backends()``
hook) runs contained (``containment.contained``): an exception,
``SystemExit``, a hang or output becomes a ``BrokenPlugin`` row with the
reason, never a crash of the tool.  The classes a plugin offers are checked
against the contract (``contract_problem``) before anything uses them.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from opswitch.core import formats, hookspecs
from opswitch.core.backend import DTYPES, Backend
from opswitch.core.containment import contained

ENTRY_POINT_GROUP = "opswitch"
# Named by module string (as pytest names its built-in plugins): core imports no backend.
BUILTIN_PLUGINS = (
    "opswitch.backends.naive",
    "opswitch.backends.blas",
    "opswitch.backends.cpu",
    "opswitch.backends.opencl",
    "opswitch.backends.cuda",
)
ENV_NO_AUTOLOAD = "OPSWITCH_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded, kept so listings can show why."""

    name: str
    source: str
    error: str


@dataclass(frozen=True)
class Offered:
    """A backend class a plugin offers, with where it came from."""

    cls: type[Backend]
    source: str  # "built-in" / "dist 1.0" / "runtime"
    plugin: str


def autoload_from_env() -> bool:
    """Whether entry-point plugins load ($OPSWITCH_DISABLE_PLUGIN_AUTOLOAD turns it off)."""
    return os.environ.get(ENV_NO_AUTOLOAD, "").strip().lower() not in ("1", "true", "yes")


class Plugins:
    """The loaded plugin modules and the backend classes they offer."""

    def __init__(self, autoload: bool) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, str] = {}  # plugin name -> "built-in" / "dist 1.0"
        self._load_broken: list[BrokenPlugin] = []  # import failures
        self._hook_broken: list[BrokenPlugin] = []  # bad hook results, broken contracts
        self._offered: dict[str, Offered] | None = None  # backend name -> class; None: recompute
        for module in BUILTIN_PLUGINS:
            self._load_module(module, module, "built-in")
        if autoload:
            self._load_entry_points()

    def _load_module(self, plugin_name: str, module: str, source: str) -> None:
        outcome = contained(lambda: importlib.import_module(module))
        if outcome.ok:
            self.register(outcome.value, plugin_name, source)
        else:
            self._load_broken.append(BrokenPlugin(plugin_name, source, outcome.error or ""))

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
                self._load_broken.append(BrokenPlugin(ep.name, source, outcome.error or ""))
                continue
            try:
                self.register(outcome.value, ep.name, source)
            except Exception as exc:  # pluggy rejects the module (e.g. a bad hookimpl)
                self._load_broken.append(BrokenPlugin(ep.name, source, f"{type(exc).__name__}: {exc}"))

    def register(self, plugin: Any, name: str | None = None, source: str = "runtime") -> None:
        """Add a plugin (a module or object with ``@hookimpl`` functions)."""
        registered = self._pm.register(plugin, name=name)
        if registered is not None:
            self._sources[registered] = source
        self._offered = None

    def offered(self) -> dict[str, Offered]:
        """Every backend class on offer by name (hooks called once, contained, cached)."""
        if self._offered is not None:
            return self._offered
        offered: dict[str, Offered] = {}
        self._hook_broken = []
        for impl in self._pm.hook.opswitch_backends.get_hookimpls():
            source = self._sources.get(impl.plugin_name, "runtime")
            outcome = contained(functools.partial(_offered_by, impl))
            if not outcome.ok:
                error = f"opswitch_backends() failed: {outcome.error}"
                self._hook_broken.append(BrokenPlugin(impl.plugin_name, source, error))
                continue
            for cls in outcome.value:
                problem = contract_problem(cls)
                if problem is None and cls.name in offered:
                    problem = f"backend name {cls.name!r} is already provided by {offered[cls.name].source}"
                if problem:
                    self._hook_broken.append(BrokenPlugin(impl.plugin_name, source, problem))
                else:
                    offered[cls.name] = Offered(cls, source, impl.plugin_name)
        self._offered = offered
        return offered

    @property
    def broken(self) -> list[BrokenPlugin]:
        """Plugins that failed to import or broke the contract, with why."""
        self.offered()
        return self._load_broken + self._hook_broken


def _offered_by(impl: Any) -> list[Any]:
    """Call one plugin's ``opswitch_backends()`` (contained by the caller)."""
    return list(impl.function())


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
