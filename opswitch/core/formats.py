"""Weight storage formats: how a weight is kept, apart from how it is computed.

``f32`` is the file's values as float32.  ``f16`` and ``bf16`` round each
value to that type; ``int8`` stores symmetric per-output-channel integers
with one float32 scale per channel (``w ≈ q * scale``, ``|q| <= 127``).
Arithmetic is float32 in every format (a backend widens as it reads).

The functions here are the reference: ``encode`` makes the stored form,
``decode`` the float32 values a backend must compute with.  A backend that
keeps a format natively receives the ``Stored`` weight; any other receives
``decode(encode(w))``, so every backend computes with the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from opswitch.core.errors import OpswitchError

FORMATS = ("f32", "f16", "bf16", "int8")

# The roles a weight can play; only matrices are ever stored in a reduced format.
MATRIX_ROLES = ("linear", "embedding", "lm_head")
ROLES = (*MATRIX_ROLES, "vector")


@dataclass(frozen=True)
class Stored:
    """A weight in a storage format.

    data: float32 (f32), float16 (f16), uint16 bit patterns (bf16) or int8;
    scale: float32 per output channel for int8, else None.  For ``linear``
    weights ([n_in, n_out]) the output channel is a column; for
    ``embedding``/``lm_head`` tables ([n_vocab, n]) it is a row.
    """

    fmt: str
    role: str
    data: np.ndarray
    scale: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

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
    axis = channel_axis(stored.role)
    shaped = stored.scale[None, :] if axis == 1 else stored.scale[:, None]
    return stored.data.astype(np.float32) * shaped


# -- KV-cache formats --------------------------------------------------------------------
# f16 (llama.cpp's default) halves the bytes late-decode attention reads; keys and values are
# rounded to float16 as they are written (relative error 2^-11; beyond ±65504 they become inf,
# and the logits NaN, which generation reports) and widened to float32 as they are read.
KV_FORMATS = ("f32", "f16")
KV_ITEMSIZE = {"f32": 4, "f16": 2}


def check_kv_format(fmt: str) -> str:
    if fmt not in KV_FORMATS:
        raise OpswitchError(f"unknown KV-cache format {fmt!r}: use one of {', '.join(KV_FORMATS)}")
    return fmt
