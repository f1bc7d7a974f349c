"""The contract between the model's caches and a backend's attention: the cache
layout and the step descriptor (design rule 6).

The model layer owns the KV caches; a backend only allocates their buffers
and reads and writes them inside ``attention_batch``.  What it may rely on
is written down here, once:

- ``CacheLayout``: one sequence's cache is, per layer, a key and a value
  buffer, each ``[n_head, capacity, head_dim]`` (head-major, so one head's
  keys are contiguous), allocated by the backend in ``dtype``.
- ``Step``: one batched forward step, validated once when it is made: each
  sequence's ``start`` (positions already cached), ``count`` (new rows) and
  cache ``capacity``, the row ``bounds`` derived from the counts (the one
  place the per-sequence row walk is done), and the rows whose logits are
  wanted.  ``begin_step``/``end_step`` of a backend receive it.
- ``LayerStep``: what ``attention_batch`` receives for one layer: the step
  and that layer's ``(k, v)`` of each sequence, in the step's order.

Only host integers and the backend's own buffers are in here, so a step
crosses no device boundary and ``backends`` never needs ``model``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from opswitch.core.errors import ModelInputError

KV = tuple[Any, Any]  # one layer's (k, v) of one sequence: backend arrays [n_head, capacity, head_dim]


@dataclass(frozen=True)
class CacheLayout:
    """One sequence's KV cache as a backend allocates it: ``n_layer`` pairs of buffers."""

    n_layer: int
    n_head: int
    head_dim: int
    capacity: int
    dtype: str = "float32"  # what the buffers hold (a backend may keep a narrower cache than it computes in)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of each key and each value buffer."""
        return (self.n_head, self.capacity, self.head_dim)

    @property
    def nbytes(self) -> int:
        """Memory of the whole cache: keys and values of every layer."""
        return 2 * self.n_layer * self.n_head * self.capacity * self.head_dim * np.dtype(self.dtype).itemsize


def _ints(values: Iterable[Any], what: str) -> tuple[int, ...]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ModelInputError(f"a step's {what} must be integers, got {type(v).__name__} {v!r}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True)
class Step:
    """One batched forward step: which rows belong to which sequence, and where
    each sequence's new rows go in its cache.

    Rows of sequence ``i`` are ``bounds[i] = (first, after last)`` of the
    step's ``n_rows`` rows, in order; they sit at positions ``starts[i] ..
    starts[i] + counts[i]`` of a cache of ``capacities[i]`` positions.
    ``logit_rows``: the rows whose logits the caller wants (None: all).
    """

    starts: tuple[int, ...]
    counts: tuple[int, ...]
    capacities: tuple[int, ...]
    logit_rows: tuple[int, ...] | None = None
    bounds: tuple[tuple[int, int], ...] = field(init=False, repr=False)
    n_rows: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        starts, counts = _ints(self.starts, "starts"), _ints(self.counts, "counts")
        capacities = _ints(self.capacities, "capacities")
        if not counts:
            raise ModelInputError("a forward step needs at least one sequence")
        if not len(starts) == len(counts) == len(capacities):
            raise ModelInputError(
                f"a step's starts, counts and capacities differ in length ({len(starts)}, {len(counts)},"
                f" {len(capacities)})"
            )
        bounds, row = [], 0
        for i, (start, count, capacity) in enumerate(zip(starts, counts, capacities)):
            if count < 1 or start < 0 or start + count > capacity:
                raise ModelInputError(
                    f"sequence {i} of the step: {count} new rows at position {start} do not fit its cache"
                    f" of {capacity} positions"
                )
            bounds.append((row, row + count))
            row += count
        rows = None if self.logit_rows is None else _ints(self.logit_rows, "logit rows")
        if rows is not None and any(not 0 <= r < row for r in rows):
            raise ModelInputError(f"a step's logit rows {rows} are not all among its {row} rows")
        for name, value in (("starts", starts), ("counts", counts), ("capacities", capacities),
                            ("logit_rows", rows), ("bounds", tuple(bounds)), ("n_rows", row)):
            object.__setattr__(self, name, value)  # fmt: skip

    @classmethod
    def last_rows(cls, starts: Sequence[int], counts: Sequence[int], capacities: Sequence[int]) -> Step:
        """A step that wants each sequence's last row's logits (a decode step, a prompt's end)."""
        ends = np.cumsum(np.asarray(counts, dtype=np.int64)) - 1
        return cls(tuple(starts), tuple(counts), tuple(capacities), tuple(int(r) for r in ends))

    @property
    def n_seq(self) -> int:
        return len(self.counts)

    def positions(self) -> np.ndarray:
        """int64 [n_rows]: each row's position in its sequence (what ``wpe`` is indexed by)."""
        if self.n_seq == 1:
            return np.arange(self.starts[0], self.starts[0] + self.counts[0], dtype=np.int64)
        return np.concatenate([np.arange(s, s + c, dtype=np.int64) for s, c in zip(self.starts, self.counts)])

    def layers(self, kv: Sequence[Sequence[KV]]) -> tuple[LayerStep, ...]:
        """Each layer's ``LayerStep``, from ``kv[sequence][layer] = (k, v)`` (a cache's
        ``layers``); every sequence needs the same number of layers and its own buffers."""
        if len(kv) != self.n_seq:
            raise ModelInputError(f"a step of {self.n_seq} sequences was given {len(kv)} caches")
        n_layer = {len(layers) for layers in kv}
        if len(n_layer) != 1:
            raise ModelInputError(f"the caches in a step have different numbers of layers: {sorted(n_layer)}")
        if n_layer != {0} and len({id(layers[0][0]) for layers in kv}) < self.n_seq:
            raise ModelInputError("one cache appears twice in a step: each sequence needs its own")
        by_layer = zip(*kv)
        return tuple(LayerStep(self, tuple(caches), i) for i, caches in enumerate(by_layer))


@dataclass(frozen=True)
class LayerStep:
    """What ``attention_batch`` receives: the ``step`` and one ``layer``'s ``caches``,
    ``(k, v)`` per sequence in the step's order.  Built by ``Step.layers`` (or by
    ``with_caches``), which is why it checks nothing itself."""

    step: Step
    caches: tuple[KV, ...]
    layer: int = 0

    @property
    def starts(self) -> tuple[int, ...]:
        return self.step.starts

    @property
    def counts(self) -> tuple[int, ...]:
        return self.step.counts

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        return self.step.bounds

    @property
    def n_rows(self) -> int:
        return self.step.n_rows

    def with_caches(self, caches: Sequence[KV]) -> LayerStep:
        """The same step over other buffers (host copies, for a fallback or a test)."""
        return LayerStep(self.step, tuple(tuple(kv) for kv in caches), self.layer)


def attention_step(caches: Sequence[KV], starts: Sequence[int], counts: Sequence[int]) -> LayerStep:
    """A one-layer step over ``caches`` (capacities read from the buffers' shapes), for
    calling ``attention_batch`` by hand: tests, benchmarks, a plugin's own checks."""
    capacities = [int(k.shape[1]) for k, _ in caches]
    step = Step(tuple(starts), tuple(counts), tuple(capacities))
    return step.layers([[kv] for kv in caches])[0]
