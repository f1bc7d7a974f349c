"""The KV cache, owned by the model layer and shared by every backend.

A sequence's cache is, per layer, a key and a value buffer of shape
``[n_head, capacity, head_dim]`` (``core.step.CacheLayout``) allocated by
the backend (``alloc``); the attention op writes new rows at the sequence's
length and reads up to it.
Nothing is copied or reallocated as a sequence grows: the capacity is fixed
when the cache is made (the prompt plus the tokens to generate, at most the
model's context).

``CachePool`` hands caches to many sequences at once (the server, batch
jobs) within a fixed memory budget, and reuses freed buffers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from opswitch.core.backend import Backend
from opswitch.core.errors import OpswitchError
from opswitch.core.formats import KV_DTYPES
from opswitch.core.step import CacheLayout

ROUND = 64  # capacities are rounded up to this many positions, so freed caches fit new requests


class CacheFullError(OpswitchError):
    """The cache pool's memory budget cannot hold another sequence right now."""


@dataclass
class KVCache:
    """One sequence's keys and values: ``layers[i] = (k, v)``, each [n_head, capacity, head_dim]."""

    layers: list[tuple[Any, Any]]
    capacity: int
    length: int = 0
    nbytes: int = 0
    _pool: CachePool | None = field(default=None, repr=False)

    @property
    def free(self) -> int:
        """Positions still available."""
        return self.capacity - self.length

    def reset(self) -> None:
        """Forget the contents (the buffers are kept and overwritten)."""
        self.length = 0

    def release(self) -> None:
        """Give the buffers back to the pool they came from (no-op otherwise)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.release(self)


def cache_bytes(n_layer: int, n_embd: int, capacity: int, itemsize: int) -> int:
    """Memory of one sequence's cache: keys and values for every layer."""
    return 2 * n_layer * n_embd * capacity * itemsize


def cache_layout(
    backend: Backend, n_layer: int, n_head: int, head_dim: int, capacity: int, fmt: str = "f32"
) -> CacheLayout:
    """The core's layout of a cache in KV format ``fmt``: f32 holds the compute dtype
    (float64 on naive:float64), another format its own (f16: 2 bytes a value)."""
    dtype = str(backend.dtype) if fmt == "f32" else KV_DTYPES[fmt]
    return CacheLayout(n_layer, n_head, head_dim, capacity, dtype)


def new_cache(
    backend: Backend, n_layer: int, n_head: int, head_dim: int, capacity: int, fmt: str = "f32"
) -> KVCache:
    """A cache of ``capacity`` positions in KV format ``fmt``, allocated on ``backend``."""
    layout = cache_layout(backend, n_layer, n_head, head_dim, capacity, fmt)
    layers = [(backend.alloc_kv(layout.shape, fmt), backend.alloc_kv(layout.shape, fmt))
              for _ in range(n_layer)]
    return KVCache(layers, capacity, nbytes=layout.nbytes)


class CachePool:
    """Per-sequence caches within ``budget_bytes``; released ones are reused.

    Thread-safe: a server's request threads acquire, its model thread uses.
    """

    def __init__(
        self, backend: Backend, n_layer: int, n_head: int, head_dim: int, n_ctx: int, budget_bytes: int,
        fmt: str = "f32",
    ) -> None:
        self.backend, self.n_ctx, self.fmt = backend, n_ctx, fmt
        self._shape = (n_layer, n_head, head_dim)
        self.budget_bytes = budget_bytes
        self.bytes_in_use = 0
        self._free: dict[int, list[KVCache]] = {}
        self._lock = threading.Lock()

    def capacity_for(self, n_tokens: int) -> int:
        """The capacity a sequence of ``n_tokens`` gets: rounded up, at most the context."""
        return min(self.n_ctx, -(-max(n_tokens, 1) // ROUND) * ROUND)

    def bytes_for(self, n_tokens: int) -> int:
        return cache_layout(self.backend, *self._shape, self.capacity_for(n_tokens), self.fmt).nbytes

    def can_fit(self, n_tokens: int) -> bool:
        return self.bytes_in_use + self.bytes_for(n_tokens) <= self.budget_bytes

    def acquire(self, n_tokens: int) -> KVCache:
        """A cache with room for ``n_tokens`` positions, or CacheFullError."""
        capacity = self.capacity_for(n_tokens)
        with self._lock:
            need = self.bytes_for(n_tokens)
            if self.bytes_in_use + need > self.budget_bytes:
                raise CacheFullError(
                    f"the KV-cache budget of {self.budget_bytes / 2**20:.0f} MiB is in use"
                    f" ({self.bytes_in_use / 2**20:.0f} MiB); a sequence of {n_tokens} tokens needs"
                    f" {need / 2**20:.1f} MiB more"
                )
            self.bytes_in_use += need
            spare = self._free.get(capacity)
            cache = spare.pop() if spare else None
            if cache is None:  # a new buffer: spares of other sizes make room for it first,
                # so what is alive (in use and spare) never exceeds the budget
                self._trim_spares()
        if cache is None:
            try:
                cache = new_cache(self.backend, *self._shape, capacity, self.fmt)
            except BaseException:
                with self._lock:
                    self.bytes_in_use -= need
                raise
        cache.reset()
        cache._pool = self
        return cache

    def release(self, cache: KVCache) -> None:
        with self._lock:
            self.bytes_in_use -= cache.nbytes
            # (in use plus spare is unchanged: the budget holds, the buffers wait for reuse)
            self._free.setdefault(cache.capacity, []).append(cache)

    def _trim_spares(self) -> None:
        """Keep spare buffers only while they fit the budget beside those in use (lock held)."""
        spare = sum(c.nbytes for caches in self._free.values() for c in caches)
        while spare + self.bytes_in_use > self.budget_bytes and any(self._free.values()):
            largest = max((c for cs in self._free.values() for c in cs), key=lambda c: c.nbytes)
            self._free[largest.capacity].remove(largest)
            spare -= largest.nbytes
