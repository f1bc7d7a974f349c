"""Shared fixtures: tiny random GPT-2 models built without any reference stack."""

from __future__ import annotations

import numpy as np
import pytest

from opswitch.model.config import GPT2Config
from opswitch.model.weights import nest_params


def random_params(config: GPT2Config, seed: int = 0, scale: float = 0.3) -> dict:
    """Random weights of the config's shapes; gains near 1, non-zero biases."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in config.param_shapes().items():
        values = rng.standard_normal(shape) * scale
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            values += 1.0
        flat[name] = values.astype(np.float32)
    return nest_params(flat, config.n_layer)


@pytest.fixture(scope="session")
def tiny_config() -> GPT2Config:
    return GPT2Config(vocab_size=61, n_positions=48, n_embd=24, n_layer=2, n_head=3,
                      bos_token_id=0, eos_token_id=60)


@pytest.fixture(scope="session")
def tiny_params(tiny_config) -> dict:
    return random_params(tiny_config)
