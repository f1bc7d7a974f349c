"""The demo model that ships in the package: loads offline, agrees with
transformers, and has learned English (its loss beats a unigram model)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from support import require

import opswitch
from opswitch.model.hub import DEMO_MODEL

# Public-domain Austen (Pride and Prejudice, ch. 1) — also in the training data,
# which is fine: this checks the shipped weights load and compute what they should.
AUSTEN = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters."
)
UNIGRAM_NATS = 6.385  # MODEL_CARD.md: the unigram baseline on the validation split


@pytest.fixture(scope="module")
def demo():
    return opswitch.load_model(backend="blas")


def test_demo_model_ships_complete(demo):
    files = {p.name for p in DEMO_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "MODEL_CARD.md"} <= files
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert demo.tokenizer.eot_id == demo.config.eos_token_id  # the stop token is <|endoftext|>
    size = sum(p.stat().st_size for p in DEMO_MODEL.iterdir())
    assert size < 10 * 2**20  # a few MB in the wheel


def test_demo_model_has_learned_english(demo):
    loss = demo.loss(AUSTEN)
    assert loss < UNIGRAM_NATS - 1.0, f"loss {loss:.2f} nats/token is no better than unigram"


def test_demo_model_matches_transformers(demo):
    torch = require("torch")
    transformers = require("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    ids = demo.encode("It is a truth universally acknowledged")
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    got = demo.forward(ids)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 2e-5
    hf_greedy = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    ours = demo.generate_ids(ids, max_new_tokens=30, temperature=0, stop_token=-1).new_ids
    assert ours == hf_greedy


def test_cli_without_model_uses_the_demo_and_writes_words():
    r = subprocess.run(
        [sys.executable, "-m", "opswitch", "generate", "--prompt", "Mr. Darcy", "--seed", "0",
         "--max-tokens", "40", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert len(words) >= 15
    assert sum(w.strip('.,;:!?"\'').isalpha() for w in words) / len(words) > 0.8
