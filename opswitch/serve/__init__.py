"""The OpenAI-compatible server: a thin HTTP layer over the batched generation loop.

``app`` (routes, errors) and ``protocol`` (OpenAI's request and response
shapes) run on the event loop; ``scheduler`` runs the model in one thread
with continuous batching; ``metrics`` renders Prometheus text.  Starlette,
uvicorn and sse-starlette come with the ``serve`` extra:
``pip install 'opswitch[serve]'``.
"""

from __future__ import annotations

SERVE_DEPS = ("starlette", "uvicorn", "sse_starlette")


def missing_deps() -> list[str]:
    """The serve extra's packages that are not installed."""
    import importlib.util

    return [name for name in SERVE_DEPS if importlib.util.find_spec(name) is None]
