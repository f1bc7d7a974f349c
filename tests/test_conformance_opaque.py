"""The conformance suite itself, on a backend whose arrays refuse to become numpy
implicitly, as GPU arrays do (CuPy's ``__array__`` raises TypeError).

A harness that hands a device array to numpy anywhere fails every case here
with a TypeError; one that compares device arrays with themselves cannot see
a backend that scribbles on its inputs, which the mutant below does.
"""

from __future__ import annotations

import numpy as np
import pytest

from opswitch.core import Backend, LayerStep
from opswitch.core.ops import CATALOGUE, OP_NAMES
from opswitch.testing import test_conformance as suite
from opswitch.testing.cases import CASES


class Opaque:
    """A device array: its memory is only reachable through the backend."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed")

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)


def _unwrap(x):
    if isinstance(x, Opaque):
        return x.a
    if isinstance(x, LayerStep):
        return x.with_caches(_unwrap(x.caches))
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _native(op: str):
    """The reference on the arrays behind the wrappers (caches are written in place)."""

    def method(self, *args, **kwargs):
        out = CATALOGUE[op].reference(*_unwrap(args), **kwargs)
        return Opaque(np.ascontiguousarray(out, dtype=self.dtype))

    return method


class OpaqueBackend(Backend):
    name = "opaque"

    def to_device(self, x):
        return Opaque(np.array(x, dtype=self.dtype if np.asarray(x).dtype.kind == "f" else None))

    def to_host(self, x):
        return x.a if isinstance(x, Opaque) else np.asarray(x)

    def alloc(self, shape):
        return Opaque(np.zeros(shape, dtype=self.dtype))


for _op in OP_NAMES:
    setattr(OpaqueBackend, _op, _native(_op))


class ScribblingGelu(OpaqueBackend):
    """Right answers, but the input is overwritten with them."""

    def gelu(self, x):
        x.a[...] = CATALOGUE["gelu"].reference(x.a)
        return Opaque(x.a.copy())


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.id}" for c in CASES])
def test_every_case_reads_the_device_through_to_host(case):
    suite.test_op_matches_reference(OpaqueBackend(), case)


def test_the_cache_tests_read_the_device_through_to_host():
    suite.test_decoding_through_the_cache_equals_attending_at_once(OpaqueBackend(), 3)
    suite.test_a_batch_equals_each_sequence_alone(OpaqueBackend())


def test_an_input_modified_on_the_device_fails():
    cases = [c for c in CASES if c.op == "gelu"]
    for case in cases:
        with pytest.raises(AssertionError, match="input 0 was modified by gelu"):
            suite.test_op_matches_reference(ScribblingGelu(), case)
