"""The op table: what a decode step touches, and nothing else.

``OpTable`` resolves every catalogue op of a backend to a plain callable
once, when a model is bound, so the hot loop pays an attribute read per op
(``ops.linear(...)``), never a hook call or a dict lookup.  An op the
backend lacks is filled in with the host reference (moving its arguments
through ``to_host``/``to_device``) and recorded in ``fallbacks``, so a
listing can show it: a fallback is never silent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from opswitch.core.backend import Backend
from opswitch.core.ops import CATALOGUE, OP_NAMES
from opswitch.core.step import LayerStep


def _is_host_passthrough(x: Any) -> bool:
    """Scalars, None and integer index arrays never move between devices."""
    if x is None or isinstance(x, (bool, int, float, str, np.integer, np.floating)):
        return True
    return isinstance(x, np.ndarray) and x.dtype.kind in "iub"


def _tree(fn: Callable[[Any], Any], x: Any) -> Any:
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


def _fallback(backend: Backend, name: str) -> Callable[..., Any]:
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


def _attention_per_sequence(table: OpTable) -> Callable[..., Any]:
    """``attention_batch`` for a backend with single-sequence ``attention`` only:
    split the rows, attend per sequence, join (each through the table's ops)."""

    def run(qkv: Any, n_head: int, step: LayerStep) -> Any:
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
    Each op is a slot named after the catalogue (``table.linear``).
    """

    __slots__ = (*OP_NAMES, "backend", "fallbacks", "per_sequence")

    # one slot per catalogue op, assigned in __init__ (declared so type checkers see them)
    matmul: Callable[..., Any]
    linear: Callable[..., Any]
    add: Callable[..., Any]
    layernorm: Callable[..., Any]
    gelu: Callable[..., Any]
    attention: Callable[..., Any]
    attention_batch: Callable[..., Any]
    embedding: Callable[..., Any]
    take_rows: Callable[..., Any]
    slice_rows: Callable[..., Any]
    concat_rows: Callable[..., Any]
    cross_entropy: Callable[..., Any]

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

    # -- the profiling hook (issue 23, helper E) goes here -----------------


def failing_op(exc: BaseException) -> str | None:
    """The catalogue op in whose implementation ``exc`` was raised, from its traceback."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        name = tb.tb_frame.f_code.co_name
        if name in CATALOGUE or name.removeprefix("fallback_") in CATALOGUE:
            found = name.removeprefix("fallback_")
        tb = tb.tb_next
    return found
