"""numba kernels of the ``cpu`` backend for GGML's block formats q8_0 and q4_0.

The weights are the GGUF tensor's bytes as they are (``opswitch.core.formats``):
uint8 ``[n_out, n_blocks · block_bytes]``, one output channel per row, each block
an f16 scale ``d`` then 32 values (q8_0: int8 ``q``, value ``q·d``; q4_0: byte
``j`` holds element ``j`` in its low nibble and ``j + 16`` in its high one, value
``(nibble - 8)·d``).  Reading them in place is what makes decode fast (1.06 or
0.56 bytes a weight instead of 4) and keeps a memory-mapped GGUF unduplicated.

Arithmetic is float32, like every other ``cpu`` kernel: a block's 32 values are
widened to ``q·d`` (exact: an 11-bit significand times an integer of at most 8
bits) and multiplied by x in float32, summed in 32 lane accumulators.  So each
term of a dot product sees one rounding for its product and at most ``k - 1``
for the sums, in any order fastmath picks: the ``(k + 2)·u·|x|·|w|`` bound of a
float32 GEMM on the decoded weights holds (``opswitch.testing``'s weight-format
cases check exactly that).  ggml instead rounds x to q8 per block and sums
integers, an error of up to ``d_x / 2`` per activation that a float32-bound test
could not hold it to; with the weights read once per token the float path costs
no measurable decode speed (decode is bound by memory traffic).
"""

from __future__ import annotations

import llvmlite.binding as ll
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

from opswitch.backends.cpu_kernels import _f16

BLOCK_VALUES = 32
Q8_0_BYTES = 34
Q4_0_BYTES = 18
ROWS = 16  # output rows per parallel task, as cpu_kernels


@intrinsic
def _lanes(typingctx):
    """A float32[32] on the stack (uninitialised).  np.zeros would be a heap block the
    compiler must assume the weights may alias, so the 32 accumulators would go
    through memory on every block; on the stack they stay in 4 vector registers."""
    arrty = types.Array(types.float32, 1, "C")

    def codegen(context, builder, signature, args):
        ary = make_array(arrty)(context, builder)
        data = cgutils.alloca_once(builder, ir.FloatType(), size=BLOCK_VALUES)
        intp = context.get_value_type(types.intp)
        context.populate_array(ary, data=data, shape=[ir.Constant(intp, BLOCK_VALUES)],
                               strides=[ir.Constant(intp, 4)], itemsize=ir.Constant(intp, 4), meminfo=None)
        return ary._getvalue()

    return arrty(), codegen


@intrinsic
def _f16_bytes(typingctx, lo, hi):
    """Two bytes (little-endian f16 bits) -> float32 by LLVM's half->float extension:
    one ``vcvtph2ps`` on a CPU with F16C (exact for every f16, subnormals included)."""
    sig = types.float32(lo, hi)

    def codegen(context, builder, signature, args):
        i16 = ir.IntType(16)
        low, high = (builder.zext(a, i16) if a.type.width < 16 else builder.trunc(a, i16) for a in args)
        bits = builder.or_(low, builder.shl(high, ir.Constant(i16, 8)))
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())

    return sig, codegen


# Without F16C, LLVM would call a compiler-rt helper numba may not link: use the
# integer widening of cpu_kernels there (exact for finite values; the backend
# uploads blocks with a non-finite scale as float32).
HAS_F16C = bool(ll.get_host_cpu_features().get("f16c", False))

if HAS_F16C:
    @njit(inline="always", error_model="numpy")
    def _scale(w, o, base):
        """The block's f16 scale (little-endian bytes at ``base``) as float32, exactly."""
        return _f16_bytes(w[o, base], w[o, base + 1])
else:
    @njit(inline="always", error_model="numpy")
    def _scale(w, o, base):
        """The block's f16 scale (little-endian bytes at ``base``) as float32, exactly."""
        return _f16(np.int16(np.uint16(w[o, base]) | (np.uint16(w[o, base + 1]) << np.uint16(8))))


@njit(inline="always", fastmath=True, error_model="numpy")
def _dot_q8_0(w, o, x, r):
    n_blocks = w.shape[1] // Q8_0_BYTES
    acc = _lanes()
    for i in range(BLOCK_VALUES):
        acc[i] = 0
    for blk in range(n_blocks):
        base = blk * Q8_0_BYTES
        d = _scale(w, o, base)
        xo = blk * BLOCK_VALUES
        for i in range(BLOCK_VALUES):
            acc[i] += (np.float32(np.int8(w[o, base + 2 + i])) * d) * x[r, xo + i]
    return acc.sum()


@njit(inline="always", fastmath=True, error_model="numpy")
def _dot_q4_0(w, o, x, r):
    n_blocks = w.shape[1] // Q4_0_BYTES
    acc = _lanes()
    for i in range(BLOCK_VALUES):
        acc[i] = 0
    half = BLOCK_VALUES // 2
    for blk in range(n_blocks):
        base = blk * Q4_0_BYTES
        d = _scale(w, o, base)
        d_high = d * np.float32(0.0625)  # the high nibble is read in place, 16 times too big
        xo = blk * BLOCK_VALUES
        for j in range(half):
            b = np.int32(w[o, base + 2 + j])
            acc[j] += (np.float32((b & np.int32(15)) - np.int32(8)) * d) * x[r, xo + j]
            acc[j + half] += (np.float32((b & np.int32(240)) - np.int32(128)) * d_high) * x[r, xo + half + j]
    return acc.sum()


# -- GEMV / small GEMM: out[r, o] = x[r] . w[o], the blocks read once per output row ---
# Rows of x (a small batch) share each output row's pass: the row's blocks, a few
# KiB, stay in L1 while every x row is multiplied by them.
@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def gemm_q8_0(w, x, out):  # uint8 [n_out, nb·34], f32 [m, nb·32] -> f32 [m, n_out]
    n_out = w.shape[0]
    for task in prange((n_out + ROWS - 1) // ROWS):
        for o in range(task * ROWS, min(n_out, (task + 1) * ROWS)):
            for r in range(x.shape[0]):
                out[r, o] = _dot_q8_0(w, o, x, r)


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def gemm_q4_0(w, x, out):  # uint8 [n_out, nb·18], f32 [m, nb·32] -> f32 [m, n_out]
    n_out = w.shape[0]
    for task in prange((n_out + ROWS - 1) // ROWS):
        for o in range(task * ROWS, min(n_out, (task + 1) * ROWS)):
            for r in range(x.shape[0]):
                out[r, o] = _dot_q4_0(w, o, x, r)


# -- dequantisation (prefill: widen a slab of rows once, then one sgemm) ----------------
@njit(fastmath=True, cache=True, error_model="numpy")
def dequant_q8_0(w, out):  # uint8 [n, nb·34] -> f32 [n, nb·32], exactly formats.decode's values
    for o in range(w.shape[0]):
        for blk in range(w.shape[1] // Q8_0_BYTES):
            base = blk * Q8_0_BYTES
            d = _scale(w, o, base)
            for i in range(BLOCK_VALUES):
                out[o, blk * BLOCK_VALUES + i] = np.float32(np.int8(w[o, base + 2 + i])) * d


@njit(fastmath=True, cache=True, error_model="numpy")
def dequant_q4_0(w, out):  # uint8 [n, nb·18] -> f32 [n, nb·32]
    half = BLOCK_VALUES // 2
    for o in range(w.shape[0]):
        for blk in range(w.shape[1] // Q4_0_BYTES):
            base = blk * Q4_0_BYTES
            d = _scale(w, o, base)
            for j in range(half):
                b = np.int32(w[o, base + 2 + j])
                out[o, blk * BLOCK_VALUES + j] = np.float32((b & np.int32(15)) - np.int32(8)) * d
                out[o, blk * BLOCK_VALUES + half + j] = np.float32((b >> np.int32(4)) - np.int32(8)) * d
