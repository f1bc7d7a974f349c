"""The conformance suite fails backends that are wrong in ways a loose check misses.

Each mutant is a small backend wrong on purpose; the suite's own test
function is called on it directly, case by case.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from opswitch.core import Backend
from opswitch.core import ops as reference
from opswitch.testing.cases import CASES
from opswitch.testing.test_conformance import test_op_matches_reference as conformance


def _attention(scale=1.0, half=False):
    def attention(self, qkv, n_head, k_cache, v_cache, start):
        x = qkv.astype(np.float16).astype(qkv.dtype) if half else qkv
        n_new, n_embd = x.shape[0], x.shape[1] // 3
        d, end = n_embd // n_head, start + n_new
        heads = lambda t: t.reshape(n_new, n_head, d).transpose(1, 0, 2)  # noqa: E731
        k_cache[:, start:end] = heads(qkv[:, n_embd : 2 * n_embd])
        v_cache[:, start:end] = heads(qkv[:, 2 * n_embd :])
        q = heads(x[:, :n_embd])
        k = k_cache[:, :end].astype(np.float16).astype(qkv.dtype) if half else k_cache[:, :end]
        s = q @ k.transpose(0, 2, 1) * (scale / math.sqrt(d))
        out = reference.softmax(s, causal=True) @ v_cache[:, :end]
        return out.transpose(1, 0, 2).reshape(n_new, n_embd).astype(qkv.dtype)

    return attention


def _mutant(**ops) -> Backend:
    return type("Mutant", (Backend,), {"name": "mutant", **ops})()


def _failures(backend, op: str) -> list[str]:
    failed = []
    for case in CASES:
        if case.op != op:
            continue
        try:
            conformance(backend, case)
        except AssertionError:
            failed.append(case.id)
    return failed


@pytest.mark.parametrize(
    "mutant", [_attention(scale=1.01), _attention(half=True)], ids=["scale-off-by-1%", "float16-qkv"]
)
def test_small_attention_errors_fail(mutant):
    failed = _failures(_mutant(attention=mutant), "attention")
    assert len(failed) >= 8, failed


def test_a_scale_error_fails_with_many_keys_too():
    failed = _failures(_mutant(attention=_attention(scale=1.01)), "attention")
    assert "new1-h2-d64-past1000" in failed and "new64-h2-d32-past700" in failed


def test_the_exact_attention_passes():
    assert _failures(_mutant(attention=_attention()), "attention") == []


def test_a_cache_written_wrongly_fails():
    def attention(self, qkv, n_head, k_cache, v_cache, start):
        out = reference.attention(qkv, n_head, k_cache, v_cache, start)
        v_cache[:, start] *= 0.5  # the output is right, the cache is not
        return out

    assert len(_failures(_mutant(attention=attention), "attention")) >= 8


class _DeviceArray(np.ndarray):
    """A stand-in for a backend's own array type."""


class _Typed(Backend):
    name = "typed"

    def to_device(self, x):
        return np.ascontiguousarray(x, dtype=self.dtype).view(_DeviceArray)

    def to_host(self, x):
        return np.asarray(x).view(np.ndarray)


def test_returning_host_arrays_instead_of_device_arrays_fails():
    class HostGelu(_Typed):
        def gelu(self, x):
            return reference.gelu(np.asarray(x).view(np.ndarray))  # a plain numpy array

    with pytest.raises(AssertionError, match="not the backend's own array type"):
        conformance(HostGelu(), next(c for c in CASES if c.op == "gelu"))


def test_a_float32_backend_returning_float64_fails():
    class WideGelu(_Typed):
        def gelu(self, x):
            return reference.gelu(np.asarray(x, dtype=np.float64)).view(_DeviceArray)

    with pytest.raises(AssertionError, match="returned float64"):
        conformance(WideGelu(), next(c for c in CASES if c.op == "gelu"))


def test_nan_never_passes():
    class NanAdd(Backend):
        name = "nan"

        def add(self, a, b):
            out = a + b
            out.flat[0] = np.nan
            return out

    assert len(_failures(NanAdd(), "add")) == len([c for c in CASES if c.op == "add"])
