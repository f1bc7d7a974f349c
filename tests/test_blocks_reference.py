"""The block formats q8_0 and q4_0 against ggml's own reference, bit for bit.

``gguf.quants`` (ggml-org's Python package, the quantiser llama.cpp's converter
runs) is the definition: our ``encode`` must write the bytes it writes and our
``decode`` must give the float32 values its ``dequantize`` gives, for every input
— random over many binades, exact rounding ties, blocks of zeros, scales that are
f16 subnormals or flush to zero, and magnitudes whose scale overflows f16.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support import require

from opswitch.core import formats
from opswitch.core.errors import OpswitchError

gguf_quants = require("gguf.quants", "gguf is the reference for the block formats")
GGML_TYPE = {"q8_0": 8, "q4_0": 2}  # GGMLQuantizationType values
BLOCK_FORMATS = ("q8_0", "q4_0")


def _reference_bytes(rows: np.ndarray, fmt: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf_quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), GGML_TYPE[fmt])


def _reference_values(blocks: np.ndarray, fmt: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf_quants.dequantize(blocks, GGML_TYPE[fmt])


def _assert_same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape}, want {want.shape}"
    g, w = np.ascontiguousarray(got), np.ascontiguousarray(want)
    if g.dtype == np.float32:  # every NaN pattern is a NaN: compare NaN-ness, then the bits of the rest
        g_nan, w_nan = np.isnan(g), np.isnan(w)
        assert (g_nan == w_nan).all(), f"{what}: NaN at different places"
        g, w = np.where(g_nan, 0, g), np.where(w_nan, 0, w)
        g, w = g.view(np.uint32), w.view(np.uint32)
    wrong = np.argwhere(g != w)
    at = tuple(wrong[0]) if wrong.size else ()
    assert wrong.size == 0, f"{what}: {len(wrong)} differ, first at {at}: {g[at]} vs {w[at]}"


def _awkward_rows(rng: np.random.Generator) -> np.ndarray:
    """Rows of 4 blocks each exercising one edge of the quantisers."""
    blocks = []
    blocks.append(np.zeros(32))  # d = 0: the inverse is 0, not inf
    one = np.zeros(32)
    one[7] = -3.0  # one value, the rest zero
    blocks.append(one)
    ties = (np.arange(32) - 16 + 0.5)  # x/d lands on .5 exactly: ggml rounds away from zero
    ties[0] = 127.0
    blocks.append(ties)
    blocks.append(-ties)
    both = np.full(32, 0.25)
    both[3], both[9] = 2.0, -2.0  # two values of the largest magnitude: q4_0 takes the first
    blocks.append(both)
    blocks.append(-both)
    for exponent in (-14, -20, -24, -26, -30, -40, 5, 15, 19, 23, 60):  # f16 subnormal scales ... overflow
        blocks.append(rng.standard_normal(32) * 2.0**exponent)
    blocks.append(np.full(32, np.finfo(np.float32).max))
    blocks.append(rng.standard_normal(32) * 1e-45)  # float32 subnormals
    while len(blocks) % 4:
        blocks.append(rng.standard_normal(32))
    return np.concatenate(blocks).astype(np.float32).reshape(-1, 128)


def _random_rows(rng: np.random.Generator) -> np.ndarray:
    scales = np.exp2(rng.integers(-20, 12, size=(48, 1)))
    return (rng.standard_normal((48, 256)) * scales).astype(np.float32)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("kind", ["random", "awkward", "non-finite"])
def test_quantise_and_dequantise_rows_are_ggmls_bit_for_bit(fmt, kind) -> None:
    rng = np.random.default_rng(len(kind))
    rows = _random_rows(rng) if kind == "random" else _awkward_rows(rng)
    if kind == "non-finite":  # ggml quantises these too (our loader refuses them earlier)
        rows[0, 3], rows[1, 40], rows[2, 70], rows[3, 100] = np.inf, -np.inf, np.nan, -np.nan
    want = _reference_bytes(rows, fmt)
    got = formats.quantize_rows(rows, fmt)
    _assert_same_bits(got, want, f"{fmt} bytes")
    _assert_same_bits(formats.dequantize_rows(got, fmt), _reference_values(want, fmt), f"{fmt} values")
    # a Conv1D weight's columns (quantised in its own layout) are the same blocks
    _assert_same_bits(formats.quantize_columns(np.ascontiguousarray(rows.T), fmt), want, f"{fmt} columns")


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("role", ["linear", "embedding", "lm_head"])
def test_encode_writes_a_gguf_tensor_of_the_matrix(fmt, role) -> None:
    """Rows are output channels, blocks run along the reduction axis: a Conv1D weight
    [n_in, n_out] is quantised as its transpose, a table [n_vocab, n] as it is."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((96, 200) if role == "linear" else (200, 96)) * 0.2).astype(np.float32)
    stored = formats.encode(w, fmt, role)
    rows = w.T if role == "linear" else w
    want = _reference_bytes(rows, fmt)
    assert (stored.fmt, stored.shape) == (fmt, w.shape)
    _assert_same_bits(stored.data, want, f"{fmt} {role} bytes")
    assert stored.nbytes == want.nbytes == w.size // 32 * formats.BLOCK_BYTES[fmt]
    decoded = formats.decode(stored)
    assert decoded.dtype == np.float32 and decoded.flags.c_contiguous
    ref = _reference_values(want, fmt)
    _assert_same_bits(decoded, ref.T if role == "linear" else ref, f"{fmt} {role} values")


finite_rows = st.integers(1, 4).flatmap(lambda n: st.integers(1, 3).flatmap(lambda m: hnp.arrays(
    np.float32, (n, 32 * m),
    elements=st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.sampled_from([float(np.float32(v)) for v in (0.0, -0.0, 0.5, -0.5, 1.5, 2.5, 1e-45, 6e-8, 8.3e6)]))))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=finite_rows, fmt=st.sampled_from(BLOCK_FORMATS))
def test_any_finite_rows_match_ggml(rows, fmt) -> None:
    want = _reference_bytes(rows, fmt)
    got = formats.quantize_rows(rows, fmt)
    _assert_same_bits(got, want, f"{fmt} bytes")
    _assert_same_bits(formats.dequantize_rows(got, fmt), _reference_values(want, fmt), f"{fmt} values")


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_a_matrix_the_format_cannot_hold_stays_int8(fmt) -> None:
    """Reduction length not a multiple of 32, or a block scale beyond f16 (which ggml
    would write as inf, decoding to inf and NaN): int8, said by ``Stored.fmt``."""
    odd = np.ones((33, 64), dtype=np.float32)  # linear: n_in 33; as a table: rows of 64
    assert formats.encode(odd, fmt, "linear").fmt == formats.BLOCK_FALLBACK
    assert formats.encode(odd, fmt, "embedding").fmt == fmt
    assert formats.encode(odd.T, fmt, "lm_head").fmt == formats.BLOCK_FALLBACK
    huge = np.ones((64, 4), dtype=np.float32)
    huge[5, 1] = 1e7  # q8_0's scale 1e7/127 and q4_0's 1e7/8 overflow f16
    stored = formats.encode(huge, fmt, "linear")
    assert stored.fmt == formats.BLOCK_FALLBACK
    assert np.isfinite(formats.decode(stored)).all()
    assert formats.encode(np.ones(64, dtype=np.float32), fmt, "vector").fmt == "f32"


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_from_blocks_takes_a_gguf_tensors_bytes_without_copying(fmt) -> None:
    w = np.random.default_rng(5).standard_normal((64, 40)).astype(np.float32)
    encoded = formats.encode(w, fmt, "linear")  # 40 output channels of 2 blocks
    mapped = np.frombuffer(encoded.data.tobytes(), dtype=np.uint8).reshape(encoded.data.shape)
    stored = formats.from_blocks(fmt, "linear", mapped, (64, 40))
    assert np.shares_memory(stored.data, mapped) and stored.shape == (64, 40)
    np.testing.assert_array_equal(formats.decode(stored), formats.decode(encoded))
    table = formats.from_blocks(fmt, "embedding", mapped, (40, 64))  # the same bytes as a table
    np.testing.assert_array_equal(formats.decode(table), formats.decode(encoded).T)


@pytest.mark.parametrize("blocks, shape, message", [
    (np.zeros((40, 68), np.int8), (64, 40), "2-D uint8"),
    (np.zeros((40, 2, 34), np.uint8), (64, 40), "2-D uint8"),
    (np.zeros((39, 68), np.uint8), (64, 40), "must be 40 x 68 bytes"),
    (np.zeros((40, 67), np.uint8), (64, 40), "must be 40 x 68 bytes"),
    (np.zeros((40, 68), np.uint8), (65, 40), "not a multiple of the block size 32"),
    (np.zeros((40, 68), np.uint8), (64, 40, 1), "2-D shape"),
    (np.zeros((40, 68), np.uint8), (0, 40), "2-D shape"),
    ([[0] * 68] * 40, (64, 40), "2-D uint8 array, got a list"),
])
def test_from_blocks_refuses_what_does_not_fit(blocks, shape, message) -> None:
    with pytest.raises(OpswitchError, match=message):
        formats.from_blocks("q8_0", "linear", blocks, shape)


def test_from_blocks_names_the_formats_and_roles() -> None:
    blocks = np.zeros((1, 34), np.uint8)
    with pytest.raises(OpswitchError, match="not a block format"):
        formats.from_blocks("int8", "linear", blocks, (32, 1))
    with pytest.raises(OpswitchError, match="must be a matrix"):
        formats.from_blocks("q8_0", "vector", blocks, (32, 1))


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_encoding_and_decoding_hold_about_their_output_in_memory(fmt) -> None:
    """Chunked, in float32: the extra memory beyond the result stays a few chunks
    (numpy's allocations are what tracemalloc counts), whatever the matrix's size."""
    w = np.random.default_rng(6).standard_normal((768, 3072)).astype(np.float32)  # GPT-2's c_fc
    tracemalloc.start()
    try:
        stored = formats.encode(w, fmt, "linear")
        encode_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        decoded = formats.decode(stored)
        decode_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    slack = 16 * formats._CHUNK_BLOCKS * formats.BLOCK_VALUES * 4  # a few float32 chunk temporaries
    assert encode_peak <= stored.nbytes + slack, (encode_peak, stored.nbytes)
    assert decode_peak <= decoded.nbytes + slack, (decode_peak, decoded.nbytes)
