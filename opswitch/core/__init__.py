"""The core: op catalogue, Backend contract, weight formats, plugin hooks and registry.

Core imports no other part of the package by statement; everything else
builds on it.  It does name the built-in backends, by module string
(``plugins.BUILTIN_PLUGINS``, as pytest names its built-in plugins), and
loads them through the same hook a third-party plugin uses.

Where each piece lives: ``ops`` (the catalogue and its ``BackendOps``
protocol), ``backend`` (``Backend``, ``Probe``, ``Device``, ``Spec``),
``optable`` (what a bound model calls), ``plugins`` (discovery),
``probing`` (contained probe/prepare, listing rows), ``select`` (the
selection policy, ``auto``), ``registry`` (the process-wide registry).
"""

from opswitch.core.backend import DTYPES, Backend, Device, Probe, Spec
from opswitch.core.errors import BackendError, OpswitchError
from opswitch.core.formats import FORMATS, Stored
from opswitch.core.hookspecs import hookimpl
from opswitch.core.ops import CATALOGUE, OP_NAMES
from opswitch.core.optable import OpTable
from opswitch.core.registry import Registry, get_registry, select_backend, use_registry
from opswitch.core.select import Selection
from opswitch.core.step import CacheLayout, LayerStep, Step

__all__ = [
    "CATALOGUE",
    "DTYPES",
    "FORMATS",
    "OP_NAMES",
    "Backend",
    "BackendError",
    "CacheLayout",
    "Device",
    "LayerStep",
    "OpTable",
    "OpswitchError",
    "Probe",
    "Registry",
    "Selection",
    "Spec",
    "Step",
    "Stored",
    "get_registry",
    "hookimpl",
    "select_backend",
    "use_registry",
]
