"""Sampling and the generation loop on a tiny random model (no reference stack)."""

from __future__ import annotations

import string

import numpy as np
import pytest

from opswitch.api import LanguageModel
from opswitch.core.errors import GenerationError, ModelInputError
from opswitch.core.registry import get_registry
from opswitch.generation import GenerationConfig, generate_ids, sample_next, stream_ids
from opswitch.model.gpt2 import GPT2
from opswitch.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def model(tiny_config, tiny_params) -> GPT2:
    return GPT2(tiny_config, tiny_params, get_registry().backend("blas"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 1.5}, "top_p must be between 0 and 1"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"max_new_tokens": -5}, "max_new_tokens must be an integer >= 0"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"stop_token": -2}, "stop_token must be an integer >= -1"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_settings_are_refused(changes, message):
    with pytest.raises(GenerationError, match=message):
        GenerationConfig(**changes)


def test_defaults_follow_the_seed_cli():
    c = GenerationConfig()
    assert (c.max_new_tokens, c.temperature, c.top_k, c.top_p) == (100, 0.8, 40, 0.9)
    assert c.use_kv_cache and c.stop_token == "eos"


LOGITS = np.log(np.array([0.05, 0.4, 0.3, 0.15, 0.1]))


def _draws(config, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return np.bincount([sample_next(LOGITS, config, rng) for _ in range(n)], minlength=5) / n


def test_greedy_is_argmax():
    assert sample_next(LOGITS, GenerationConfig(temperature=0), np.random.default_rng()) == 1


def test_plain_sampling_follows_the_softmax():
    freq = _draws(GenerationConfig(temperature=1.0, top_k=0, top_p=0))
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)  # 4000 draws: σ ≤ 0.008


def test_top_k_keeps_only_the_k_best():
    freq = _draws(GenerationConfig(temperature=1.0, top_k=2, top_p=0))
    assert freq[[0, 3, 4]].sum() == 0
    np.testing.assert_allclose(freq[[1, 2]], [0.4 / 0.7, 0.3 / 0.7], atol=0.03)


def test_top_p_keeps_the_smallest_nucleus():
    # sorted: 0.4, 0.3 (0.7), 0.15 (0.85) -> top_p 0.8 keeps three tokens
    freq = _draws(GenerationConfig(temperature=1.0, top_k=0, top_p=0.8))
    assert freq[[0, 4]].sum() == 0 and freq[3] > 0
    np.testing.assert_allclose(freq[[1, 2, 3]], np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.03)


def test_low_temperature_sharpens():
    assert _draws(GenerationConfig(temperature=0.05, top_k=0, top_p=0))[1] > 0.99


def test_same_seed_same_tokens_different_seed_differs(model):
    config = GenerationConfig(max_new_tokens=20, temperature=1.0, top_k=0, top_p=0, stop_token=-1)
    a = generate_ids(model, [1, 2, 3], config.replace(seed=7)).new_ids
    b = generate_ids(model, [1, 2, 3], config.replace(seed=7)).new_ids
    c = generate_ids(model, [1, 2, 3], config.replace(seed=8)).new_ids
    assert a == b and a != c


def test_kv_cache_and_recompute_agree_when_sampling(model):
    config = GenerationConfig(max_new_tokens=25, temperature=0.9, seed=3, stop_token=-1)
    cached = generate_ids(model, [5, 6], config).new_ids
    recomputed = generate_ids(model, [5, 6], config.replace(use_kv_cache=False)).new_ids
    assert cached == recomputed


def test_stop_token_ends_generation_and_is_not_returned(model):
    free = generate_ids(model, [4], GenerationConfig(max_new_tokens=30, temperature=0, stop_token=-1))
    stop = free.new_ids[5]
    first = free.new_ids.index(stop)
    result = generate_ids(model, [4], GenerationConfig(max_new_tokens=30, temperature=0, stop_token=stop))
    assert result.new_ids == free.new_ids[:first] and result.stop_reason == "stop_token"


def test_context_full_stops_cleanly(model, tiny_config):
    prompt = list(range(tiny_config.n_positions - 3))
    config = GenerationConfig(max_new_tokens=50, temperature=0, stop_token=-1)
    result = generate_ids(model, prompt, config)
    assert len(result.new_ids) == 3 and result.stop_reason == "context_full"


def test_prompt_longer_than_context_is_an_error(model, tiny_config):
    with pytest.raises(GenerationError, match="context is 48"):
        generate_ids(model, [1] * 49, GenerationConfig(max_new_tokens=1))


def test_empty_prompt_and_bad_ids_are_errors(model):
    with pytest.raises(GenerationError, match="empty"):
        list(stream_ids(model, [], GenerationConfig()))
    with pytest.raises(ModelInputError, match="outside the model's vocabulary"):
        model.forward([1, 61])


def test_zero_new_tokens_returns_nothing(model):
    assert generate_ids(model, [1], GenerationConfig(max_new_tokens=0)).new_ids == []


def test_streaming_yields_each_token_as_it_is_made(model):
    config = GenerationConfig(max_new_tokens=10, temperature=0, stop_token=-1)
    stream = stream_ids(model, [1, 2], config)
    first = next(stream)  # available before the rest is computed
    assert [first, *stream] == generate_ids(model, [1, 2], config).new_ids


def test_text_api_streams_and_moves_between_backends(tiny_config, tiny_params):
    tokenizer = CharTokenizer.from_text(string.ascii_letters + "012345678")
    assert tokenizer.vocab_size == tiny_config.vocab_size
    lm = LanguageModel(GPT2(tiny_config, tiny_params, get_registry().backend("naive")), tokenizer)
    pieces = list(lm.stream("abc", max_new_tokens=12, temperature=0, stop_token=-1))
    text = lm.generate("abc", max_new_tokens=12, temperature=0, stop_token=-1)
    assert "".join(pieces) == text and len(pieces) > 1
    lm.to("blas")
    assert lm.backend.name == "blas"
    assert lm.generate("abc", max_new_tokens=12, temperature=0, stop_token=-1) == text
    with pytest.raises(GenerationError):
        lm.generate("abc", temperature=-1)


def test_the_default_stop_is_the_models_end_of_text(tiny_config, tiny_params):
    """A model whose every next token is <|endoftext|> stops at once with the defaults."""
    import copy

    params = copy.deepcopy(tiny_params)
    eos = tiny_config.eos_token_id
    params["ln_f"]["weight"][:] = 0.0  # the final hidden state is ln_f's bias ...
    params["wte"][eos] = 50.0 * params["ln_f"]["bias"]  # ... which points at eos
    model = GPT2(tiny_config, params, get_registry().backend("naive"))
    result = generate_ids(model, [1, 2], GenerationConfig(temperature=0))
    assert result.stop_reason == "stop_token" and result.new_ids == []
    never = GenerationConfig(temperature=0, stop_token=-1, max_new_tokens=3)
    explicit_off = generate_ids(model, [1, 2], never)
    assert explicit_off.new_ids == [eos] * 3


def test_streamed_text_keeps_a_character_cut_at_the_end():
    """Generation that ends inside a multi-byte character still yields its bytes (the
    decoder's final flush), so the streamed text equals decoding all the ids."""
    import opswitch
    from opswitch.generation import OutputProcessor
    from opswitch.tokenizer.bytes_to_unicode import BYTE_TO_UNICODE

    lm = opswitch.load_model(None, "naive")  # the demo model: a byte-level BPE
    euro = "€".encode()  # three bytes; generation stops after two of them
    ids = lm.encode(" price") + [lm.tokenizer.token_to_id(BYTE_TO_UNICODE[b]) for b in euro[:2]]
    output = OutputProcessor(lm.tokenizer.stream_decoder())  # what lm.stream's text comes from
    streamed = "".join(output.push(t)[0] for t in ids) + output.finish()[0]
    assert streamed == lm.tokenizer.decode(ids) and streamed.startswith(" price")
    assert len(streamed) > len(" price")  # the cut character is not dropped


def test_log_softmax_is_stable_and_normalised():
    # the one log-softmax (logprobs, evaluation, the cross_entropy reference): huge and
    # tiny logits alike give finite log-probabilities that exponentiate to a distribution
    from opswitch.generation import log_softmax

    x = np.array([[1000.0, 0.0, -1000.0], [3.0, 3.0, 3.0]], dtype=np.float32)
    lp = log_softmax(x)
    assert lp.dtype == np.float64 and np.isfinite(lp[:, :2]).all()
    np.testing.assert_allclose(np.exp(lp).sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(lp[1], -np.log(3.0), rtol=1e-12)
    assert lp[0, 0] == 0.0 and lp[0, 1] == -1000.0
