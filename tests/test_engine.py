"""The engine's promises, on tiny random models (no tokenizer, no reference stack):
prefix reuse and chunked prefill never change an answer, the pool's budget is never
exceeded, nobody starves, and cancelling frees a cache at once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opswitch.bench.models import random_params
from opswitch.core.registry import get_registry
from opswitch.generation import Engine, GenerationConfig
from opswitch.generation.engine import PREFIX_BLOCK
from opswitch.model.config import GPT2Config
from opswitch.model.gpt2 import GPT2
from opswitch.model.kvcache import ROUND

CONFIG = GPT2Config(vocab_size=61, n_positions=3 * ROUND, n_embd=24, n_layer=2, n_head=3,
                    bos_token_id=0, eos_token_id=60)
GREEDY = GenerationConfig(max_new_tokens=8, temperature=0, stop_token=-1)
SHARED = [int(t) for t in np.random.default_rng(5).integers(1, 60, size=3 * PREFIX_BLOCK)]
PROMPTS = [[*SHARED, 7, 8, 9], [*SHARED, 11], [*SHARED[:40], 3, 4, 5, 6], SHARED]
BACKENDS = [name for name in ("naive", "blas", "cpu", "opencl") if name in get_registry().available()]


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    return GPT2(CONFIG, random_params(CONFIG, seed=3), get_registry().backend(request.param))


def _alone(model, prompt, config=GREEDY):
    """The reference: one request on an engine that neither reuses nor chunks."""
    engine = Engine(model, prefix_cache=False, prefill_chunk=0)
    gen = engine.add(prompt, config)
    while not gen.done:
        engine.step()
    return gen


def _run(engine, prompts, config=GREEDY, together=True):
    gens = []
    for prompt in prompts:
        gens.append(engine.add(prompt, config))
        while not together and engine.has_work:
            engine.step()
    while engine.has_work:
        engine.step()
    return gens


# The rows a reused prefix brings are the float32 values the source's prefill computed, but that
# prefill grouped rows differently into its matrix products (other M, other blocking), so a logit
# may differ by rounding: each is the end of ~2 * n_layer matrix products of depth <= 4 * n_embd
# plus softmax and layer norm sums, a few hundred float32 roundings (2**-24 each, relative), so
# 1e-4 of the largest logit is ten times the worst case of accumulating all of them.
LOGIT_TOLERANCE = 1e-4


@pytest.mark.parametrize("together", [False, True], ids=["one-after-another", "all-at-once"])
def test_prefix_reuse_and_chunked_prefill_change_no_answer(model, together):
    engine = Engine(model, model.cache_pool(1 << 24), prefill_chunk=5, prefix_cache=True)
    gens = _run(engine, PROMPTS, together=together)
    for prompt, gen in zip(PROMPTS, gens):
        alone = _alone(model, prompt)
        assert gen.result.new_ids == alone.result.new_ids, (model.backend.name, len(prompt))
        assert gen.result.stop_reason == alone.result.stop_reason == "length"
    hits = [g.prefix_hit for g in gens]
    assert hits[0] == 0 and all(h % PREFIX_BLOCK == 0 for h in hits)
    assert engine.stats.prefix_hit_tokens == sum(hits) >= 3 * 2 * PREFIX_BLOCK  # every later one reused
    assert hits[3] == len(SHARED) - PREFIX_BLOCK  # the last prompt token is always computed
    assert engine.pool.bytes_in_use == 0


def test_reused_rows_give_the_same_logits_within_float32_rounding(model):
    """A one-token step after the prompt: its logits, from reused rows, against computed ones."""
    config = GREEDY.replace(max_new_tokens=1)
    engine = Engine(model, model.cache_pool(1 << 24), prefix_cache=True)
    _first, second = _run(engine, [PROMPTS[0], PROMPTS[1]], config, together=False)
    assert second.prefix_hit > 0
    fresh = _alone(model, PROMPTS[1], config)
    scale = float(np.abs(fresh.logits).max())
    np.testing.assert_allclose(second.logits, fresh.logits, rtol=0, atol=LOGIT_TOLERANCE * scale)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode():
    model = GPT2(CONFIG, random_params(CONFIG, seed=3), get_registry().backend("naive"))
    engine = Engine(model, model.cache_pool(1 << 24), prefill_chunk=16, prefix_cache=False)
    decoding = engine.add([5, 6, 7], GREEDY.replace(max_new_tokens=40))
    engine.step()
    long = engine.add(SHARED + SHARED[:20], GREEDY)  # 68 tokens: five steps of at most 16
    tokens_meanwhile = 0
    while long.steps == 0:
        engine.step()
        tokens_meanwhile += 1
        assert long.cache.length <= 16 * tokens_meanwhile
    assert tokens_meanwhile == 5 and decoding.steps == 1 + 5  # the decode never paused
    assert long.result.new_ids[:1] == _alone(model, long.prompt_ids).result.new_ids[:1]


def test_cancelling_frees_the_cache_at_once_and_its_rows_stay_reusable():
    model = GPT2(CONFIG, random_params(CONFIG, seed=3), get_registry().backend("naive"))
    pool = model.cache_pool(1 << 24)
    engine = Engine(model, pool)
    gen = engine.add(SHARED, GREEDY.replace(max_new_tokens=50))
    engine.step()
    assert pool.bytes_in_use > 0
    engine.cancel(gen)
    assert pool.bytes_in_use == 0 and gen.result.stop_reason == "cancelled" and not engine.has_work
    again = engine.add([*SHARED, 1], GREEDY)
    engine.step()
    assert again.prefix_hit == len(SHARED)  # the cancelled one's prompt rows, from the spare


# -- the budget, under random traffic ---------------------------------------------------------------
REQUEST = st.tuples(st.integers(1, 2 * ROUND), st.integers(0, 2 * ROUND), st.integers(0, 5),
                    st.booleans(), st.integers(0, 3))  # prompt length, new tokens, arrival, cancel?, family


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(REQUEST, min_size=1, max_size=8), budget_caches=st.integers(1, 4),
       chunk=st.sampled_from([0, 7, 64]), max_batch=st.integers(1, 4))
def test_the_pool_budget_is_never_exceeded_and_nobody_starves(requests, budget_caches, chunk, max_batch):
    model = _FUZZ_MODEL
    one = model.cache_pool(1).bytes_for(ROUND)
    pool = model.cache_pool(budget_caches * one + one // 2)
    engine = Engine(model, pool, max_batch=max_batch, prefill_chunk=chunk)
    families = [[int(t) for t in np.random.default_rng(f).integers(1, 60, size=3 * ROUND)] for f in range(4)]
    pending = sorted(enumerate(requests), key=lambda r: r[1][2])
    gens, step = {}, 0
    while pending or engine.has_work:
        while pending and pending[0][1][2] <= step:
            i, (n_prompt, n_new, _, _, family) = pending.pop(0)
            prompt = families[family][:n_prompt]
            n_new = min(n_new, CONFIG.n_positions - n_prompt)
            gens[i] = engine.add(prompt, GREEDY.replace(max_new_tokens=n_new))
        engine.step()
        step += 1
        assert pool.bytes_in_use + pool.spare_bytes <= pool.budget_bytes
        assert len(engine.running) <= max_batch
        for i, gen in gens.items():
            if requests[i][3] and gen.state == "running" and gen.steps >= 1:
                engine.cancel(gen)
        assert step < 2000, "a request starved"
    for i, gen in gens.items():
        n_prompt, n_new = requests[i][:2]
        fits = pool.bytes_for(min(CONFIG.n_positions, n_prompt + max(n_new, 1))) <= pool.budget_bytes
        assert gen.done
        assert (gen.result.stop_reason == "error") == (not fits and n_new > 0), gen.error
        if gen.result.stop_reason == "error":
            assert "KV-cache budget" in gen.error
    assert pool.bytes_in_use == 0


_FUZZ_MODEL = GPT2(CONFIG, random_params(CONFIG, seed=4), get_registry().backend("naive"))
