"""Weights in a storage format (``opswitch.core.formats``): a backend's products with
an uploaded f16/bf16/int8/q8_0/q4_0 weight against the float64 reference of the *decoded*
weight, so a fused dequantise-and-multiply kernel is held to the same error bound
as a float32 GEMM (the rounding of the format itself is not the backend's error).

Runs for every format, whether the backend keeps it natively (``weight_formats``)
or receives it decoded, so the model's path for any backend is covered.  The block
formats (q8_0, q4_0) are held to the same bound: their decoded values ``q·d`` are
exact in float32, and a block kernel that multiplies them by x and sums in float32
rounds each term at most once more (the block scale) than a GEMM, within the
``k + 2`` of ``_gemm_bound`` for any k >= 32; a kernel that rounds x to 8 bits, as
ggml's does, would not be, and that is a difference this test must report.
"""

from __future__ import annotations

import numpy as np
import pytest

from opswitch.core import formats
from opswitch.core.backend import Backend
from opswitch.core.registry import get_registry
from opswitch.testing.cases import _linear_bound, _matmul_bound

REDUCED = ("f16", "bf16", "int8", "q8_0", "q4_0")
# (rows, n_in, n_out): decode GEMV, a small batch, a GEMM; odd sizes; GPT-2 small's c_fc;
# batched decode (5-64 rows, one pass over a packed weight) and just past it.
# The block formats need n_in a multiple of 32: the others test their int8 fallback.
SHAPES = [(1, 7, 3), (1, 65, 127), (3, 96, 97), (7, 33, 130), (1, 768, 3072), (40, 96, 200),
          (6, 64, 40), (17, 65, 130), (70, 33, 20)]


def _upload(backend, w: np.ndarray, fmt: str, role: str):
    stored = formats.encode(w, fmt, role)
    if stored.fmt not in backend.weight_formats:
        stored = formats.Stored("f32", role, formats.decode(stored))
    return backend.upload_weight(stored), formats.decode(formats.encode(w, fmt, role)).astype(np.float64)


def _check(got, ref, bound) -> None:
    err = np.abs(np.asarray(got, dtype=np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    limit = np.broadcast_to(bound, err.shape)[worst]
    assert (err <= bound).all(), f"|err| {err[worst]:.3g} > bound {limit:.3g} at {worst}"


@pytest.mark.parametrize("fmt", REDUCED)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_linear_with_stored_weight(opswitch_backend: Backend, fmt: str, shape: tuple[int, int, int]) -> None:
    backend = opswitch_backend
    if backend.dtype != np.float32:
        pytest.skip("weight formats are float32 storage; compared in float32")
    rows, n_in, n_out = shape
    rng = np.random.default_rng(rows * n_in + n_out)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    w = (rng.standard_normal((n_in, n_out)) * 0.3).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    ops = get_registry().bind(backend)  # prepares the backend (builds kernels) first
    w_dev, w_ref = _upload(backend, w, fmt, "linear")
    out = ops.linear(backend.to_device(x), w_dev, backend.to_device(b))
    args = [x.astype(np.float64), w_ref, b.astype(np.float64)]
    ref = args[0] @ w_ref + args[2]
    _check(backend.to_host(out), ref, _linear_bound(args, ref, float(np.finfo(np.float32).eps) / 2))


@pytest.mark.parametrize("fmt", REDUCED)
@pytest.mark.parametrize("rows", [1, 2, 9])
def test_tied_head_and_embedding_with_stored_table(opswitch_backend: Backend, fmt: str, rows: int) -> None:
    """The tied table: ``matmul(x, wte, transpose_b=True)`` (the lm_head) and the row
    gather (``embedding``), which must give the decoded rows exactly."""
    backend = opswitch_backend
    if backend.dtype != np.float32:
        pytest.skip("weight formats are float32 storage; compared in float32")
    rng = np.random.default_rng(rows)
    table = (rng.standard_normal((1001, 96)) * 0.1).astype(np.float32)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    ops = get_registry().bind(backend)
    t_dev, t_ref = _upload(backend, table, fmt, "embedding")
    out = ops.matmul(backend.to_device(x), t_dev, transpose_b=True)
    args = [x.astype(np.float64), t_ref, True]
    ref = args[0] @ t_ref.T
    _check(backend.to_host(out), ref, _matmul_bound(args, ref, float(np.finfo(np.float32).eps) / 2))
    ids = np.array([0, 1000, 5, 5, 77], dtype=np.int64)
    np.testing.assert_array_equal(backend.to_host(ops.embedding(t_dev, ids)), t_ref[ids].astype(np.float32))
