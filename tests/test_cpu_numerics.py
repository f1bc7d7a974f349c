"""The ``cpu`` backend computes what the reference computes, at any magnitude.

* ``f16`` weights: every product must use exactly the weight ``formats.decode`` gives, for any
  finite activation (a kernel that pre-scaled its input by 2^112 overflowed from |x| = 2^16).
* Overflow inside a forward pass is the documented NonFiniteLogitsError, as on every other
  backend (numba's default division check raised ZeroDivisionError from inside an op).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
from support import require

import opswitch
from opswitch.core import formats
from opswitch.core.errors import NonFiniteLogitsError
from opswitch.core.registry import get_registry
from opswitch.model.weights import save_gpt2

require("numba")  # the cpu backend's kernels

EPS32 = 2.0**-24  # float32's unit roundoff


@pytest.fixture(scope="module")
def cpu():
    registry = get_registry()
    backend = registry.backend("cpu")
    registry.bind(backend)  # probes it: the kernels are loaded
    return backend


def f16_weight(n_in: int, n_out: int) -> np.ndarray:
    """Normal values, and f16's extremes: its largest, its smallest normal, subnormals."""
    w = np.random.default_rng(7).standard_normal((n_in, n_out)).astype(np.float32)
    w.flat[:6] = [65504.0, -65504.0, 6.1035156e-05, 5.9604645e-08, -3.0e-7, 0.0]
    return w


@pytest.mark.parametrize("magnitude", [1.0, 2.0**16, 1e5, 1e12, 1e30])
@pytest.mark.parametrize("role", ["linear", "embedding"])
def test_f16_products_use_exactly_the_decoded_weight(cpu, magnitude, role):
    """x = magnitude·e_i picks one weight per output: no sum, so the result is the single
    float32 product of the decoded weight and x, bit for bit."""
    w = f16_weight(40, 24) if role == "linear" else f16_weight(24, 40)  # embedding: [n_vocab, n]
    stored = formats.encode(w, "f16", role)
    packed = cpu.upload_weight(stored)
    decoded = formats.decode(stored)
    dense = decoded if role == "linear" else decoded.T  # [n_in, n_out]
    for i in (0, 1, 3, 7, dense.shape[0] - 1):
        x = np.zeros((1, dense.shape[0]), np.float32)
        x[0, i] = magnitude
        got = cpu.linear(x, packed) if role == "linear" else cpu.matmul(x, packed, transpose_b=True)
        expected = (dense[i].astype(np.float32) * np.float32(magnitude)).astype(np.float32)
        finite = np.isfinite(expected)
        assert np.array_equal(np.asarray(got)[0][finite], expected[finite]), (i, magnitude)


@pytest.mark.parametrize("rows", [1, 3, 9])  # the decode GEMV, a small batch, the prefill GEMM
@pytest.mark.parametrize("magnitude", [1.0, 1e5, 1e20])
def test_f16_linear_with_large_activations_matches_float64(cpu, rows, magnitude):
    """Against float64 on the decoded weights; float32 accumulation over n terms errs by at
    most n·u·Σ|x·w| (the standard bound), whatever the order of the sum."""
    w = f16_weight(96, 48)
    stored = formats.encode(w, "f16", "linear")
    decoded = formats.decode(stored).astype(np.float64)
    x = (np.random.default_rng(rows).standard_normal((rows, 96)) * magnitude).astype(np.float32)
    got = np.asarray(cpu.linear(x, cpu.upload_weight(stored)), np.float64)
    reference = x.astype(np.float64) @ decoded
    bound = 96 * EPS32 * (np.abs(x.astype(np.float64)) @ np.abs(decoded)) * 1.01
    assert np.isfinite(got).all()
    assert (np.abs(got - reference) <= bound).all()


@pytest.mark.parametrize("rows", [1, 5, 9, 16, 64, 65])  # GEMV, packed kernel, sliced sgemm, one sgemm
def test_f32_table_product_matches_float64_on_every_path(cpu, rows):
    """The tied lm_head (x · tableᵀ) with a table large enough to be multiplied in slices
    (the last one short), against float64 under the n·u·Σ|x·w| bound; a NaN in one row of x
    stays in that row's outputs and nowhere else."""
    from opswitch.backends import cpu as cpu_module

    n_vocab = 2 * cpu_module.TABLE_SLICE + 77
    rng = np.random.default_rng(rows)
    table = rng.standard_normal((n_vocab, 40)).astype(np.float32)
    x = rng.standard_normal((rows, 40)).astype(np.float32)
    got = np.asarray(cpu.matmul(x, table, transpose_b=True), np.float64)
    reference = x.astype(np.float64) @ table.T.astype(np.float64)
    bound = 40 * EPS32 * (np.abs(x.astype(np.float64)) @ np.abs(table.T.astype(np.float64))) * 1.01
    assert got.shape == (rows, n_vocab)
    assert (np.abs(got - reference) <= bound).all()
    x[rows // 2, 3] = np.nan
    got = np.asarray(cpu.matmul(x, table, transpose_b=True))
    assert np.isnan(got[rows // 2]).all()
    assert np.isfinite(np.delete(got, rows // 2, axis=0)).all()


def overflowing_model(tmp_path, tiny_config, tiny_params):
    """Finite weights whose attention scores overflow float32: the forward pass yields NaN."""
    params = copy.deepcopy(tiny_params)
    params["h"][0]["attn"]["c_attn"]["weight"] = params["h"][0]["attn"]["c_attn"]["weight"] * 1e30
    save_gpt2(tmp_path, tiny_config, params)
    return tmp_path


@pytest.mark.parametrize("backend", ["naive", "blas", "cpu"])
@pytest.mark.parametrize("prompt", [[1], [1, 2, 3]])  # decode-only, and a prefill first
def test_overflow_is_the_non_finite_logits_error_on_every_backend(tmp_path, tiny_config, tiny_params,
                                                                   backend, prompt):
    lm = opswitch.load_model(overflowing_model(tmp_path, tiny_config, tiny_params), backend=backend)
    with np.errstate(all="ignore"), pytest.raises(NonFiniteLogitsError, match="the model produced NaN"):
        lm.generate_ids(prompt, max_new_tokens=3, temperature=0)


_PRODUCTS = """
import hashlib, numpy as np
from opswitch.core.registry import get_registry
registry = get_registry(); cpu = registry.backend("cpu"); registry.bind(cpu)
digest = hashlib.sha256()
for rows in (1, 3, 8):  # our kernels; OpenBLAS's GEMMs above 8 rows depend on its thread count
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 768)).astype(np.float32)
    w = rng.standard_normal((768, 2304)).astype(np.float32)
    digest.update(cpu.linear(x, w, rng.standard_normal(2304).astype(np.float32)).tobytes())
print(digest.hexdigest())
"""


def test_f32_products_are_the_same_bits_on_any_thread_count():
    """The split of a dot product into partial sums is fixed, not one per thread: a batch
    job's losses on a one-CPU Ray actor are the bits a many-core run writes, wherever our
    kernels compute (decode, and batches up to 8 rows; OpenBLAS's sgemm above that splits
    its sums by thread count, which is why docs/batch.md says to match --threads).  numba's
    thread count is fixed when a process starts, so each count runs in its own."""
    digests = set()
    for threads in ("1", "2", "3"):
        env = dict(os.environ, OPSWITCH_NUM_THREADS=threads, OPSWITCH_ADAPT_THREADS="0")
        done = subprocess.run([sys.executable, "-c", _PRODUCTS], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        digests.add(done.stdout.strip())
    assert len(digests) == 1, "cpu.linear gives different bits on 1, 2 and 3 threads"


WARM = """
import sys
import opswitch
from opswitch.backends import cpu_blocks, cpu_kernels
fmt, kv = sys.argv[1], sys.argv[2]
lm = opswitch.load_model(sys.argv[3], backend="cpu", weights=fmt, kv_cache=kv)
kernels = {"int8": ["gemv_rows_int8", "gemm_rows_packed", "dequant_int8"],
           "bf16": ["gemv_rows_bf16", "gemm_rows_packed", "dequant_bf16"]}[fmt]
cold = [name for name in kernels if not getattr(cpu_kernels, name).signatures]
if kv == "f16":
    cold += [] if len(cpu_kernels.decode_attention_serial.signatures) >= 2 else ["f16 decode attention"]
print("cold:", cold)
"""


@pytest.mark.parametrize("fmt, kv", [("int8", "f16"), ("bf16", "f32")])
def test_loading_a_reduced_format_loads_its_kernels(tmp_path, tiny_config, tiny_params, fmt, kv):
    """Model loading, not the first prompt, pays for a format's kernels (compiled on a fresh
    install: seconds, which the first run reported as prefill and decode time)."""
    save_gpt2(tmp_path, tiny_config, tiny_params)
    done = subprocess.run([sys.executable, "-c", WARM, fmt, kv, str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "cold: []"
