"""q8_0 and q4_0 through the whole model: ``cpu`` keeps the blocks and computes with
them; the reference ``naive:float64`` receives their decoded values.

* Same stored weights, two backends: the format changes the weights, never the
  arithmetic, so ``cpu``'s logits must match float64's to float32 accuracy (the
  2e-5 of test_parity) in every path — prefill (dequantised slabs and sgemm),
  decode (the fused GEMV) and a batch of sequences (the fused kernel over rows).
* Against the float32 weights: the bound follows from the formats' definitions
  (see ``_rounding_bound``), carried through the network as test_parity_formats
  does for f16/bf16/int8.
* The load line says which matrices a block format could not hold.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from opswitch.core import formats
from opswitch.core.registry import get_registry
from opswitch.model.config import GPT2Config
from opswitch.model.gpt2 import GPT2, weight_role
from opswitch.model.weights import nest_params

BLOCK_FORMATS = ("q8_0", "q4_0")
LOGIT_RTOL = 2e-5  # two correct float32 runs of these models (test_parity's bound and reasoning)
AMPLIFICATION = 4.0  # test_parity_formats: sqrt(5 matmuls) in quadrature, layernorm/softmax


def _random_params(config: GPT2Config, seed: int) -> dict:
    """Random weights of the config's shapes (scale 0.2), layernorm gains near 1."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in config.param_shapes().items():
        values = rng.standard_normal(shape) * 0.2
        if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight":
            values += 1.0
        flat[name] = values.astype(np.float32)
    return nest_params(flat, config.n_layer)


@pytest.fixture(scope="module")
def model_case():
    # every reduction length a multiple of 32 but c_proj's (n_inner 200 -> int8 fallback)
    config = GPT2Config(vocab_size=1001, n_positions=64, n_embd=64, n_layer=2, n_head=2, n_inner=200)
    return config, _random_params(config, seed=7)


def _backend(spec: str):
    registry = get_registry()
    backend = registry.backend(spec)
    registry.bind(backend)
    return backend


def _prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _decode_logits(model: GPT2, prompt: list[int], steps: int) -> np.ndarray:
    """Prefill the prompt, then one token at a time: every step's logits."""
    cache = model.new_cache(len(prompt) + steps)
    rows = [model.next_logits(prompt, cache)]
    for t in range(steps):
        rows.append(model.next_logits([prompt[t]], cache))
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_cpu_computes_the_decoded_weights_to_float32_accuracy(model_case, fmt) -> None:
    config, params = model_case
    cpu = GPT2(config, params, _backend("cpu"), weights=fmt)
    ref = GPT2(config, params, _backend("naive:float64"), weights=fmt)
    assert cpu.stored_formats == {fmt: 7, "int8": 2} == ref.stored_formats  # 2 c_proj of n_in 200
    prompt = _prompt(23, config.vocab_size)
    want = ref.forward(prompt).astype(np.float64)
    scale = np.abs(want).max()
    assert scale > 1.0
    assert np.abs(cpu.forward(prompt) - want).max() / scale < LOGIT_RTOL, "prefill"
    got, want = _decode_logits(cpu, prompt, 6), _decode_logits(ref, prompt, 6)
    assert np.abs(got - want).max() / scale < LOGIT_RTOL, "decode"
    batch = [(_prompt(5, config.vocab_size, seed=s), None) for s in range(3)]
    out = {}
    for name, model in (("cpu", cpu), ("ref", ref)):
        out[name] = model.step([(ids, model.new_cache(8)) for ids, _ in batch])
    assert np.abs(out["cpu"] - out["ref"]).max() / scale < LOGIT_RTOL, "a batch of 3"


def _rounding_bound(w: np.ndarray, fmt: str, role: str) -> np.ndarray:
    """Per value, the most that storing ``w`` in a block format may move it, from the
    format's definition.  A block's scale d is stored in f16 (relative error 2^-11, at
    most 2^-25 absolute below f16's normal range), so a value ``q·d16`` is off by
    ``|q|·|d - d16|`` plus the quantisation: half a step for q8_0 (d = max|x| / 127,
    round to nearest), one full step for q4_0 (d = -max / 8 with ``max`` the value of
    largest magnitude; values of the other sign reach +8 and are clipped to 7)."""
    rows = np.abs(np.asarray(w.T if role == "linear" else w, dtype=np.float64))
    blocks = rows.reshape(rows.shape[0], -1, formats.BLOCK_VALUES)
    amax = blocks.max(axis=2, keepdims=True)
    d, q_max, step = (amax / 127, 127, 0.5) if fmt == "q8_0" else (amax / 8, 8, 1.0)
    d16_error = np.maximum(d * 2.0**-11, 2.0**-25)
    bound = np.broadcast_to(step * d + q_max * d16_error, blocks.shape).reshape(rows.shape)
    return bound.T if role == "linear" else bound


def _eps(params, fmt: str) -> float:
    num = den = 0.0

    def leaves(node, path=""):
        if isinstance(node, dict):
            for key, child in node.items():
                yield from leaves(child, f"{path}.{key}".lstrip("."))
        elif isinstance(node, list):
            for i, child in enumerate(node):
                yield from leaves(child, f"{path}.{i}")
        else:
            yield path, node

    for path, w in leaves(params):
        role = weight_role(path)
        if role not in formats.MATRIX_ROLES or np.ndim(w) != 2:
            continue
        stored = formats.encode(w, fmt, role).fmt
        if stored == fmt:
            bound = _rounding_bound(w, fmt, role)
        else:  # int8 fallback: half a step of max|channel| / 127
            axis = formats.channel_axis(role)
            amax = np.abs(w).max(axis=1 - axis).astype(np.float64) / 254
            bound = np.broadcast_to(amax[None, :] if axis == 1 else amax[:, None], w.shape)
        num += float(np.sum(bound**2))
        den += float(np.sum(np.asarray(w, dtype=np.float64) ** 2))
    return (num / den) ** 0.5


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_logits_move_only_by_the_formats_rounding(model_case, fmt) -> None:
    config, params = model_case
    prompt = _prompt(23, config.vocab_size)
    exact = GPT2(config, params, _backend("naive:float64"), weights="f32").forward(prompt).astype(np.float64)
    got = GPT2(config, params, _backend("cpu"), weights=fmt).forward(prompt).astype(np.float64)
    scale = np.abs(exact).max()
    err = np.abs(got - exact).max() / scale
    eps = _eps(params, fmt)
    assert 0 < err <= AMPLIFICATION * eps, f"{fmt}: max|Δlogit|/max|logit| {err:.2e} vs eps {eps:.2e}"


def test_the_weights_stay_blocks_on_cpu() -> None:
    """Loading in q8_0 holds the blocks, not float32 copies: what numpy allocates while
    the model binds stays near the stored bytes (plus the encoder's chunk buffers)."""
    config = GPT2Config(vocab_size=4000, n_positions=64, n_embd=512, n_layer=2, n_head=8)
    params = _random_params(config, seed=3)
    f32_bytes = sum(w.nbytes for w in _matrices(params))
    backend = _backend("cpu")
    tracemalloc.start()
    try:
        model = GPT2(config, params, backend, weights="q8_0")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    stored = f32_bytes // 4 // formats.BLOCK_VALUES * formats.BLOCK_BYTES["q8_0"]
    chunks = 8 * formats._CHUNK_BLOCKS * formats.BLOCK_VALUES * 4
    assert model.stored_formats == {"q8_0": 9}
    assert peak <= 1.3 * stored + chunks, f"peak {peak / 2**20:.1f} MiB, {stored / 2**20:.1f} MiB of blocks"
    assert peak < f32_bytes / 2  # far from a float32 copy (the bound above is ~0.45 of it)


def _matrices(params):
    yield params["wte"]
    for block in params["h"]:
        yield block["attn"]["c_attn"]["weight"]
        yield block["attn"]["c_proj"]["weight"]
        yield block["mlp"]["c_fc"]["weight"]
        yield block["mlp"]["c_proj"]["weight"]


def test_the_load_line_says_which_matrices_stayed_int8(tiny_model_dir) -> None:
    """The tiny model (n_embd 16): only the MLP's c_proj (n_in 64) fits q4_0's blocks."""
    r = subprocess.run(
        [sys.executable, "-m", "opswitch", "generate", "--model", str(tiny_model_dir), "--backend", "cpu",
         "--weights", "q4_0", "--prompt", "Hello", "--temperature", "0", "--max-tokens", "3"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert ("weights stored as q4_0; 7 of 9 matrices as int8 (q4_0 holds a matrix whose reduction"
            " length is a multiple of 32 and whose block scales fit in f16)") in r.stderr
