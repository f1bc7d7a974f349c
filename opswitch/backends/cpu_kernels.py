"""numba kernels of the ``cpu`` backend: fused dequantise-and-multiply GEMV,
dequantisation for prefill GEMMs, and one-pass layernorm and GELU.

Why numba: decode reads every weight once per token, so it is bound by
memory traffic; reading 1- or 2-byte weights and widening them in registers
halves or quarters that traffic, and numpy cannot do it without first
converting the whole matrix (which reads it anyway, and writes 4 bytes).

Weights here are ``[n_out, n_in]`` (one output channel per row, like
torch's ``Linear``): each output is one contiguous dot product, and the
per-channel int8 scale is applied once per output.  All kernels accumulate
in float32.  Importing this module needs numba (``pip install 'opswitch[jit]'``).
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import binding, ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# error_model="numpy" everywhere: a division by zero gives inf/NaN as in numpy (and every other
# backend), which the logits check reports, instead of numba's ZeroDivisionError from inside an op.
ROWS = 16  # output rows per parallel task: enough work to amortise scheduling
F16_SCALE = np.float32(2.0**112)  # f16 bits placed in an f32 exponent field are 2^-112 too small
_F16_REBIAS = np.int32(112 << 23)  # f16's exponent bias is 15, f32's 127


@intrinsic
def _as_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as float32 (vectorisable, unlike a view)."""
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width != 32:  # numba widens shifts to 64 bits
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return sig, codegen


@njit(inline="always", error_model="numpy")
def _bf16(h):  # uint16 bf16 bits -> float32: the upper half of an f32
    return _as_f32(np.uint32(h) << np.uint32(16))


@njit(inline="always", error_model="numpy")
def _f16_scaled(h):  # int16 f16 bits -> float32 value * 2^-112 (finite values, subnormals too)
    return _as_f32((np.int32(h) << np.int32(13)) & np.int32(-1879056384))  # mask 0x8FFFE000


@njit(inline="always", error_model="numpy")
def _f16(h):
    """int16 f16 bits -> the float32 of the same value, exactly (finite values: infinities and
    NaN are uploaded as f32).  Normal numbers move their exponent by 112 in the integer
    domain; subnormals (exponent 0) take the scaled form times 2^112, a power of two.  The
    input is never scaled, so no activation a float32 holds can overflow here."""
    bits = np.int32(h)
    magnitude = bits & np.int32(0x7FFF)
    sign = (bits & np.int32(0x8000)) << np.int32(16)
    normal = _as_f32(sign | ((magnitude << np.int32(13)) + _F16_REBIAS))
    return normal if magnitude >= np.int32(0x0400) else _f16_scaled(h) * F16_SCALE


@intrinsic
def _half_fpext(typingctx, bits):
    """int16 f16 bits -> float32 by LLVM's ``fpext half``: one vcvtph2ps per 8 values with
    F16C, exact for every pattern (subnormals, infinities, NaN)."""
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width != 16:
            value = builder.trunc(value, ir.IntType(16))
        return builder.fpext(builder.bitcast(value, ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(inline="always", error_model="numpy")
def _half_portable(h):
    """The same in integer arithmetic, for CPUs without a half-precision conversion (where
    LLVM would call a runtime helper numba's JIT may lack): ``_f16`` plus infinities and NaN."""
    bits = np.int32(h)
    magnitude = bits & np.int32(0x7FFF)
    if magnitude >= np.int32(0x7C00):
        sign = (bits & np.int32(0x8000)) << np.int32(16)
        return _as_f32(sign | np.int32(0x7F800000) | ((magnitude & np.int32(0x3FF)) << np.int32(13)))
    return _f16(h)


def native_half() -> bool:
    """Does this CPU convert half to float in one instruction (x86 F16C; every 64-bit ARM)?"""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        return bool(binding.get_host_cpu_features().get("f16c"))
    except RuntimeError:  # features unknown: take the path that needs nothing
        return False


# chosen once, at import, from what this CPU has; both are tested on every pattern
NATIVE_HALF = native_half()
_half = _half_fpext if NATIVE_HALF else _half_portable


def _kv(x):  # a cached key or value as float32: f32 caches as they are, f16 ones (int16 bits) widened
    return x


@overload(_kv, inline="always")
def _kv_overload(x):
    if isinstance(x, types.Integer):
        return lambda x: _half(x)
    return lambda x: x


# -- GEMV on a table [n_out, n_in] (lm_head): out[o] = scale[o] * (w[o] . x) -------
@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def gemv_rows_f32(w, x, out):  # f32 [n_out, n_in]
    n_out, n_in = w.shape
    for blk in prange((n_out + ROWS - 1) // ROWS):
        for o in range(blk * ROWS, min(n_out, (blk + 1) * ROWS)):
            acc = np.float32(0.0)
            for i in range(n_in):
                acc += w[o, i] * x[i]
            out[o] = acc


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def gemv_rows_int8(w, scale, x, out):  # int8 [n_out, n_in], f32 [n_out], f32 [n_in] -> [n_out]
    n_out, n_in = w.shape
    for blk in prange((n_out + ROWS - 1) // ROWS):
        for o in range(blk * ROWS, min(n_out, (blk + 1) * ROWS)):
            acc = np.float32(0.0)
            for i in range(n_in):
                acc += np.float32(w[o, i]) * x[i]
            out[o] = acc * scale[o]


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def gemv_rows_bf16(w, x, out):  # uint16 [n_out, n_in] bf16 bits
    n_out, n_in = w.shape
    for blk in prange((n_out + ROWS - 1) // ROWS):
        for o in range(blk * ROWS, min(n_out, (blk + 1) * ROWS)):
            acc = np.float32(0.0)
            for i in range(n_in):
                acc += _bf16(w[o, i]) * x[i]
            out[o] = acc


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def gemv_rows_f16(w, x, out):  # int16 [n_out, n_in] f16 bits; x pre-scaled by 2^112 (|x| < 2^16)
    n_out, n_in = w.shape
    for blk in prange((n_out + ROWS - 1) // ROWS):
        for o in range(blk * ROWS, min(n_out, (blk + 1) * ROWS)):
            acc = np.float32(0.0)
            for i in range(n_in):
                acc += _f16_scaled(w[o, i]) * x[i]
            out[o] = acc


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def gemv_rows_f16_exact(w, x, out):
    """int16 [n_out, n_in] f16 bits, any x: widened by ``_half``.  With F16C that is one
    vcvtph2ps per 8 weights, as fast as the pre-scaled kernel (measured) and with no pass
    over x first; without it, the integer path, ~4x slower."""
    n_out, n_in = w.shape
    for blk in prange((n_out + ROWS - 1) // ROWS):
        for o in range(blk * ROWS, min(n_out, (blk + 1) * ROWS)):
            acc = np.float32(0.0)
            for i in range(n_in):
                acc += _half(w[o, i]) * x[i]
            out[o] = acc


# -- small batches (a few to GEMM_MAX_ROWS rows): each weight read from memory once per step ----
def _weight(x):  # a packed weight as float32: int8 as is (scaled after), bf16 uint16 bits, f16 int16 bits
    return x


@overload(_weight, inline="always")
def _weight_overload(x):
    if isinstance(x, types.Integer) and x.bitwidth == 16:
        if x.signed:
            return lambda x: _half(x)
        return lambda x: _bf16(x)
    return lambda x: np.float32(x)


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def gemm_rows_packed(w, scale, x, out):
    """out [m, n_out] = x [m, n_in] · w [n_out, n_in]ᵀ (times scale [n_out] for int8; ones
    otherwise).  Each weight row is widened once into an L1-resident buffer and used by every
    row of x, four at a time (one load of the weight per four FMAs): decode of a batch reads
    the packed matrix once per step, where one GEMV per row would read it m times."""
    n_out, n_in = w.shape
    m = x.shape[0]
    for blk in prange((n_out + ROWS - 1) // ROWS):
        row = np.empty(n_in, dtype=np.float32)
        for o in range(blk * ROWS, min(n_out, (blk + 1) * ROWS)):
            for i in range(n_in):
                row[i] = _weight(w[o, i])
            s = scale[o]
            r = 0
            while r + 4 <= m:
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for i in range(n_in):
                    wi = row[i]
                    a0 += wi * x[r, i]
                    a1 += wi * x[r + 1, i]
                    a2 += wi * x[r + 2, i]
                    a3 += wi * x[r + 3, i]
                out[r, o], out[r + 1, o], out[r + 2, o], out[r + 3, o] = a0 * s, a1 * s, a2 * s, a3 * s
                r += 4
            while r < m:
                acc = np.float32(0.0)
                for i in range(n_in):
                    acc += row[i] * x[r, i]
                out[r, o] = acc * s
                r += 1


# -- f32 GEMV on a Conv1D weight [n_in, n_out]: split the rows (k) between threads --
# Each thread streams one contiguous slab of the weight into its own partial sums
# (n_out floats, in L1/L2), four weight rows per pass over them; the caller adds
# the partials.  The checkpoint layout is used as it is (memory-mapped, no copy).
# Quantised weights are transposed once at upload instead and use the row
# kernels above: widening 1- or 2-byte values costs instructions, and the dot
# form does it once per weight with no partial sums to reload (measured faster).
@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def gemv_cols_f32(w, x, bias, partial, out):
    """f32 [n_in, n_out] · [n_in] (+ bias [n_out]; size 0: none) -> out [n_out], through
    partial [n_part, n_out]: one slab per thread, then the partials and the bias are added
    on the calling thread inside this call (no second pass, no numpy reduction to dispatch)."""
    n_in, n_out = w.shape
    n_part = partial.shape[0]
    for t in prange(n_part):
        lo, hi = t * n_in // n_part, (t + 1) * n_in // n_part
        acc = partial[t]
        acc[:] = 0.0
        i = lo
        while i + 4 <= hi:
            x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            for j in range(n_out):
                acc[j] += x0 * w[i, j] + x1 * w[i + 1, j] + x2 * w[i + 2, j] + x3 * w[i + 3, j]
            i += 4
        while i < hi:
            xi = x[i]
            for j in range(n_out):
                acc[j] += xi * w[i, j]
            i += 1
    for j in range(n_out):
        out[j] = bias[j] if bias.size else np.float32(0.0)
    for t in range(n_part):
        for j in range(n_out):
            out[j] += partial[t, j]


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def gemm_cols_f32(w, x, bias, partial, out):
    """The same for a few rows: x [m, n_in] · w [n_in, n_out] (+ bias) -> out [m, n_out],
    through partial [n_part, m, n_out].  Each group of four weight rows is read from memory
    once and used by every row of x while it is in L1, so a batch of 2-8 reads the weight
    once per step (OpenBLAS's sgemm at 2 rows was slower than one row twice, measured).
    Kept apart from the one-row kernel above: its row loop made one row 1.6x slower."""
    n_in, n_out = w.shape
    m = x.shape[0]
    n_part = partial.shape[0]
    for t in prange(n_part):
        lo, hi = t * n_in // n_part, (t + 1) * n_in // n_part
        acc = partial[t]
        acc[:] = 0.0
        i = lo
        while i + 4 <= hi:
            for r in range(m):
                x0, x1, x2, x3 = x[r, i], x[r, i + 1], x[r, i + 2], x[r, i + 3]
                a = acc[r]
                for j in range(n_out):
                    a[j] += x0 * w[i, j] + x1 * w[i + 1, j] + x2 * w[i + 2, j] + x3 * w[i + 3, j]
            i += 4
        while i < hi:
            for r in range(m):
                xi = x[r, i]
                a = acc[r]
                for j in range(n_out):
                    a[j] += xi * w[i, j]
            i += 1
    for r in range(m):
        for j in range(n_out):
            out[r, j] = bias[j] if bias.size else np.float32(0.0)
        for t in range(n_part):
            for j in range(n_out):
                out[r, j] += partial[t, r, j]


# -- dequantisation (prefill: widen once, then one sgemm; serial, as OpenBLAS runs) ---
@njit(fastmath=True, cache=True, error_model="numpy")
def dequant_int8(w, scale, out):  # int8 [n, k], f32 [n] -> f32 [n, k]
    for o in range(w.shape[0]):
        s = scale[o]
        for i in range(w.shape[1]):
            out[o, i] = np.float32(w[o, i]) * s


@njit(fastmath=True, cache=True, error_model="numpy")
def dequant_bf16(w, out):
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            out[o, i] = _bf16(w[o, i])


@njit(fastmath=True, cache=True, error_model="numpy")
def dequant_f16(w, out):
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            out[o, i] = _f16_scaled(w[o, i]) * F16_SCALE


# -- one-pass elementwise ops ---------------------------------------------------------
@njit(fastmath=True, inline="always", error_model="numpy")
def _tanh(x):
    """tanh as Eigen's float rational approximation (|err| ~ 1 ulp, no libm call, so it
    vectorises): odd 13/6 polynomial ratio on x clamped to ±7.9 (tanh = ±1 in float32)."""
    x = min(max(x, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    p = p * x
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return p / q


@njit(fastmath=True, inline="always", error_model="numpy")
def _gelu_row(x, out, r):
    c = np.float32(0.7978845608028654)
    for i in range(x.shape[1]):
        v = x[r, i]
        inner = c * (v + np.float32(0.044715) * v * v * v)
        out[r, i] = np.float32(0.5) * v * (np.float32(1.0) + _tanh(inner))


@njit(fastmath=True, inline="always", error_model="numpy")
def _layernorm_row(x, g, b, eps, out, r):  # two reads and one write of the row
    n = x.shape[1]
    mean = np.float32(0.0)
    for i in range(n):
        mean += x[r, i]
    mean /= n
    var = np.float32(0.0)
    for i in range(n):
        d = x[r, i] - mean
        var += d * d
    inv = np.float32(1.0) / np.sqrt(var / n + eps)
    for i in range(n):
        out[r, i] = (x[r, i] - mean) * inv * g[i] + b[i]


# Elementwise ops run on the calling thread: in decode a row is shorter than the
# ~20 µs it takes to wake a pool, and in prefill OpenBLAS's pool owns the cores
# (numba's pool spinning beside it made a 512-token prefill 2.2x slower, measured).
@njit(fastmath=True, cache=True, error_model="numpy")
def gelu(x, out):  # [n_rows, n] -> [n_rows, n], tanh approximation in one pass
    for r in range(x.shape[0]):
        _gelu_row(x, out, r)


@njit(fastmath=True, cache=True, error_model="numpy")
def layernorm(x, g, b, eps, out):  # [n_rows, n] -> [n_rows, n]
    for r in range(x.shape[0]):
        _layernorm_row(x, g, b, eps, out, r)


@njit(fastmath=True, inline="always", error_model="numpy")
def _exp(x):
    """exp for x <= 0 (softmax after subtracting the max), vectorisable: 2^n · p(r) with
    Cephes' degree-5 polynomial on r in [-ln2/2, ln2/2] (|rel err| < 2e-7)."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _as_f32((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(fastmath=True, cache=True, error_model="numpy")
def causal_softmax(scores, start):  # [n_q, n_k] in place; query i sees keys 0 .. start + i
    n_q, n_k = scores.shape
    for i in range(n_q):
        last = min(n_k, start + i + 1)
        m = scores[i, 0]
        for j in range(1, last):
            m = max(m, scores[i, j])
        total = np.float32(0.0)
        for j in range(last):
            e = _exp(scores[i, j] - m)
            scores[i, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(last):
            scores[i, j] *= inv
        for j in range(last, n_k):
            scores[i, j] = 0.0


HEAD_DIM = 64  # every GPT-2 size's head: a compile-time trip count the compiler unrolls


@njit(fastmath=True, inline="always", error_model="numpy")
def _attend(q, k_cache, v_cache, end, scale, out, h, d):
    s = np.empty(end, dtype=np.float32)
    t = 0
    while t + 4 <= end:  # four keys at a time: four independent dot products in flight
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for c in range(d):
            qc = q[h, c]
            a0 += qc * _kv(k_cache[h, t, c])
            a1 += qc * _kv(k_cache[h, t + 1, c])
            a2 += qc * _kv(k_cache[h, t + 2, c])
            a3 += qc * _kv(k_cache[h, t + 3, c])
        s[t], s[t + 1], s[t + 2], s[t + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        t += 4
    while t < end:
        acc = np.float32(0.0)
        for c in range(d):
            acc += q[h, c] * _kv(k_cache[h, t, c])
        s[t] = acc * scale
        t += 1
    m = np.float32(-np.inf)
    for t in range(end):
        m = max(m, s[t])
    total = np.float32(0.0)
    for t in range(end):
        e = _exp(s[t] - m)
        s[t] = e
        total += e
    o = np.zeros(d, dtype=np.float32)  # local: the compiler keeps it out of memory
    for t in range(end):
        p = s[t]
        for c in range(d):
            o[c] += p * _kv(v_cache[h, t, c])
    inv = np.float32(1.0) / total
    for c in range(d):
        out[h, c] = o[c] * inv


@njit(fastmath=True, inline="always", error_model="numpy")
def _attend_head(q, k_cache, v_cache, end, scale, out, h):
    """One head's query over its cached rows 0..end: scores, softmax, weighted values.
    10-30 % faster with the head size known when compiling (measured, 900 rows)."""
    if q.shape[1] == HEAD_DIM:
        _attend(q, k_cache, v_cache, end, scale, out, h, HEAD_DIM)
    else:
        _attend(q, k_cache, v_cache, end, scale, out, h, q.shape[1])


def _store_row(k_cache, v_cache, row, start):  # a new row's key and value into float32 caches
    pass


@overload(_store_row, inline="always")
def _store_row_overload(k_cache, v_cache, row, start):
    if isinstance(k_cache.dtype, types.Integer):  # f16 bits: the caller rounds and writes them
        return lambda k_cache, v_cache, row, start: None

    def store(k_cache, v_cache, row, start):
        n_head, _, d = k_cache.shape
        e = n_head * d
        for h in range(n_head):
            for c in range(d):
                k_cache[h, start, c] = row[e + h * d + c]
                v_cache[h, start, c] = row[2 * e + h * d + c]

    return store


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def decode_attention(row, k_cache, v_cache, start, scale, out):
    """One new row of one sequence: ``row`` [3 * n_embd] is its q, k and v; caches
    [n_head, cap, d] (float32, or int16 f16 bits written by the caller); out [n_embd].
    The key and value go in at ``start``, then each head attends over rows 0..start,
    reading its keys and values once."""
    n_head, _, d = k_cache.shape
    _store_row(k_cache, v_cache, row, start)
    q = row[: n_head * d].reshape(n_head, d)
    o = out.reshape(n_head, d)
    for h in prange(n_head):
        _attend_head(q, k_cache, v_cache, start + 1, scale, o, h)


@njit(fastmath=True, cache=True, error_model="numpy")
def decode_attention_serial(row, k_cache, v_cache, start, scale, out):
    n_head, _, d = k_cache.shape
    _store_row(k_cache, v_cache, row, start)
    q = row[: n_head * d].reshape(n_head, d)
    o = out.reshape(n_head, d)
    for h in range(n_head):
        _attend_head(q, k_cache, v_cache, start + 1, scale, o, h)


@njit(cache=True, error_model="numpy")
def widen_half(bits, out):  # int16 f16 bits [n] -> float32 [n], with the kernels' conversion (tests)
    for i in range(bits.shape[0]):
        out[i] = _half(bits[i])


@njit(cache=True, error_model="numpy")
def widen_half_portable(bits, out):  # the integer path, whatever this CPU has (tests)
    for i in range(bits.shape[0]):
        out[i] = _half_portable(bits[i])
