"""The step contract (``core.step``): what a backend's ``attention_batch`` is given,
and the ``begin_step``/``end_step`` brackets around each forward pass.

A real backend (naive, float64) records what the model hands it for ragged
batches with awkward shapes: one new row and many, sequences starting at 0
and filling their cache to the last position.
"""

from __future__ import annotations

import numpy as np
import pytest

from opswitch.backends.naive import NaiveBackend
from opswitch.core import Backend, BackendError, CacheLayout, LayerStep, OpTable, Step, ops
from opswitch.core.errors import ModelInputError
from opswitch.core.step import attention_step
from opswitch.model.gpt2 import GPT2


class RecordingBackend(NaiveBackend):
    """The naive backend, noting every step boundary and every attention_batch call."""

    fail_attention = False

    def __init__(self, dtype: str = "float64", device: str | None = None) -> None:
        super().__init__(dtype, device)
        self.events: list = []

    def begin_step(self, step):
        self.events.append(("begin", step))

    def end_step(self):
        self.events.append(("end",))

    def attention_batch(self, qkv, n_head, step):
        self.events.append(("attention", qkv.shape, step))
        if self.fail_attention:
            raise RuntimeError("a kernel failed")
        return super().attention_batch(qkv, n_head, step)


@pytest.fixture
def model(tiny_config, tiny_params):
    return GPT2(tiny_config, tiny_params, RecordingBackend())


def test_a_ragged_step_reaches_attention_well_formed(model, tiny_config):
    """A prompt from 0, a decode into a cache's last position, a chunk that ends exactly
    at its capacity: one ``begin_step`` with the step, each layer's attention in order
    with that same step and that layer's buffers of each cache, then one ``end_step``."""
    rng = np.random.default_rng(0)
    capacities, past_lengths, counts = [16, 9, 12], [0, 8, 5], [7, 1, 7]
    past = [rng.integers(0, tiny_config.vocab_size, n) for n in past_lengths]
    new = [rng.integers(0, tiny_config.vocab_size, n) for n in counts]
    caches = [model.new_cache(n) for n in capacities]
    for ids, cache in zip(past, caches):
        if ids.size:
            model.step([(ids, cache)])
    model.backend.events.clear()
    logits = model.step(list(zip(new, caches)))

    events = model.backend.events
    assert [e[0] for e in events] == ["begin", *["attention"] * tiny_config.n_layer, "end"]
    step = events[0][1]
    assert isinstance(step, Step)
    assert step.starts == (0, 8, 5) and step.counts == (7, 1, 7) and step.capacities == (16, 9, 12)
    assert step.bounds == ((0, 7), (7, 8), (8, 15)) and step.n_rows == 15
    assert step.logit_rows == (6, 7, 14)  # each sequence's last row
    np.testing.assert_array_equal(step.positions(), [*range(7), 8, *range(5, 12)])
    for layer, (_, qkv_shape, got) in enumerate(events[1:-1]):
        assert isinstance(got, LayerStep) and got.step is step and got.layer == layer
        assert qkv_shape == (15, 3 * tiny_config.n_embd)
        assert len(got.caches) == 3
        for (k, v), cache in zip(got.caches, caches):
            assert k is cache.layers[layer][0] and v is cache.layers[layer][1]
    assert [c.length for c in caches] == [7, 9, 12]
    # each sequence's logits are what it gets alone: the rows never mix.  float64, logits
    # ~ 10, sums of <= 96 terms in another blocking: far below 1e-10
    for i in range(3):
        alone = model.new_cache(capacities[i])
        if past[i].size:
            model.step([(past[i], alone)])
        np.testing.assert_allclose(logits[i], model.step([(new[i], alone)])[0], rtol=0, atol=1e-10)


def test_end_step_follows_a_failing_op(tiny_config, tiny_params):
    """A backend's error mid-step is reported as the backend's, and the step still ends
    (a graph recorder is never left capturing)."""
    backend = RecordingBackend()
    backend.fail_attention = True
    model = GPT2(tiny_config, tiny_params, backend)
    with pytest.raises(BackendError, match="failed in op 'attention_batch'"):
        model.step([([1, 2, 3], model.new_cache(8))])
    assert [e[0] for e in backend.events] == ["begin", "attention", "end"]


def test_nll_is_one_step_of_all_rows(model):
    model.backend.events.clear()
    model.nll([1, 2, 3, 4, 5])
    begin = model.backend.events[0]
    assert begin[0] == "begin" and begin[1].logit_rows is None and begin[1].counts == (5,)
    assert model.backend.events[-1] == ("end",)


def test_a_step_derives_its_rows_once():
    step = Step.last_rows((0, 62, 5), (3, 2, 1), (8, 64, 6))
    assert step.bounds == ((0, 3), (3, 5), (5, 6)) and step.n_rows == 6 and step.n_seq == 3
    assert step.logit_rows == (2, 4, 5)
    np.testing.assert_array_equal(step.positions(), [0, 1, 2, 62, 63, 5])
    assert Step((np.int64(2),), (np.int32(1),), (3,)).starts == (2,)  # numpy integers are integers
    k = np.zeros((1, 4, 2))
    layers = step.layers([[(k, k)], [(k.copy(), k)], [(k.copy(), k)]])
    assert len(layers) == 1 and layers[0].bounds == step.bounds and layers[0].starts == step.starts


@pytest.mark.parametrize(
    "starts, counts, capacities, rows, message",
    [
        ((), (), (), None, "at least one sequence"),
        ((0,), (0,), (8,), None, "0 new rows at position 0 do not fit"),
        ((-1,), (1,), (8,), None, "at position -1"),
        ((8,), (1,), (8,), None, "1 new rows at position 8 do not fit its cache of 8"),
        ((0, 1), (1,), (8, 8), None, "differ in length"),
        ((0.0,), (1,), (8,), None, "must be integers"),
        ((0,), (True,), (8,), None, "must be integers"),
        ((0,), (2,), (8,), (2,), "logit rows (2,) are not all among its 2 rows"),
    ],
)
def test_a_malformed_step_is_refused_in_one_line(starts, counts, capacities, rows, message):
    with pytest.raises(ModelInputError) as info:
        Step(starts, counts, capacities, rows)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_step_refuses_caches_it_cannot_attend():
    step = Step((0, 0), (1, 1), (4, 4))
    k = np.zeros((1, 4, 2))
    with pytest.raises(ModelInputError, match="one cache appears twice"):
        step.layers([[(k, k)], [(k, k)]])
    with pytest.raises(ModelInputError, match="different numbers of layers"):
        step.layers([[(k, k)], [(k.copy(), k), (k.copy(), k)]])
    with pytest.raises(ModelInputError, match="2 sequences was given 1 caches"):
        step.layers([[(k, k)]])


def test_the_cache_layout_is_what_a_model_cache_allocates(model, tiny_config):
    c = tiny_config
    layout = CacheLayout(c.n_layer, c.n_head, c.head_dim, 10, "float64")
    cache = model.new_cache(10)
    assert all(k.shape == v.shape == layout.shape for k, v in cache.layers)
    assert len(cache.layers) == layout.n_layer and cache.nbytes == layout.nbytes
    assert CacheLayout(2, 3, 8, 10, "float16").nbytes == 2 * 2 * 3 * 10 * 8 * 2


class AttentionOnly(Backend):
    """Single-sequence ``attention`` and nothing else: batches go per sequence, the rest falls back."""

    name = "attention-only"
    dtypes = ("float64",)
    attention = staticmethod(ops.attention)


class NoAttention(Backend):
    """Neither attention op: the step's caches go to the host reference and are stored back."""

    name = "no-attention"
    dtypes = ("float64",)


@pytest.mark.parametrize("backend_class", [AttentionOnly, NoAttention])
def test_a_step_reaches_attention_through_the_op_table_however_it_is_provided(backend_class):
    """Per sequence through ``attention`` (the rows split at the step's bounds), or on the
    host with the caches copied back: both are the reference's batch, caches included."""
    rng = np.random.default_rng(2)
    n_head, d, starts, counts, capacities = 2, 4, (0, 5, 2), (3, 1, 6), (3, 6, 9)
    host = [(rng.standard_normal((n_head, c, d)), rng.standard_normal((n_head, c, d))) for c in capacities]
    qkv = rng.standard_normal((sum(counts), 3 * n_head * d))
    want_caches = [(k.copy(), v.copy()) for k, v in host]
    want = ops.attention_batch(qkv, n_head, attention_step(want_caches, starts, counts))
    backend = backend_class("float64")
    table = OpTable(backend)
    assert table.per_sequence == (backend_class is AttentionOnly)
    caches = [(backend.to_device(k), backend.to_device(v)) for k, v in host]
    got = table.attention_batch(backend.to_device(qkv), n_head, attention_step(caches, starts, counts))
    np.testing.assert_array_equal(backend.to_host(got), want)
    for (k, v), (wk, wv) in zip(caches, want_caches):
        np.testing.assert_array_equal(backend.to_host(k), wk)
        np.testing.assert_array_equal(backend.to_host(v), wv)
