"""The core: op catalogue, Backend contract, plugin hooks and registry.

Nothing here imports the rest of the package; everything else builds on it.
"""

from opswitch.core.backend import Backend, Probe
from opswitch.core.errors import BackendError, OpswitchError, PluginError
from opswitch.core.hookspecs import hookimpl
from opswitch.core.ops import CATALOGUE, OP_NAMES
from opswitch.core.registry import OpTable, Registry, get_registry, select_backend

__all__ = [
    "CATALOGUE",
    "OP_NAMES",
    "Backend",
    "BackendError",
    "OpTable",
    "OpswitchError",
    "PluginError",
    "Probe",
    "Registry",
    "get_registry",
    "hookimpl",
    "select_backend",
]
