"""Weight storage formats: how a weight is kept, apart from how it is computed.

``f32`` is the file's values as float32.  ``f16`` and ``bf16`` round each
value to that type; ``int8`` stores symmetric per-output-channel integers
with one float32 scale per channel (``w ≈ q * scale``, ``|q| <= 127``).
Arithmetic is float32 in every format (a backend widens as it reads).

The functions here are the reference: ``encode`` makes the stored form,
``decode`` the float32 values a backend must compute with.  A backend that
keeps a format natively receives the ``Stored`` weight; any other receives
``decode(encode(w))``, so every backend computes with the same values.

``q8_0`` and ``q4_0`` are GGML's block formats (see "Block formats" below):
the bytes of a GGUF tensor of that type, one row per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from opswitch.core.errors import OpswitchError

FORMATS = ("f32", "f16", "bf16", "int8", "q8_0", "q4_0")

# The roles of matrix weights, the only ones ever stored in a reduced format (vectors: "vector").
MATRIX_ROLES = ("linear", "embedding", "lm_head")


@dataclass(frozen=True)
class Stored:
    """A weight in a storage format.

    data: float32 (f32), float16 (f16), uint16 bit patterns (bf16), int8, or
    for the block formats uint8 ``[n_channels, row_bytes]`` (GGML's blocks);
    scale: float32 per output channel for int8, else None.  For ``linear``
    weights ([n_in, n_out]) the output channel is a column; for
    ``embedding``/``lm_head`` tables ([n_vocab, n]) it is a row.
    logical_shape: the shape of the matrix the blocks stand for (block formats
    only; ``shape`` gives it for every format).
    """

    fmt: str
    role: str
    data: np.ndarray
    scale: np.ndarray | None = None
    logical_shape: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape: [n_in, n_out] for ``linear``, [n_vocab, n] for tables."""
        return self.data.shape if self.logical_shape is None else self.logical_shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.scale is None else self.scale.nbytes)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise OpswitchError(f"unknown weight format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def channel_axis(role: str) -> int:
    """The axis along which int8 scales run: columns of a Conv1D weight, rows of a table."""
    return 1 if role == "linear" else 0


BLOCK = 1 << 18  # elements encoded at a time: temporaries stay ~1 MiB, never a whole-matrix copy


def _row_blocks(w: np.ndarray):
    """Slices of whole rows of ``w`` [n, m] holding about ``BLOCK`` elements each."""
    step = max(1, BLOCK // max(1, w.shape[1]))
    for lo in range(0, w.shape[0], step):
        yield slice(lo, min(w.shape[0], lo + step))


def _bf16_bits(bits: np.ndarray) -> np.ndarray:
    """float32 bit patterns (uint32) -> bf16, round to nearest even on the upper 16 bits.
    The uint32 sum wraps only for NaN patterns (0xFFFF8000 and up), which are replaced."""
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    out = rounded.astype(np.uint16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    out[nan] = ((bits[nan] >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0)  # quiet NaN, same sign
    return out


def encode(w: np.ndarray, fmt: str, role: str) -> Stored:
    """``w`` (any float array) in storage format ``fmt``; vectors always stay f32.

    A block of rows at a time, so encoding a memory-mapped checkpoint needs the
    output plus about a MiB, not float64 or uint64 copies of the matrix."""
    check_format(fmt)
    if fmt in BLOCK_FORMATS and role in MATRIX_ROLES and np.ndim(w) == 2:
        return _encode_blocks(w, fmt, role)
    if fmt == "f32" or role not in MATRIX_ROLES or np.ndim(w) != 2:
        return Stored("f32", role, np.ascontiguousarray(w, dtype=np.float32))
    w = np.asarray(w)
    if fmt == "f16":
        out16 = np.empty(w.shape, dtype=np.float16)
        for rows in _row_blocks(w):
            out16[rows] = np.asarray(w[rows], dtype=np.float32)
        return Stored(fmt, role, out16)
    if fmt == "bf16":
        bf = np.empty(w.shape, dtype=np.uint16)
        for rows in _row_blocks(w):
            bf[rows] = _bf16_bits(np.ascontiguousarray(w[rows], dtype=np.float32).view(np.uint32))
        return Stored(fmt, role, bf)
    axis = channel_axis(role)
    if axis == 1:  # a scale per column: the max over every row block
        amax = np.zeros(w.shape[1], dtype=np.float32)
        for rows in _row_blocks(w):
            np.maximum(amax, np.abs(np.asarray(w[rows], dtype=np.float32)).max(axis=0), out=amax)
    else:
        amax = np.empty(w.shape[0], dtype=np.float32)
        for rows in _row_blocks(w):
            amax[rows] = np.abs(np.asarray(w[rows], dtype=np.float32)).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.empty(w.shape, dtype=np.int8)
    for rows in _row_blocks(w):
        shaped = scale[None, :] if axis == 1 else scale[rows, None]
        q[rows] = np.clip(np.rint(np.asarray(w[rows], dtype=np.float32) / shaped), -127, 127)
    return Stored(fmt, role, q, scale)


def decode(stored: Stored) -> np.ndarray:
    """The float32 values a weight stands for (the reference every backend matches)."""
    if stored.fmt == "f32":
        return stored.data
    if stored.fmt == "f16":
        return stored.data.astype(np.float32)
    if stored.fmt == "bf16":
        return (stored.data.astype(np.uint32) << 16).view(np.float32)
    if stored.fmt in BLOCK_FORMATS:
        return _decode_blocks(stored)
    axis = channel_axis(stored.role)
    shaped = stored.scale[None, :] if axis == 1 else stored.scale[:, None]  # type: ignore[index]  # int8 always has a scale
    return stored.data.astype(np.float32) * shaped


# -- Block formats: GGML's q8_0 and q4_0 ---------------------------------------------
# Each output channel's values along the reduction axis are cut into blocks of 32,
# each with one f16 scale d.  q8_0 (34 bytes): d, then 32 int8 q; value = q·d.
# q4_0 (18 bytes): d, then 16 bytes, byte j holding element j in its low nibble and
# element j + 16 in its high one; value = (nibble - 8)·d.  ``data`` holds exactly
# the bytes of a GGUF tensor of the type (a row per output channel), so a GGUF
# loader passes a slice of the mapped file as it is (``from_blocks``).  The
# quantisers are ggml's reference ones, bit for bit as ``gguf.quants`` writes them.

BLOCK_VALUES = 32  # values per block, both formats
BLOCK_BYTES = {"q8_0": 2 + BLOCK_VALUES, "q4_0": 2 + BLOCK_VALUES // 2}
BLOCK_FORMATS = tuple(BLOCK_BYTES)
# Where a block format cannot hold a matrix (its reduction length is not a multiple
# of 32, or a block's scale overflows f16), the matrix is stored in this format
# instead: 8 bits per value with a float32 scale per channel, the closest we have.
BLOCK_FALLBACK = "int8"
_F16_MAX = float(np.finfo(np.float16).max)
_CHUNK_BLOCKS = 1 << 13  # blocks encoded or decoded at a time (1 MiB of float32 values)


def storage_note(fmt: str, kept: dict[str, int]) -> str:
    """What the load line says about the weights: ``fmt``, and how many matrices a
    block format left in ``BLOCK_FALLBACK`` (``kept``: matrices per stored format)."""
    others = {f: n for f, n in kept.items() if f != fmt}
    if fmt not in BLOCK_FORMATS or not others:
        return fmt
    total = sum(kept.values())
    parts = ", ".join(f"{n} of {total} matrices as {f}" for f, n in sorted(others.items()))
    return (f"{fmt}; {parts} ({fmt} holds a matrix whose reduction length is a multiple of"
            f" {BLOCK_VALUES} and whose block scales fit in f16)")


def reduction_axis(role: str) -> int:
    """The axis the blocks run along: rows of a Conv1D weight, columns of a table."""
    return 0 if role == "linear" else 1


def from_blocks(fmt: str, role: str, blocks: np.ndarray, shape: tuple[int, ...]) -> Stored:
    """A block-format weight from bytes already in GGML's layout (a GGUF tensor's),
    without copying them; ``shape`` is the logical shape (``Stored.shape``)."""
    if fmt not in BLOCK_FORMATS:
        raise OpswitchError(f"{fmt!r} is not a block format: use one of {', '.join(BLOCK_FORMATS)}")
    if role not in MATRIX_ROLES:
        raise OpswitchError(f"a {fmt} weight must be a matrix ({', '.join(MATRIX_ROLES)}), not {role!r}")
    dims = tuple(int(n) for n in shape)
    if len(dims) != 2 or min(dims) < 1:
        raise OpswitchError(f"a {fmt} weight has a 2-D shape of positive sizes, got {dims}")
    n_red, n_rows = (dims[0], dims[1]) if role == "linear" else (dims[1], dims[0])
    if n_red % BLOCK_VALUES:
        raise OpswitchError(f"a {fmt} weight of shape {dims} has a reduction length {n_red},"
                            f" not a multiple of the block size {BLOCK_VALUES}")
    if not isinstance(blocks, np.ndarray) or blocks.dtype != np.uint8 or blocks.ndim != 2:
        got = (f"{blocks.dtype} array of {blocks.ndim} dims" if isinstance(blocks, np.ndarray)
               else type(blocks).__name__)
        raise OpswitchError(f"{fmt} blocks must be a 2-D uint8 array, got a {got}")
    want = (n_rows, n_red // BLOCK_VALUES * BLOCK_BYTES[fmt])
    if blocks.shape != want:
        raise OpswitchError(f"{fmt} blocks of a {dims} weight must be {want[0]} x {want[1]} bytes,"
                            f" got {blocks.shape[0]} x {blocks.shape[1]}")
    return Stored(fmt, role, blocks, None, dims)


def quantize_rows(rows: np.ndarray, fmt: str) -> np.ndarray:
    """float32 rows [n, k] (k a multiple of 32) -> uint8 blocks [n, k/32 · bytes]: ggml's
    reference quantiser, with ``gguf.quants``' own float32 operations in its order (so
    bit-identical for every input, non-finite ones included)."""
    n, k = rows.shape
    out = np.empty((n, k // BLOCK_VALUES * BLOCK_BYTES[fmt]), dtype=np.uint8)
    per_chunk = max(1, _CHUNK_BLOCKS // max(1, k // BLOCK_VALUES))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for lo in range(0, n, per_chunk):
            hi = min(n, lo + per_chunk)
            blocks = np.asarray(rows[lo:hi], dtype=np.float32).reshape(-1, BLOCK_VALUES)
            d, q = _QUANTISERS[fmt](blocks, 1)
            packed = out[lo:hi].reshape(-1, BLOCK_BYTES[fmt])
            packed[:, :2] = d.astype(np.float16).view(np.uint8)
            packed[:, 2:] = q.view(np.uint8) if fmt == "q8_0" else _nibbles(q, 1)
    return out


def quantize_columns(w: np.ndarray, fmt: str) -> np.ndarray:
    """A Conv1D weight [k, n] (k a multiple of 32) -> the blocks of its n columns, the
    same bytes as ``quantize_rows(w.T)``: the arithmetic runs on [32, n] row slabs of
    ``w`` as stored (contiguous, no float transpose), and only the small int8 result is
    transposed into place."""
    k, n = w.shape
    size = BLOCK_BYTES[fmt]
    out = np.empty((n, k // BLOCK_VALUES * size), dtype=np.uint8)
    grouped = out.reshape(n, k // BLOCK_VALUES, size)
    per_chunk = max(1, _CHUNK_BLOCKS // max(1, n))  # groups of 32 rows at a time
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for lo in range(0, k // BLOCK_VALUES, per_chunk):
            hi = min(k // BLOCK_VALUES, lo + per_chunk)
            slab = np.asarray(w[lo * BLOCK_VALUES : hi * BLOCK_VALUES], dtype=np.float32)
            blocks = slab.reshape(hi - lo, BLOCK_VALUES, n)
            d, q = _QUANTISERS[fmt](blocks, 1)
            grouped[:, lo:hi, :2] = np.ascontiguousarray(d[:, 0, :].astype(np.float16).T).view(
                np.uint8).reshape(n, hi - lo, 2)
            values = q.view(np.uint8) if fmt == "q8_0" else _nibbles(q, 1)
            grouped[:, lo:hi, 2:] = values.transpose(2, 0, 1)
    return out


def _q8_0(blocks: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(d, q) of each block along ``axis``: d float32 (kept dims), q int8."""
    d = np.abs(blocks).max(axis=axis, keepdims=True) / np.float32(127)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = blocks * inv
    a = np.abs(q)  # round half away from zero, as ggml's roundf
    floored = np.floor(a)
    q = np.sign(q) * (floored + np.floor(np.float32(2) * (a - floored)))
    return d, q.astype(np.int8)


def _q4_0(blocks: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(d, nibble) of each block along ``axis``: d float32 (kept dims), nibbles uint8 0..15."""
    biggest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=axis, keepdims=True), axis=axis)
    d = biggest / np.float32(-8)  # the value of largest magnitude maps to -8 exactly
    inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    return d, np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)


def _nibbles(q: np.ndarray, axis: int) -> np.ndarray:
    """Element j in the low nibble of byte j, element j + 16 in its high one."""
    low, high = np.split(q, 2, axis=axis)
    return low | (high << np.uint8(4))


_QUANTISERS = {"q8_0": _q8_0, "q4_0": _q4_0}


def block_scales(stored: Stored) -> np.ndarray:
    """The f16 scale of every block, [n_channels, n_blocks] (a view of the bytes)."""
    size = BLOCK_BYTES[stored.fmt]
    n_rows, row_bytes = stored.data.shape
    return stored.data.reshape(n_rows, row_bytes // size, size)[:, :, :2].view(np.float16)[..., 0]


def _encode_blocks(w: np.ndarray, fmt: str, role: str) -> Stored:
    """``w`` in a block format; a matrix the format cannot hold stays ``BLOCK_FALLBACK``
    (the caller sees it in ``Stored.fmt``)."""
    axis = reduction_axis(role)
    if w.shape[axis] % BLOCK_VALUES or w.size == 0:
        return encode(w, BLOCK_FALLBACK, role)
    blocks = quantize_columns(w, fmt) if role == "linear" else quantize_rows(w, fmt)
    stored = Stored(fmt, role, blocks, None, tuple(w.shape))
    scales = block_scales(stored)
    if not np.isfinite(scales).all() and np.isfinite(w).all():  # a block's max|w| beyond f16
        return encode(w, BLOCK_FALLBACK, role)
    return stored


def dequantize_rows(blocks: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 blocks [n, row_bytes] -> float32 [n, k]: d·q as ``gguf.quants`` computes it
    (one float32 product of two exact values, so exact unless d is not finite)."""
    size = BLOCK_BYTES[fmt]
    n, row_bytes = blocks.shape
    grouped = blocks.reshape(n, row_bytes // size, size)
    d = grouped[:, :, :2].view(np.float16).astype(np.float32)  # [n, n_blocks, 1]
    if fmt == "q8_0":
        q = grouped[:, :, 2:].view(np.int8).astype(np.float32)
    else:
        packed = grouped[:, :, 2:]
        q = np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=2)
        q = q.astype(np.int8).astype(np.float32) - np.float32(8)
    with np.errstate(invalid="ignore"):
        return (q * d).reshape(n, -1)


def _decode_blocks(stored: Stored) -> np.ndarray:
    n_rows = stored.data.shape[0]
    out = np.empty(stored.shape, dtype=np.float32)
    rows_out = out.T if stored.role == "linear" else out
    per_chunk = max(1, _CHUNK_BLOCKS // max(1, stored.data.shape[1] // BLOCK_BYTES[stored.fmt]))
    for lo in range(0, n_rows, per_chunk):
        hi = min(n_rows, lo + per_chunk)
        rows_out[lo:hi] = dequantize_rows(stored.data[lo:hi], stored.fmt)
    return out


# -- KV-cache formats --------------------------------------------------------------------
# f16 (llama.cpp's default) halves the bytes late-decode attention reads; keys and values are
# rounded to float16 as they are written (relative error 2^-11; beyond ±65504 they become inf,
# and the logits NaN, which generation reports) and widened to float32 as they are read.
KV_FORMATS = ("f32", "f16")
KV_DTYPES = {"f32": "float32", "f16": "float16"}  # what each format's buffers hold


def check_kv_format(fmt: str) -> str:
    if fmt not in KV_FORMATS:
        raise OpswitchError(f"unknown KV-cache format {fmt!r}: use one of {', '.join(KV_FORMATS)}")
    return fmt
