"""Batched generation equals generating each prompt alone, on every available backend:
greedy identical, sampled identical with the same seed (the server's correctness rests on it)."""

from __future__ import annotations

import pytest

import opswitch
from opswitch.core.registry import get_registry
from opswitch.generation import BatchGenerator, generate_batch

PROMPTS = ["It is a truth universally acknowledged", "Hello", "The weather in London is", "Mr. Darcy",
           "She said"]
SETTINGS = [
    {"temperature": 0},
    {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 1},
    {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 2, "max_new_tokens": 5},
    {"temperature": 0, "max_new_tokens": 20, "stop_token": -1},
    {"temperature": 0.7, "seed": 3, "use_kv_cache": False},
]


@pytest.fixture(scope="module", params=get_registry().available())
def lm(request):
    return opswitch.load_model(None, backend=request.param)


def test_generate_batch_equals_one_by_one(lm):
    batch = lm.generate_batch(PROMPTS, SETTINGS, max_new_tokens=12)
    for prompt, settings, got in zip(PROMPTS, SETTINGS, batch):
        alone = lm.generate_ids(prompt, **{"max_new_tokens": 12, **settings})
        assert got.new_ids == alone.new_ids, (lm.backend.name, prompt, settings)
        assert got.stop_reason == alone.stop_reason


def test_a_small_cache_pool_makes_sequences_wait_not_differ(lm):
    ids = [lm.encode(p) for p in PROMPTS]
    configs = [lm.settings(**{"max_new_tokens": 12, **s}) for s in SETTINGS]
    pool = lm.model.cache_pool(2 * lm.model.cache_pool(1).bytes_for(64))  # room for two at a time
    got = generate_batch(lm.model, ids, configs, pool=pool)
    assert [r.new_ids for r in got] == [r.new_ids for r in lm.generate_batch(PROMPTS, SETTINGS,
                                                                              max_new_tokens=12)]
    assert pool.bytes_in_use == 0


def test_joining_and_leaving_mid_batch_changes_no_one(lm):
    """Continuous batching: a sequence added later, or one cancelled, leaves the others' ids alone."""
    configs = [lm.settings(max_new_tokens=10, **s) for s in SETTINGS[:2]]
    generator = BatchGenerator(lm.model, lm.model.cache_pool(1 << 26), lm.n_vocab_allowed)
    first = generator.add(lm.encode(PROMPTS[0]), configs[0])
    leaving = generator.add(lm.encode(PROMPTS[2]), configs[0])
    for _ in range(3):
        generator.step()
    generator.cancel(leaving)
    late = generator.add(lm.encode(PROMPTS[1]), configs[1])
    while generator.running:
        generator.step()
    assert leaving.result.stop_reason == "cancelled" and leaving.cache is not None
    assert first.result.new_ids == lm.generate_ids(PROMPTS[0], max_new_tokens=10, **SETTINGS[0]).new_ids
    assert late.result.new_ids == lm.generate_ids(PROMPTS[1], max_new_tokens=10, **SETTINGS[1]).new_ids
    assert generator.pool.bytes_in_use == 0
