"""Backend conformance suite: every op of a backend against the float64 reference.

Run it on any registered backend, ours or a plugin's::

    pytest --pyargs opswitch.testing --opswitch-backend=NAME

``--opswitch-backend`` takes ``name`` or ``name:dtype`` and may be repeated or
comma-separated; without it every available backend is checked.
"""
