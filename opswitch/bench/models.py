"""Models to measure and to test with: random weights of any shape, and HF's GPT-2 of the same shape.

One builder of each, shared by ``opswitch bench``, ``benchmarks/`` and the
test suite (speed does not depend on the values; parity tests need weights
whose biases and gains are far from HF's 0 / 1 init, so a dropped one shows).
"""

from __future__ import annotations

import numpy as np

from opswitch.core.errors import OpswitchError
from opswitch.model.config import PRESETS, GPT2Config
from opswitch.model.weights import nest_params

# the model of ``opswitch bench --quick``: fits in cache, measures nothing, runs every section
TINY = GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=2)


def random_params(config: GPT2Config, seed: int = 0, scale: float = 0.3) -> dict:
    """Random float32 weights of the config's shapes; layernorm gains near 1, non-zero biases."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in config.param_shapes().items():
        values = rng.standard_normal(shape) * scale
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            values += 1.0
        flat[name] = values.astype(np.float32)
    return nest_params(flat, config.n_layer)


def hf_shape(config: GPT2Config) -> dict:
    """``transformers.GPT2Config`` keywords for the shape of one of our configs."""
    return {"vocab_size": config.vocab_size, "n_positions": config.n_positions, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.n_inner,
            "bos_token_id": config.vocab_size - 1, "eos_token_id": config.vocab_size - 1}


def random_hf_model(seed: int = 0, **shape):
    """HF ``GPT2LMHeadModel`` with random weights, eval mode; biases and layernorm gains are
    perturbed away from HF's 0 / 1 init so that a dropped bias or gain cannot hide (and an
    exporter cannot fold them away or share one initializer between them)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    shape = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1000, "n_positions": 64,
             "bos_token_id": 0, "eos_token_id": 0, **shape}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape, initializer_range=0.1)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.2)
            elif ".ln_" in name or "ln_f" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
        if not model.config.tie_word_embeddings:  # an lm_head of its own, unlike the embedding
            model.lm_head.weight.normal_(0.0, 0.1)
            assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
        if model.config.layer_norm_epsilon < 1e-5:  # small-variance rows, where epsilon matters
            model.transformer.h[0].mlp.c_proj.weight.mul_(1e-3)
            model.transformer.wpe.weight.mul_(1e-3)
            model.transformer.wte.weight.mul_(1e-3)
    return model


def bench_model(model: str | None = None, shape: str = "gpt2",
                quick: bool = False) -> tuple[GPT2Config, dict]:
    """(config, params) to measure: the --quick model, a saved model or hub id, else random
    weights of a preset's shape."""
    if quick:
        return TINY, random_params(TINY)
    if model:
        from opswitch.model.hub import resolve_model
        from opswitch.model.weights import load_gpt2

        return load_gpt2(resolve_model(model))
    if shape not in PRESETS:
        raise OpswitchError(f"unknown --shape {shape!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[shape], random_params(PRESETS[shape])
