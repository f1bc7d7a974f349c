"""The core: op catalogue, Backend contract, weight formats, plugin hooks and registry.

Nothing here imports the rest of the package; everything else builds on it.
"""

from opswitch.core.backend import DTYPES, Backend, Device, Probe
from opswitch.core.errors import BackendError, OpswitchError, PluginError
from opswitch.core.formats import FORMATS, Stored
from opswitch.core.hookspecs import hookimpl
from opswitch.core.ops import CATALOGUE, OP_NAMES
from opswitch.core.registry import OpTable, Registry, Spec, get_registry, select_backend
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
    "PluginError",
    "Probe",
    "Registry",
    "Spec",
    "Step",
    "Stored",
    "get_registry",
    "hookimpl",
    "select_backend",
]
