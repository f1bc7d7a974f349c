"""The plugin hooks: the whole interface between opswitch and a backend plugin.

A plugin is a module (registered through the ``opswitch`` entry-point group,
or built in) that implements ``opswitch_backends`` with ``@hookimpl``::

    from opswitch.core import hookimpl

    @hookimpl
    def opswitch_backends():
        return [MyBackend]
"""

from __future__ import annotations

import pluggy

PROJECT = "opswitch"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def opswitch_backends() -> list[type]:  # type: ignore[empty-body]  # a spec: plugins implement it
    """Return the Backend subclasses this plugin provides."""
