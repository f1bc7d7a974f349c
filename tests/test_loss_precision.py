"""The loss is accumulated in float64, as ``cross_entropy`` promises, on every built-in backend.

Logits far from zero (offset by 1e5) are where float32 accumulation shows: there
``m + log Σ exp(x - m)`` and ``- x[t]`` each round to float32's step at 1e5 (~0.008),
while the true loss of a row is a few nats.  Accumulated in float64 and rounded
once, the result is within one float32 rounding of the exact sum.
"""

from __future__ import annotations

import numpy as np
import pytest

from opswitch.core import ops as reference
from opswitch.core.errors import BackendError
from opswitch.core.registry import get_registry

BUILT_IN = ("naive", "naive:float64", "blas", "cpu", "opencl", "cuda")


def _exact(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """The loss in float64 from the given values, and a bound on that computation's own error:
    each row's terms are at most |m| + |lse| + |x_t|, and exp/log/sum over V terms round
    at most (V + 8) times at 2^-53."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))
    picked = x[np.arange(targets.size), targets]
    total = float((lse - picked).sum())
    error = (x.shape[1] + 8) * 2.0**-53 * float((np.abs(m) + np.abs(lse) + np.abs(picked)).sum())
    return total, error


def _case(offset: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((16, 1000)) * 2.0 + offset).astype(dtype)
    return logits, rng.integers(0, 1000, 16).astype(np.int64)


@pytest.mark.parametrize("offset", [0.0, 1e5, -1e5])
def test_the_reference_accumulates_in_float64(offset):
    logits, targets = _case(offset, np.float32)
    got = reference.cross_entropy(logits, targets)
    exact, error = _exact(logits, targets)
    assert got.dtype == np.float32
    bound = 2.0**-24 * abs(exact) + error  # one rounding to float32 at the end
    assert abs(float(got[0]) - exact) <= bound, f"loss {float(got[0])!r}, exact {exact!r} (bound {bound:.2g})"


@pytest.mark.parametrize("spec", BUILT_IN)
def test_every_built_in_backend_accumulates_in_float64(spec):
    registry = get_registry()
    try:
        backend = registry.backend(spec)
        ops = registry.bind(backend)
    except BackendError as exc:  # (CI requires the ones this machine can run: see support.py)
        pytest.skip(f"{spec} is not available here: {exc}")
    logits, targets = _case(1e5, backend.dtype)
    got = float(np.asarray(backend.to_host(ops.cross_entropy(backend.to_device(logits), targets)))[0])
    exact, error = _exact(logits, targets)
    u = float(np.finfo(backend.dtype).eps) / 2
    bound = u * abs(exact) + error
    assert abs(got - exact) <= bound, f"{spec}: loss {got!r}, exact {exact!r} (bound {bound:.2g})"
