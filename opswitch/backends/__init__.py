"""Built-in backends, each a self-contained plugin module.

The registry imports them by name (``opswitch.core.plugins.BUILTIN_PLUGINS``)
and they register through the same hook a third-party plugin uses.
"""
