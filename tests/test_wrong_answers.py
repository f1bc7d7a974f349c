"""No silent wrong answers: non-finite weights and logits, tiny temperatures."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opswitch.core.errors import GenerationError, NonFiniteLogitsError, WeightsError
from opswitch.core.registry import get_registry
from opswitch.generation import GenerationConfig, generate_ids, sample_next
from opswitch.generation.config import MIN_TEMPERATURE
from opswitch.model.gpt2 import GPT2
from opswitch.model.safetensors import SafetensorsFile, save_safetensors
from opswitch.model.weights import load_gpt2, save_gpt2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["transformer.wte.weight", "transformer.h.1.mlp.c_fc.bias"])
def test_non_finite_weights_are_refused_at_load(tmp_path: Path, tiny_config, tiny_params, bad, name) -> None:
    save_gpt2(tmp_path, tiny_config, tiny_params)
    with SafetensorsFile(tmp_path / "model.safetensors") as f:
        tensors = {n: np.array(f.get(n)) for n in f.names}
    tensors[name].reshape(-1)[3] = bad
    save_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(WeightsError, match=rf"{name.removeprefix('transformer.')} in .*model\.safetensors "
                       r"holds 1 non-finite value\(s\)"):
        load_gpt2(tmp_path)


def test_f64_weights_beyond_float32_are_refused(tmp_path: Path, tiny_config, tiny_params) -> None:
    save_gpt2(tmp_path, tiny_config, tiny_params)
    with SafetensorsFile(tmp_path / "model.safetensors") as f:
        tensors = {n: np.array(f.get(n), dtype=np.float64) for n in f.names}
    tensors["transformer.ln_f.bias"][0] = 1e300  # finite in F64, inf once read as float32
    save_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(WeightsError, match="non-finite"):
        load_gpt2(tmp_path)


def test_large_finite_weights_load(tmp_path: Path, tiny_config, tiny_params) -> None:
    """Their float32 sum overflows: the exact check must clear them."""
    params = copy.deepcopy(tiny_params)
    params["h"][0]["mlp"]["c_fc"]["weight"] = np.full_like(params["h"][0]["mlp"]["c_fc"]["weight"], 3e38)
    save_gpt2(tmp_path, tiny_config, params)
    load_gpt2(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_non_finite_logits_are_an_error_not_a_token(bad: float, temperature: float) -> None:
    logits = np.zeros(50)
    logits[7] = bad
    config = GenerationConfig(temperature=temperature)
    with pytest.raises(NonFiniteLogitsError, match=r"the model produced (NaN|infinite) logits"):
        sample_next(logits, config, np.random.default_rng(0))
    assert issubclass(NonFiniteLogitsError, GenerationError)


def test_all_minus_inf_logits_are_an_error() -> None:
    with pytest.raises(NonFiniteLogitsError, match="only -inf"):
        sample_next(np.full(5, -np.inf), GenerationConfig(), np.random.default_rng(0))


def test_some_minus_inf_logits_are_masked_ids() -> None:
    logits = np.array([-np.inf, 1.0, -np.inf, 0.5])
    for seed in range(20):
        assert sample_next(logits, GenerationConfig(top_k=0, top_p=0), np.random.default_rng(seed)) in (1, 3)


def test_nan_weights_given_directly_stop_generation_with_an_error(tiny_config, tiny_params) -> None:
    """Params built in memory skip the load check: the logits check still holds."""
    params = copy.deepcopy(tiny_params)
    params["ln_f"]["bias"] = np.full_like(params["ln_f"]["bias"], np.nan)
    model = GPT2(tiny_config, params, get_registry().backend("naive"))
    for temperature in (0, 0.8):
        with pytest.raises(NonFiniteLogitsError, match=r"NaN logits.*at step 1, on backend naive"):
            generate_ids(model, [1, 2, 3], GenerationConfig(temperature=temperature, max_new_tokens=3))


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-300, 1e-10, MIN_TEMPERATURE / 2])
def test_temperatures_below_the_minimum_are_greedy(temperature: float) -> None:
    config = GenerationConfig(temperature=temperature)
    assert config.greedy
    logits = np.random.default_rng(1).standard_normal(1000) * 30
    assert sample_next(logits, config, np.random.default_rng(0)) == int(np.argmax(logits))


@settings(max_examples=150, deadline=None)
@given(
    temperature=st.floats(min_value=0, max_value=1e6, allow_subnormal=True),
    logits=st.lists(st.floats(min_value=-1e30, max_value=1e30), min_size=1, max_size=40),
    top_k=st.integers(0, 50),
    top_p=st.floats(0, 1),
)
def test_sampling_any_temperature_gives_a_valid_id(temperature, logits, top_k, top_p) -> None:
    config = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    token = sample_next(np.array(logits), config, np.random.default_rng(0))
    assert 0 <= token < len(logits)
    if config.greedy:
        assert token == int(np.argmax(logits))


# -- a path to a weights file loads that file, or is an error -------------------------------

@pytest.fixture
def two_models(tmp_path: Path, tiny_config, tiny_params):
    """DIR with model.safetensors and a different other.safetensors beside it."""
    from opswitch.bench.models import random_params

    save_gpt2(tmp_path, tiny_config, tiny_params)
    other = random_params(tiny_config, seed=99)
    save_gpt2(tmp_path / "o", tiny_config, other)
    (tmp_path / "o" / "model.safetensors").rename(tmp_path / "other.safetensors")
    return tmp_path, other


def test_load_gpt2_of_a_file_loads_that_file(two_models) -> None:
    directory, other = two_models
    _, params = load_gpt2(directory / "other.safetensors")
    np.testing.assert_array_equal(params["wte"], other["wte"])
    _, params = load_gpt2(directory)
    assert not np.array_equal(params["wte"], other["wte"])


def test_resolve_model_never_swaps_a_weights_file_for_another(two_models) -> None:
    from opswitch.core.errors import ModelNotFoundError
    from opswitch.model.hub import resolve_model

    directory, _ = two_models
    assert resolve_model(str(directory / "model.safetensors")) == directory
    assert resolve_model(str(directory / "config.json")) == directory
    with pytest.raises(ModelNotFoundError, match=r"other\.safetensors is not the weights file of its"):
        resolve_model(str(directory / "other.safetensors"))


def test_resolve_model_accepts_a_shard_its_index_names(tmp_path: Path) -> None:
    from helpers import save_sharded

    from opswitch.bench.models import random_params
    from opswitch.model.config import GPT2Config
    from opswitch.model.hub import resolve_model

    config = GPT2Config(vocab_size=61, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=60)
    files = save_sharded(tmp_path, config, random_params(config, seed=1))
    assert resolve_model(str(tmp_path / files[1])) == tmp_path
    assert load_gpt2(tmp_path)[0] == config
