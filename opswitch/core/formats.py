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


def encode(w: np.ndarray, fmt: str, role: str) -> Stored:
    """``w`` (any float array) in storage format ``fmt``; vectors always stay f32."""
    check_format(fmt)
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    if fmt == "f32" or role not in MATRIX_ROLES or w32.ndim != 2:
        return Stored("f32", role, w32)
    if fmt == "f16":
        return Stored(fmt, role, w32.astype(np.float16))
    if fmt == "bf16":  # round to nearest even on the upper 16 bits
        bits = w32.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = np.isnan(w32)
        out = rounded.astype(np.uint16)
        out[nan] = ((bits[nan] >> 16) & 0x8000) | 0x7FC0  # a quiet NaN of the same sign
        return Stored(fmt, role, out)
    axis = channel_axis(role)
    amax = np.abs(w32).max(axis=1 - axis)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shaped = scale[None, :] if axis == 1 else scale[:, None]
    q = np.clip(np.rint(w32 / shaped), -127, 127).astype(np.int8)
    return Stored(fmt, role, np.ascontiguousarray(q), scale)


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
