"""The ``cpu`` backend's half-precision widening and f16 GEMV kernels against their definitions.

f16 -> f32 is exact (every f16 value is a float32), so the widening must give
numpy's conversion bit for bit on all 65,536 patterns, on the path this CPU
takes (F16C's vcvtph2ps) and on the integer path CPUs without it take.  The
GEMV kernels then differ from a float64 product only by float32 rounding:
each product and each of the n additions rounds once, so
``|y - ref| <= (n + 2) u sum|w x|`` with u = 2^-24 (fastmath may reorder the
sum; the bound holds for any order).
"""

from __future__ import annotations

import numpy as np
import pytest
from support import require

require("numba")
from opswitch.backends import cpu_kernels as k  # noqa: E402

U32 = 2.0**-24
EVERY_F16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@pytest.mark.parametrize("widen", [k.widen_half, k.widen_half_portable], ids=["this-cpu", "portable"])
def test_every_f16_pattern_widens_to_numpys_float32(widen):
    bits = EVERY_F16.view(np.int16)
    got = np.empty(bits.size, dtype=np.float32)
    widen(bits, got)
    want = EVERY_F16.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    assert (np.signbit(got[nan]) == np.signbit(want[nan])).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def _f16_weights(rng, n_out: int, n_in: int) -> np.ndarray:
    """f16 values over many binades, subnormals included."""
    w = rng.standard_normal((n_out, n_in)) * np.exp2(rng.integers(-20, 8, (n_out, n_in)))
    return w.astype(np.float16)


def _check(y: np.ndarray, w16: np.ndarray, x: np.ndarray) -> None:
    w, x64 = w16.astype(np.float64), x.astype(np.float64)
    ref = w @ x64
    bound = (w16.shape[1] + 2) * U32 * (np.abs(w) @ np.abs(x64))
    assert np.isfinite(y).all()
    err = np.abs(y - ref)
    worst = int(np.argmax(err - bound))
    assert (err <= bound).all(), f"output {worst}: error {err[worst]:.3g} over the bound {bound[worst]:.3g}"


@pytest.mark.parametrize("n_out,n_in", [(1, 1), (17, 33), (64, 768), (5, 3072)])
def test_f16_gemv_kernels_are_within_float32_rounding_of_the_exact_product(n_out, n_in):
    rng = np.random.default_rng(n_out * n_in)
    w16 = _f16_weights(rng, n_out, n_in)
    bits = np.ascontiguousarray(w16.view(np.int16))
    x = rng.standard_normal(n_in).astype(np.float32)
    exact, scaled = np.empty(n_out, np.float32), np.empty(n_out, np.float32)
    k.gemv_rows_f16_exact(bits, x, exact)
    k.gemv_rows_f16(bits, x * k.F16_SCALE, scaled)  # the pre-scaled form CPUs without F16C take
    _check(exact, w16, x)
    _check(scaled, w16, x)


def test_the_exact_f16_gemv_takes_any_input():
    rng = np.random.default_rng(1)
    w16 = _f16_weights(rng, 9, 40)
    bits = np.ascontiguousarray(w16.view(np.int16))
    x = (rng.standard_normal(40) * 1e30).astype(np.float32)  # x * 2^112 would overflow
    y = np.empty(9, np.float32)
    k.gemv_rows_f16_exact(bits, x, y)
    _check(y, w16, x)
    x[3] = np.nan
    k.gemv_rows_f16_exact(bits, x, y)
    assert np.isnan(y).all()
