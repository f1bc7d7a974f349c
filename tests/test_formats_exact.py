"""The storage formats against their definitions, not against themselves.

Each bound here follows from what the format is, so a bug in ``encode`` cannot
widen it: bf16 is IEEE round-to-nearest-even of the upper 16 bits (``ml_dtypes``
is the reference, bit for bit, ties included); f16 is numpy's float16 cast; int8
is symmetric per output channel with ``scale = max|w| / 127`` of that channel, and
rounding to the nearest integer leaves ``|decode(encode(w)) - w| <= scale / 2``.
"""

from __future__ import annotations

import numpy as np
import pytest
from support import require

from opswitch.core import formats

ml_dtypes = require("ml_dtypes")

U32 = 2.0**-24  # float32 unit roundoff


def _bf16_inputs() -> np.ndarray:
    """Random values over many binades, every tie pattern, and the edges."""
    rng = np.random.default_rng(0)
    random = (rng.standard_normal(4000) * np.exp2(rng.integers(-30, 30, 4000))).astype(np.float32)
    # exact ties: the lower 16 bits are 0x8000, with an even and an odd bit 16 above them
    high = rng.integers(0, 0x7F7F, 500, dtype=np.uint32) << 16
    ties = np.concatenate([high | 0x8000, (high | 0x10000) | 0x8000]).view(np.float32)
    near = np.concatenate([high | 0x7FFF, high | 0x8001]).view(np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                      np.finfo(np.float32).tiny, 1e-45, -1e-45, 1e-40, 1.0, -1.0], dtype=np.float32)
    return np.concatenate([random, ties, -ties, near, -near, edges])


def test_bf16_is_round_to_nearest_even_bit_for_bit():
    w = _bf16_inputs()
    stored = formats.encode(w.reshape(1, -1), "bf16", "linear")
    expected = w.astype(ml_dtypes.bfloat16).view(np.uint16)
    got = stored.data.reshape(-1)
    wrong = np.flatnonzero(got != expected)
    assert wrong.size == 0, (
        f"{wrong.size} values differ from ml_dtypes, e.g. {w[wrong[0]]!r} "
        f"(bits {w.view(np.uint32)[wrong[0]]:#010x}): got {got[wrong[0]]:#06x}, "
        f"want {expected[wrong[0]]:#06x}"
    )
    # decoding widens exactly: the bf16 value as float32
    np.testing.assert_array_equal(formats.decode(stored).reshape(-1),
                                  expected.view(ml_dtypes.bfloat16).astype(np.float32))


def test_bf16_keeps_nan_a_nan_of_the_same_sign():
    w = np.array([[np.nan, -np.nan, 1.0]], dtype=np.float32)
    got = formats.encode(w, "bf16", "embedding").data.reshape(-1)
    np.testing.assert_array_equal(got, w.astype(ml_dtypes.bfloat16).view(np.uint16).reshape(-1))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_f16_is_numpys_cast():
    w = _bf16_inputs()
    w = w[np.isfinite(w)].reshape(2, -1)
    with np.errstate(over="ignore"):
        expected = w.astype(np.float16)
    stored = formats.encode(w, "f16", "linear")
    assert stored.data.dtype == np.float16
    np.testing.assert_array_equal(stored.data.view(np.uint16), expected.view(np.uint16))
    np.testing.assert_array_equal(formats.decode(stored), expected.astype(np.float32))


def _int8_weights(rng, shape, role: str) -> np.ndarray:
    """Channels of very different sizes, a zero channel, and values exactly on the grid's half-steps."""
    w = rng.standard_normal(shape).astype(np.float32)
    axis = formats.channel_axis(role)
    sizes = np.exp2(rng.integers(-12, 6, shape[axis])).astype(np.float32)
    w *= sizes[None, :] if axis == 1 else sizes[:, None]
    zero = (slice(None), 0) if axis == 1 else (0, slice(None))
    w[zero] = 0.0
    return w


@pytest.mark.parametrize("role,shape", [("linear", (65, 33)), ("embedding", (101, 24)),
                                        ("lm_head", (7, 300))])
def test_int8_scale_is_the_channels_max_over_127_and_error_at_most_half_a_step(role, shape):
    rng = np.random.default_rng(sum(shape))
    w = _int8_weights(rng, shape, role)
    axis = formats.channel_axis(role)
    stored = formats.encode(w, "int8", role)
    assert stored.fmt == "int8" and stored.data.dtype == np.int8
    amax = np.abs(w.astype(np.float64)).max(axis=1 - axis)
    # the scale is max|w| / 127, rounded once to float32; a zero channel may have any positive scale
    expected_scale = (amax / 127).astype(np.float32)
    nonzero = amax > 0
    np.testing.assert_array_equal(stored.scale[nonzero], expected_scale[nonzero])
    assert np.isfinite(stored.scale).all() and (stored.scale > 0).all()
    assert np.abs(stored.data.astype(np.int64)).max() <= 127
    # nearest rounding: at most half a step off (float32 division and the decode's product
    # each add at most one rounding of |w| <= amax)
    step = (amax / 127)[None, :] if axis == 1 else (amax / 127)[:, None]
    top = amax[None, :] if axis == 1 else amax[:, None]
    err = np.abs(formats.decode(stored).astype(np.float64) - w)
    bound = step / 2 + 4 * U32 * top
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"|decode(encode(w)) - w| {err[worst]:.3g} > half a step {bound[worst]:.3g}"
    assert (formats.decode(stored)[(slice(None), 0) if axis == 1 else (0, slice(None))] == 0).all()


def test_int8_rounds_to_nearest_not_toward_zero():
    """Values 0.75 of a step above the grid must go up: truncation would leave 0.75 of a step."""
    q = np.arange(-126, 126, dtype=np.float32)
    w = np.concatenate([[127.0], q + 0.75]).astype(np.float32).reshape(1, -1)  # scale exactly 1
    stored = formats.encode(w, "int8", "lm_head")
    assert stored.scale[0] == 1.0
    np.testing.assert_array_equal(stored.data[0, 1:], (q + 1).astype(np.int8))
