"""The KV cache, owned by the model layer and shared by every backend.

A sequence's cache is, per layer, a key and a value buffer of shape
``[n_head, capacity, head_dim]`` (``core.step.CacheLayout``) allocated by
the backend (``alloc``); the attention op writes new rows at the sequence's
length and reads up to it.
Nothing is copied or reallocated as a sequence grows: the capacity is fixed
when the cache is made (the prompt plus the tokens to generate, at most the
model's context).

``CachePool`` hands caches to many sequences at once (the server, batch
jobs) within a fixed memory budget, and reuses freed buffers.  A freed
buffer is kept (while the budget allows) with the token ids whose keys and
values it holds, so a later prompt that starts with them can reuse those
rows (prefix reuse; the engine decides, ``copy_prefix`` copies).  Spares are
evicted least-recently-released first.
"""

from __future__ import annotations

import contextlib
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


@dataclass(eq=False)
class KVCache:
    """One sequence's keys and values: ``layers[i] = (k, v)``, each [n_head, capacity, head_dim]."""

    layers: list[tuple[Any, Any]]
    capacity: int
    length: int = 0
    nbytes: int = 0
    tokens: tuple[int, ...] = ()  # a spare's: the ids whose rows it holds (prefix reuse)
    _pool: CachePool | None = field(default=None, repr=False)

    @property
    def free(self) -> int:
        """Positions still available."""
        return self.capacity - self.length

    def reset(self) -> None:
        """Forget the contents (the buffers are kept and overwritten)."""
        self.length = 0
        self.tokens = ()

    def release(self) -> None:
        """Give the buffers back to the pool they came from (no-op otherwise)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.release(self)


def sequence_positions(prompt_len: int, max_new_tokens: int, n_ctx: int) -> int:
    """Positions a request's cache must hold: the prompt and every new token, at most the context.
    The one place this is computed (the engine, the server's checks and batch jobs ask it)."""
    return min(n_ctx, prompt_len + max(max_new_tokens, 1))


def rounded_capacity(n_tokens: int, n_ctx: int) -> int:
    """The capacity a pooled cache of ``n_tokens`` gets: rounded up to ROUND, at most the context."""
    return min(n_ctx, -(-max(n_tokens, 1) // ROUND) * ROUND)


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


def copy_prefix(backend: Backend, dst: KVCache, src: KVCache, n: int) -> None:
    """Make ``dst`` hold the first ``n`` positions of ``src`` (and nothing after them)."""
    if not 0 < n <= min(src.length, dst.capacity):
        raise ValueError(f"cannot copy {n} positions from a cache of {src.length} into one of {dst.capacity}")
    with contextlib.nullcontext() if backend.thread_safe else backend.lock:
        for (dk, dv), (sk, sv) in zip(dst.layers, src.layers):
            backend.copy_rows(dk, sk, n)
            backend.copy_rows(dv, sv, n)
    dst.length = n


class CachePool:
    """Per-sequence caches within ``budget_bytes``; released ones are kept as spares and reused.

    What is alive, in use plus spare, never exceeds the budget.  Thread-safe: a
    server's request threads may ask it questions while its model thread acquires.
    """

    def __init__(
        self, backend: Backend, n_layer: int, n_head: int, head_dim: int, n_ctx: int, budget_bytes: int,
        fmt: str = "f32",
    ) -> None:
        self.backend, self.n_ctx, self.fmt = backend, n_ctx, fmt
        self._shape = (n_layer, n_head, head_dim)
        self.budget_bytes = budget_bytes
        self.bytes_in_use = 0
        self.evictions = 0  # spares dropped to make room
        self._spares: list[KVCache] = []  # least recently released first
        self._lock = threading.Lock()

    def capacity_for(self, n_tokens: int) -> int:
        """The capacity a sequence of ``n_tokens`` gets: rounded up, at most the context."""
        return rounded_capacity(n_tokens, self.n_ctx)

    def bytes_for(self, n_tokens: int) -> int:
        return cache_layout(self.backend, *self._shape, self.capacity_for(n_tokens), self.fmt).nbytes

    @property
    def spare_bytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._spares)

    def spares(self) -> list[KVCache]:
        """The spare caches, least recently released first (for prefix lookups)."""
        with self._lock:
            return list(self._spares)

    def can_fit(self, n_tokens: int) -> bool:
        return self.bytes_in_use + self.bytes_for(n_tokens) <= self.budget_bytes

    def acquire(self, n_tokens: int, keep: KVCache | None = None) -> KVCache:
        """A cache with room for ``n_tokens`` positions, or CacheFullError.

        ``keep`` (a spare about to be copied from) is evicted last, only if nothing
        else makes room."""
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
            same = [c for c in self._spares if c.capacity == capacity and c is not keep]
            cache = same[0] if same else None  # the least recently released of its size
            if cache is not None:
                self._spares.remove(cache)
            else:  # a new buffer: spares make room for it first, so what is alive stays in the budget
                self._trim_spares(keep)
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

    def take(self, spare: KVCache) -> KVCache | None:
        """Put a spare back in use as it is (its rows kept), or None if it was evicted meanwhile.
        In use plus spare is unchanged, so the budget holds."""
        with self._lock:
            if spare not in self._spares:
                return None
            self._spares.remove(spare)
            self.bytes_in_use += spare.nbytes
        spare._pool = self
        return spare

    def is_spare(self, cache: KVCache) -> bool:
        with self._lock:
            return cache in self._spares

    def release(self, cache: KVCache) -> None:
        with self._lock:
            self.bytes_in_use -= cache.nbytes
            # (in use plus spare is unchanged: the budget holds, the buffers wait for reuse)
            self._spares.append(cache)

    def _trim_spares(self, keep: KVCache | None = None) -> None:
        """Keep spare buffers only while they fit the budget beside those in use (lock held);
        the least recently released go first, ``keep`` last."""
        spare = sum(c.nbytes for c in self._spares)
        order = [c for c in self._spares if c is not keep] + [c for c in self._spares if c is keep]
        for victim in order:
            if spare + self.bytes_in_use <= self.budget_bytes:
                break
            self._spares.remove(victim)
            spare -= victim.nbytes
            self.evictions += 1
