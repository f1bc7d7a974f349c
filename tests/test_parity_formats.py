"""Parity with HF transformers for reduced-precision weights (f16, bf16, int8).

HF runs the float32 weights; we run them stored in a format, so the error is the
format's rounding carried through the network, and the bound is stated from it:

* ``eps`` bounds the weights' relative perturbation ``‖decode(encode(W)) - W‖ / ‖W‖``
  over every matrix from the formats' definitions, not from ``encode`` (which would let an
  encoding bug raise the bound with the error): each value moves at most half its format's
  step, relative 2^-11 for f16, 2^-8 for bf16, ``max|channel| / 254`` for int8.  On these
  models that is f16 4.9e-4, bf16 3.9e-3, int8 1.0e-2 to 1.1e-2.
* A relative perturbation ``eps`` of every weight moves each matmul's output by
  about ``eps`` of its scale; the perturbations are independent, so through the
  2·n_layer + 1 ≤ 7 matmuls of these models they add in quadrature (≤ √7·eps ≈
  2.6·eps), and layernorm/softmax amplify by a small factor, while the rounding of a
  typical value is well under the worst case ``eps`` assumes (uniform within the half
  step: RMS ``1/√3`` of it): we require ``max |Δlogit| <= 4·eps·max|logit|`` (measured
  on ``cpu``: 0.5 to 2.3·eps).
* Greedy decoding must match HF's ids up to the first step where HF's own top-1
  vs top-2 margin is within twice that logit bound (a near-tie the format's
  rounding may flip); after that they may differ.  That horizon is 3 to 64
  steps for f16, 1 to 64 for bf16, 0 to 20 for int8 on these shapes; the
  measured match lengths on ``cpu`` are longer: f16 64/64/64, bf16 20/64/64,
  int8 64/64/3 (odd-96x3, inner200, gpt2vocab).

Against ``naive:float64`` running the *same* stored weights, every backend must
agree to float32 accuracy (the test_parity bound): the format changes the
weights, never the arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import LOGIT_RTOL, PARITY_SHAPES, random_prompt
from support import require

torch = require("torch")
require("transformers")


from opswitch.api import LanguageModel  # noqa: E402
from opswitch.bench.models import random_hf_model  # noqa: E402
from opswitch.core import formats  # noqa: E402
from opswitch.core.registry import get_registry  # noqa: E402
from opswitch.model.gpt2 import GPT2, weight_role  # noqa: E402
from opswitch.model.weights import load_gpt2  # noqa: E402

FORMATS = ("f16", "bf16", "int8")
N_GREEDY = 64
AMPLIFICATION = 4.0


@pytest.fixture(scope="module", params=list(PARITY_SHAPES))
def hf_case(request, tmp_path_factory):
    model = random_hf_model(seed=len(request.param), **PARITY_SHAPES[request.param])
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory, safe_serialization=True)
    ids = random_prompt(model.config.vocab_size, 11)
    steps, margins = [], []
    with torch.no_grad():
        result = model(torch.tensor([ids]), use_cache=True)
        for _ in range(N_GREEDY):
            logits = result.logits[0, -1]
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            steps.append(int(torch.argmax(logits)))
            past = result.past_key_values
            result = model(torch.tensor([[steps[-1]]]), past_key_values=past, use_cache=True)
        prompt = random_prompt(model.config.vocab_size)
        expected = model(torch.tensor([prompt])).logits[0].numpy().astype(np.float64)
    return load_gpt2(directory), ids, steps, np.array(margins), prompt, expected


def _leaves(node, path=""):
    """(path, array) as the model names them when it uploads (``h.0.attn.c_attn.weight``)."""
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _leaves(child, f"{path}.{key}".lstrip("."))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _leaves(child, f"{path}.{i}")
    else:
        yield path, node


# half the step of each format's grid, as a bound on one value's rounding error (from the
# format's definition, never from encode's output, so an encoding bug cannot raise the bound):
# f16 has 11 significant bits (relative 2^-11; below 2^-14 subnormals, absolute 2^-25), bf16
# 8 (relative 2^-8), int8 steps of max|channel| / 127 (absolute half a step).
def _rounding_bound(w: np.ndarray, fmt: str, role: str) -> np.ndarray:
    """Per value, the most that storing ``w`` in ``fmt`` may move it."""
    w = np.abs(np.asarray(w, dtype=np.float64))
    if fmt == "f16":
        return np.maximum(w * 2.0**-11, 2.0**-25)
    if fmt == "bf16":
        return np.maximum(w * 2.0**-8, 2.0**-134)
    axis = formats.channel_axis(role)
    amax = w.max(axis=1 - axis)
    return np.broadcast_to((amax / 254)[None, :] if axis == 1 else (amax / 254)[:, None], w.shape)


def _eps(params, fmt: str) -> float:
    """The weights' relative perturbation in ``fmt`` over every stored matrix, at most:
    ``‖bound‖ / ‖W‖`` with each value's rounding at its format's half step."""
    num = den = 0.0
    for path, w in _leaves(params):
        role = weight_role(path)
        if role in formats.MATRIX_ROLES and np.ndim(w) == 2:
            num += float(np.sum(_rounding_bound(w, fmt, role) ** 2))
            den += float(np.sum(np.asarray(w, dtype=np.float64) ** 2))
    return (num / den) ** 0.5


@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_within_the_formats_bound(hf_case, opswitch_backend, fmt):
    (config, params), _, _, _, prompt, expected = hf_case
    model = GPT2(config, params, opswitch_backend, weights=fmt)
    got = model.forward(prompt).astype(np.float64)
    scale = np.abs(expected).max()
    err = np.abs(got - expected).max() / scale
    eps = _eps(params, fmt)
    assert 0 < eps and err <= AMPLIFICATION * eps, (
        f"{fmt}: max|Δlogit|/max|logit| {err:.2e} > {AMPLIFICATION:g}·eps")
    same = GPT2(config, params, get_registry().backend("naive:float64"), weights=fmt).forward(prompt)
    assert np.abs(got - same).max() / scale < LOGIT_RTOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_matches_up_to_the_first_near_tie(hf_case, opswitch_backend, fmt):
    (config, params), ids, expected, margins, _, logits = hf_case
    bound = AMPLIFICATION * _eps(params, fmt) * np.abs(logits).max()
    ties = np.flatnonzero(margins < 2 * bound)
    horizon = int(ties[0]) if ties.size else N_GREEDY
    lm = LanguageModel(GPT2(config, params, opswitch_backend, weights=fmt))
    got = lm.generate_ids(ids, max_new_tokens=N_GREEDY, temperature=0, stop_token=-1).new_ids
    assert got[:horizon] == expected[:horizon], f"{fmt}: differs before the first near-tie at step {horizon}"
