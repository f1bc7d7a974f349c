"""The KV-cache pool keeps its promise about memory, measured on the buffers themselves.

Every buffer the backend allocates is tracked with a weak reference, so "memory
held" is what is really alive (in use or kept spare), not what the pool's own
arithmetic says it is.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from opswitch.core.errors import ModelInputError
from opswitch.core.registry import get_registry
from opswitch.model.config import GPT2Config
from opswitch.model.gpt2 import GPT2
from opswitch.model.kvcache import ROUND, CacheFullError
from opswitch.model.weights import nest_params


class LiveBuffers:
    """The bytes of every buffer ``backend.alloc`` made that is still alive."""

    def __init__(self, backend) -> None:
        self.bytes = 0
        allocate = backend.alloc

        def alloc(shape):
            array = allocate(shape)
            self.bytes += array.nbytes
            weakref.finalize(array, self._freed, array.nbytes)
            return array

        backend.alloc = alloc

    def _freed(self, nbytes: int) -> None:
        self.bytes -= nbytes


@pytest.fixture
def model():
    """A context of several ROUNDs, so caches come in more than one size."""
    config = GPT2Config(vocab_size=61, n_positions=4 * ROUND, n_embd=24, n_layer=2, n_head=3)
    rng = np.random.default_rng(0)
    shapes = config.param_shapes()
    flat = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    return GPT2(config, nest_params(flat, config.n_layer), get_registry().backend("naive"))


@pytest.fixture
def live(model):
    return LiveBuffers(model.backend)


def _real_bytes(model, live, n_tokens: int) -> int:
    """What one cache of ``n_tokens`` really occupies: allocate one and measure it."""
    before = live.bytes
    cache = model.new_cache(n_tokens)
    size = live.bytes - before
    assert size == sum(k.nbytes + v.nbytes for k, v in cache.layers) > 0
    return size


def test_the_budget_counts_every_byte_of_a_cache(model, live):
    one = _real_bytes(model, live, ROUND)
    pool = model.cache_pool(one)
    first = pool.acquire(ROUND)
    with pytest.raises(CacheFullError):  # a pool that counted half would admit a second
        pool.acquire(ROUND)
    first.release()
    with pytest.raises(CacheFullError):
        model.cache_pool(one - 1).acquire(ROUND)


def test_spare_buffers_never_hold_memory_beyond_the_budget(model, live):
    small = _real_bytes(model, live, ROUND)
    budget = 2 * small
    pool = model.cache_pool(budget)
    base = live.bytes  # (nothing of the measurement above is alive any more)
    assert base == 0

    def held() -> int:
        return live.bytes - base

    a, b = pool.acquire(ROUND), pool.acquire(ROUND)
    a.release()
    b.release()
    del a, b
    assert held() <= budget  # two spares of one size: exactly the budget
    c = pool.acquire(2 * ROUND)  # another size: the spares must make room for it
    assert held() <= budget, f"{held()} bytes alive with a budget of {budget}"
    c.release()
    del c
    assert held() <= budget
    d = pool.acquire(ROUND)
    assert held() <= budget
    d.release()
    del d
    assert held() <= budget and pool.bytes_in_use == 0


def test_one_cache_cannot_serve_two_sequences_in_a_step(model):
    cache = model.new_cache(8)
    with pytest.raises(ModelInputError, match="one cache appears twice"):
        model.step([(np.array([1, 2]), cache), (np.array([3]), cache)])
    assert cache.length == 0  # refused before anything was computed
