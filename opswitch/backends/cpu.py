"""``cpu``: the ``blas`` backend plus numba kernels, and weights kept in any format.

What it adds to ``blas``, each for a measured reason (``opswitch bench``):

* decode GEMVs, the lm_head and attention over the cache are numba kernels
  (``cpu_kernels``), so a decode step never wakes OpenBLAS's thread pool and
  only one pool (numba's) runs on the cores; prefill GEMMs stay with sgemm.
* every GEMM runs on numpy's OpenBLAS (``np.matmul``), not scipy's: the two
  wheels ship different builds, and numpy's (0.3.31) was measured 1.2-1.4x
  faster on the skinny products of batched decode (16 rows: 55-62 against
  40-43 GFLOP/s, Zen 3) and no slower on prefill.  Only one of them may run
  in a process: each has a pool of spinning workers, and two pools on the
  same cores made a 512-token prefill 1.6x slower (measured).
* ``f16``, ``bf16`` and ``int8`` weights stay in their stored form and are
  widened in registers inside a fused dequantise-and-multiply GEMV: decode
  reads 2 or 1 bytes per weight instead of 4.  Prefill dequantises one
  matrix at a time into a scratch buffer and runs sgemm (the widening is
  negligible beside a GEMM with hundreds of rows).
* layernorm and GELU in one pass each (GELU with a vectorisable tanh), and a
  causal softmax touching only the visible keys, on the calling thread: in
  prefill OpenBLAS's pool owns the cores, and a second pool beside it was
  measured to make a 512-token prefill 2.2x slower (2440 vs 1104 ms).

Every format computes with exactly the values ``opswitch.core.formats.decode``
gives (the reference ``naive`` uses), accumulating in float32.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from opswitch.backends.blas import GOVERN_MIN, BlasBackend
from opswitch.backends.thread_governor import ThreadGovernor
from opswitch.core import Backend, Probe, formats, hookimpl
from opswitch.core.backend import ENV_THREADS

SERIAL_MAX = 1 << 15  # decode attention over fewer cached values than 4x this runs on one thread
GEMV_MAX_ROWS = 4  # up to this many rows (a small batch), quantised weights run row by row
BLOCKS_GEMV_MAX_ROWS = 8  # up to this many rows, block weights run the fused kernel (read once)
GEMM_MAX_ROWS = 64  # up to this many, one pass over the packed weight for all rows (batched decode)
SLABS = 8  # f32 GEMVs split n_in into this many partial sums whatever the thread count, so a
# result is the same bits on 1 thread or 16 (a batch job's losses on a 1-CPU Ray actor and here)
F32_COLS_MAX_ROWS = 8  # up to this many rows, f32 linears read the weight once in a numba kernel
F32_TABLE_MAX_ROWS = 8  # ...and the tied lm_head takes the packed kernel (OpenBLAS wins at 16, measured)
TABLE_SLICE = 2048  # above that, up to GEMM_MAX_ROWS rows multiply the table this many entries at a time
CHUNK = 1 << 22  # elements dequantised at a time for a GEMM (16 MiB of float32 scratch)
_NO_BIAS = np.empty(0, dtype=np.float32)
F16_FAST_MAX = 2.0**16  # f16 GEMV inputs below this take the pre-scaled kernel (x·2^112 < 2^128)


@dataclass(frozen=True)
class PackedWeight:
    """A matrix in a reduced format, laid out for the kernels.

    data is ``[n_out, n_in]`` (a row per output channel, so each output is one
    contiguous dot product): int8, uint16 bf16 bits or int16 f16 bits.  A
    ``linear`` weight is transposed once from its checkpoint ``[n_in, n_out]``;
    an ``embedding`` table ``[n_vocab, n]`` already has this layout.
    """

    fmt: str
    role: str
    data: np.ndarray
    scale: np.ndarray | None = None

    def stored(self) -> formats.Stored:
        """Back to the reference form (for ``to_host`` and the row gather)."""
        data = self.data.T if self.role == "linear" else self.data
        return formats.Stored(self.fmt, self.role, data.view(np.float16) if self.fmt == "f16" else data,
                              self.scale)


@dataclass(frozen=True)
class Blocks:
    """A q8_0/q4_0 weight: the ``Stored`` blocks, a row per output channel (already
    the kernels' layout for every role, so nothing is transposed or copied)."""

    stored: formats.Stored


def uploaded_fmt(weight: PackedWeight | Blocks) -> str:
    return weight.fmt if isinstance(weight, PackedWeight) else weight.stored.fmt


class CpuBackend(BlasBackend):
    name = "cpu"
    priority = 60  # above blas: faster in every workload of the side-by-side table (README)
    description = "blas + numba: fused dequantising GEMV for f16/bf16/int8, one thread pool in decode"
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    weight_formats = formats.FORMATS
    blas_library = ("numpy.libs", "/numpy/")  # see the module docstring

    def __init__(self, dtype: str = "float32", device: str | None = None) -> None:
        super().__init__(dtype, device)
        self._local = threading.local()  # per-thread scratch for dequantised tiles
        self._warmed: set[str] = set()  # weight and cache formats whose kernels are loaded

    def _probe_impl(self) -> Probe:
        base = super()._probe_impl()
        if not base.available:
            return base
        wanted = os.environ.get(ENV_THREADS)
        if wanted and "numba" not in sys.modules:
            # numba's thread count is fixed when it starts its pool (set_num_threads
            # would only apply to the calling thread, and probes may run in another)
            os.environ["NUMBA_NUM_THREADS"] = str(max(1, int(wanted)))
        try:
            import numba

            from opswitch.backends import cpu_blocks, cpu_kernels
        except ImportError as exc:
            return Probe.missing(f"{exc.name} is not installed: pip install 'opswitch[jit]'")
        self._k, self._kb = cpu_kernels, cpu_blocks
        self._threads = numba.config.NUMBA_NUM_THREADS
        self._numba_set_threads = numba.set_num_threads
        # one governor for both pools: decode runs numba's, prefill OpenBLAS's
        self._governor = ThreadGovernor(self._threads if self._adapt() else 1, self._set_threads)
        return Probe.ok(f"{base.device}; numba {numba.__version__}, {self._threads} threads")

    def _prepare_impl(self) -> None:
        """Load every f32 model's kernels now (numba loads cached machine code on a kernel's
        first call, 20-50 ms each): otherwise the first prompt pays ~0.4 s and reports it as
        prefill time."""
        k, f32 = self._k, np.float32
        x, w = np.ones((1, 8), f32), np.ones((8, 4), f32)
        self.linear(x, w, np.zeros(4, f32))  # gemv_cols_f32
        self.linear(np.ones((2, 8), f32), w, np.zeros(4, f32))  # gemm_cols_f32
        self.matmul(x, np.ones((4, 8), f32), transpose_b=True)  # gemv_rows_f32
        self.layernorm(x, np.ones(8, f32), np.zeros(8, f32))
        self.gelu(x)
        row, cache = np.ones(24, f32), np.zeros((1, 4, 8), f32)
        for attend in (k.decode_attention_serial, k.decode_attention):
            attend(row, cache, cache.copy(), 0, f32(1.0), np.empty(8, f32))
        k.causal_softmax(np.ones((2, 2), f32), 0)

    def _set_threads(self, n: int) -> None:
        self._numba_set_threads(min(n, self._threads))  # numba's count is per calling thread
        super()._set_threads(n)

    def _run(self, kernel, *args) -> None:
        """A parallel numba kernel, with the thread count the governor picks for its shape."""
        self._governor.run((kernel.__name__, args[0].shape), kernel, *args)

    def _warm(self, what: str) -> bool:
        """True the first time ``what`` is asked for: its kernels are to be loaded now."""
        if what in self._warmed:
            return False
        self._warmed.add(what)
        return True

    def _warm_products(self, fmt: str) -> None:
        """Load (or, on a fresh install, compile: seconds) a reduced format's kernels when its
        first weight is uploaded, so that model loading pays for them and the first prompt's
        prefill and decode rates are the real ones (a fresh install's first int8 run reported
        1.2 tok/s), and a server's first request does not wait."""
        tiny = self._upload(formats.encode(np.ones((64, 8), np.float32), fmt, "linear"))
        for rows in (1, 9, 65):  # the GEMV, the few-row kernel, the dequantised GEMM
            self.linear(np.ones((rows, 64), np.float32), tiny)

    def alloc_kv(self, shape: tuple[int, ...], fmt: str = "f32") -> Any:
        if fmt == "f16" and self._warm("kv:f16"):  # the f16 cache's attention kernels, as above
            keys, values = np.zeros((1, 4, 8), np.float16), np.zeros((1, 4, 8), np.float16)
            self.attention(np.ones((2, 24), np.float32), 1, keys, values, 0)
            self.attention(np.ones((1, 24), np.float32), 1, keys, values, 2)
            self._k.decode_attention(np.ones(24, np.float32), keys.view(np.int16), values.view(np.int16), 2,
                                     np.float32(1.0), np.empty(8, np.float32))
        return super().alloc_kv(shape, fmt)

    # -- weights ---------------------------------------------------------------
    def upload_weight(self, stored: formats.Stored) -> Any:
        uploaded = self._upload(stored)
        if isinstance(uploaded, (PackedWeight, Blocks)) and self._warm(uploaded_fmt(uploaded)):
            self._warm_products(uploaded_fmt(uploaded))
        return uploaded

    def _upload(self, stored: formats.Stored) -> Any:
        if stored.fmt == "f32":
            return super().upload_weight(stored)
        if stored.fmt in formats.BLOCK_FORMATS:
            return self._upload_blocks(stored)
        data = stored.data
        if stored.fmt == "f16":
            if not np.isfinite(data).all():  # the bit trick covers finite values only
                return super().upload_weight(formats.Stored("f32", stored.role, formats.decode(stored)))
            data = data.view(np.int16)
        if stored.role == "linear":
            data = data.T
        return PackedWeight(stored.fmt, stored.role, np.ascontiguousarray(data), stored.scale)

    def to_host(self, x: Any) -> np.ndarray:
        if isinstance(x, Blocks):
            return formats.decode(x.stored)
        return formats.decode(x.stored()) if isinstance(x, PackedWeight) else np.asarray(x)

    # -- products --------------------------------------------------------------
    def linear(self, x, w, b=None):  # [n_rows, n_in], [n_in, n_out] -> [n_rows, n_out]
        if isinstance(w, (PackedWeight, Blocks)):
            out = self._blocks_product(x, w) if isinstance(w, Blocks) else self._packed_product(x, w)
            if b is not None:
                out += b
            return out
        m, n_out = x.shape[0], w.shape[1]
        bias = _NO_BIAS if b is None else b
        if m == 1:
            out = np.empty((1, n_out), dtype=np.float32)
            partial = np.empty((SLABS, n_out), dtype=np.float32)
            self._run(self._k.gemv_cols_f32, w, np.ascontiguousarray(x[0]), bias, partial, out[0])
            return out
        if m <= F32_COLS_MAX_ROWS:
            out = np.empty((m, n_out), dtype=np.float32)
            partial = np.empty((SLABS, m, n_out), dtype=np.float32)
            self._run(self._k.gemm_cols_f32, w, np.ascontiguousarray(x, dtype=np.float32), bias, partial, out)
            return out
        out = self._product(x, w)
        if b is not None:
            out += b
        return out

    def matmul(self, a, b, transpose_b=False):  # [m, k] @ [k, n] (or [n, k]ᵀ) -> [m, n]
        if isinstance(b, Blocks) and transpose_b and b.stored.role != "linear":
            return self._blocks_product(a, b)
        if isinstance(b, PackedWeight) and transpose_b and b.role != "linear":
            return self._packed_product(a, b)
        if isinstance(b, (PackedWeight, Blocks)):
            b = self.to_host(b)
        if a.shape[0] == 1 and transpose_b:  # the tied lm_head in decode: dot products
            out = np.empty((1, b.shape[0]), dtype=np.float32)
            self._run(self._k.gemv_rows_f32, b, np.ascontiguousarray(a[0]), out[0])
            return out
        if transpose_b and a.shape[0] <= F32_TABLE_MAX_ROWS and b.dtype == np.float32:  # batched decode
            out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
            a = np.ascontiguousarray(a, dtype=np.float32)
            self._run(self._k.gemm_rows_packed, np.ascontiguousarray(b), self._ones(b.shape[0]), a, out)
            return out
        if transpose_b and a.shape[0] <= GEMM_MAX_ROWS and b.shape[0] > 2 * TABLE_SLICE:
            return self._table_product(a, b)
        return self._product(a, b.T if transpose_b else b)

    def _table_product(self, a: np.ndarray, table: np.ndarray) -> np.ndarray:
        """a [m, n] times a large table [n_vocab, n] transposed (the tied lm_head of a batched
        decode step), a slice of the table at a time: one sgemm over the 50257-entry table at
        16 rows ran 1.2-1.5x slower than 2048-entry slices (whose packed panels stay in L2),
        measured on Zen 3 in and out of the model."""
        n_vocab = table.shape[0]
        out_t = np.empty((n_vocab, a.shape[0]), dtype=np.float32)
        a_t = np.ascontiguousarray(a.T, dtype=np.float32)
        for lo in range(0, n_vocab, TABLE_SLICE):
            hi = min(n_vocab, lo + TABLE_SLICE)
            self._product(table[lo:hi], a_t, out=out_t[lo:hi])
        return np.ascontiguousarray(out_t.T)

    def _product(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``a @ b`` on numpy's OpenBLAS (the module docstring says why), with the thread
        count the governor has chosen, never a probe's (sgemm's bits depend on it)."""
        if a.size < GOVERN_MIN and b.size < GOVERN_MIN:
            return np.matmul(a, b, out=out)
        return self._governor.follow(np.matmul, a, b, out=out)  # its bits depend on the count

    def _packed_product(self, x, w: PackedWeight) -> np.ndarray:
        """x [m, n_in] times the packed [n_out, n_in] transposed: [m, n_out]."""
        n_out, n_in = w.data.shape
        out = np.empty((x.shape[0], n_out), dtype=np.float32)
        if x.shape[0] <= GEMV_MAX_ROWS:
            for r in range(x.shape[0]):
                self._packed_gemv(w, np.ascontiguousarray(x[r], dtype=np.float32), out[r])
            return out
        if x.shape[0] <= GEMM_MAX_ROWS:
            scale = w.scale if w.scale is not None else self._ones(n_out)
            self._run(self._k.gemm_rows_packed, w.data, scale, np.ascontiguousarray(x, dtype=np.float32), out)
            return out
        step = max(1, CHUNK // n_in)
        for lo in range(0, n_out, step):
            hi = min(n_out, lo + step)
            self._product(x, self._dequantise(w, lo, hi).T, out=out[:, lo:hi])
        return out

    # -- the block formats (q8_0, q4_0): the GGUF bytes as they are ------------------
    def _upload_blocks(self, stored: formats.Stored) -> Any:
        if not np.isfinite(formats.block_scales(stored)).all():  # the kernels' f16 widening is for finite d
            return super().upload_weight(formats.Stored("f32", stored.role, formats.decode(stored)))
        data = np.ascontiguousarray(stored.data)  # a mapped GGUF tensor already is: no copy
        return Blocks(formats.Stored(stored.fmt, stored.role, data, None, stored.shape))

    def _blocks_product(self, x, w: Blocks) -> np.ndarray:
        """x [m, n_in] times the blocks' [n_out, n_in] transposed: [m, n_out]."""
        data, fmt = w.stored.data, w.stored.fmt
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], data.shape[0]), dtype=np.float32)
        if x.shape[0] <= BLOCKS_GEMV_MAX_ROWS:  # decode and small batches: the fused kernel
            self._run(self._kb.gemm_q8_0 if fmt == "q8_0" else self._kb.gemm_q4_0, data, x, out)
            return out
        dequant = self._kb.dequant_q8_0 if fmt == "q8_0" else self._kb.dequant_q4_0
        n_in = x.shape[1]
        step = max(1, CHUNK // n_in)
        for lo in range(0, data.shape[0], step):
            hi = min(data.shape[0], lo + step)
            dense = self._scratch(hi - lo, n_in)
            dequant(data[lo:hi], dense)
            self._product(x, dense.T, out=out[:, lo:hi])
        return out

    def _scratch(self, rows: int, n: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < rows * n:
            buf = self._local.buf = np.empty(rows * n, dtype=np.float32)
        return buf[: rows * n].reshape(rows, n)

    def _packed_gemv(self, w: PackedWeight, x: np.ndarray, out: np.ndarray) -> None:
        k = self._k
        if w.fmt == "int8":
            self._run(k.gemv_rows_int8, w.data, w.scale, x, out)
        elif w.fmt == "bf16":
            self._run(k.gemv_rows_bf16, w.data, x, out)
        elif not k.NATIVE_HALF and np.abs(x).max() < F16_FAST_MAX:  # x·2^112 finite: exact too
            self._run(k.gemv_rows_f16, w.data, x * k.F16_SCALE, out)
        else:  # F16C's conversion, or (also for NaN) the integer form that never scales x
            self._run(k.gemv_rows_f16_exact, w.data, x, out)

    def _ones(self, n: int) -> np.ndarray:
        ones = getattr(self, "_ones_cache", None)
        if ones is None or ones.size < n:
            ones = self._ones_cache = np.ones(n, dtype=np.float32)
        return ones[:n]

    def _dequantise(self, w: PackedWeight, lo: int, hi: int) -> np.ndarray:
        n_in = w.data.shape[1]
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < (hi - lo) * n_in:
            buf = self._local.buf = np.empty((hi - lo) * n_in, dtype=np.float32)
        dense = buf[: (hi - lo) * n_in].reshape(hi - lo, n_in)
        k, rows = self._k, w.data[lo:hi]
        if w.fmt == "int8":
            k.dequant_int8(rows, w.scale[lo:hi], dense)  # type: ignore[index]
        elif w.fmt == "bf16":
            k.dequant_bf16(rows, dense)
        else:
            k.dequant_f16(rows, dense)
        return dense

    def embedding(self, table, ids):
        if isinstance(table, Blocks):  # decode only the gathered rows
            return formats.dequantize_rows(table.stored.data[np.asarray(ids)], table.stored.fmt)
        if isinstance(table, PackedWeight):  # widen only the gathered rows
            ids = np.asarray(ids)
            scale = None if table.scale is None else table.scale[ids]
            rows = table.data[ids].view(np.float16) if table.fmt == "f16" else table.data[ids]
            return formats.decode(formats.Stored(table.fmt, table.role, rows, scale))
        return super().embedding(table, ids)

    # -- one-pass elementwise ops and attention ---------------------------------
    def layernorm(self, x, g, b, eps=1e-5):
        x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
        out = np.empty_like(x2)
        self._k.layernorm(x2, np.ascontiguousarray(g), np.ascontiguousarray(b), np.float32(eps), out)
        return out.reshape(x.shape)

    def gelu(self, x):
        x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1] if x.ndim else 1)
        out = np.empty_like(x2)
        self._k.gelu(x2, out)
        return out.reshape(x.shape)

    def attention_batch(self, qkv, n_head, step):  # [step.n_rows, 3 * n_embd] -> [step.n_rows, n_embd]
        if step.n_rows != len(step.caches):  # some sequence brings several rows: per sequence, as blas
            return super().attention_batch(qkv, n_head, step)
        qkv = np.ascontiguousarray(qkv)
        out = np.empty((qkv.shape[0], qkv.shape[1] // 3), dtype=np.float32)
        for i, ((k_cache, v_cache), start) in enumerate(zip(step.caches, step.starts)):
            self._decode_attention(qkv[i], k_cache, v_cache, start, out[i])
        return out

    def attention(self, qkv, n_head, k_cache, v_cache, start, out=None):
        n_new, n_embd = qkv.shape[0], qkv.shape[1] // 3
        if n_new > 1:
            return self._prefill_attention(qkv, n_head, k_cache, v_cache, start, out)
        if out is None:
            out = np.empty((1, n_embd), dtype=np.float32)
        self._decode_attention(np.ascontiguousarray(qkv[0]), k_cache, v_cache, start, out[0])
        return out

    def _decode_attention(self, row, k_cache, v_cache, start, out) -> None:
        """One new row (decode): the kernel writes its key and value and attends."""
        n_head, _, d = k_cache.shape
        if k_cache.dtype == np.float16:  # numpy rounds to f16; the kernels widen the bits in registers
            e = n_head * d
            k_cache[:, start] = row[e : 2 * e].reshape(n_head, d)
            v_cache[:, start] = row[2 * e :].reshape(n_head, d)
            k_cache, v_cache = k_cache.view(np.int16), v_cache.view(np.int16)
        k, scale = self._k, np.float32(1.0 / math.sqrt(d))
        if (start + 1) * n_head * d < SERIAL_MAX * 4:
            k.decode_attention_serial(row, k_cache, v_cache, start, scale, out)
        else:  # keyed by the row's shape: the time grows with start, slowly beside a probe's period
            self._run(k.decode_attention, row, k_cache, v_cache, start, scale, out)

    def _prefill_attention(self, qkv, n_head, k_cache, v_cache, start, out):
        """Many new rows: two GEMMs per head over its contiguous ``[n_kv, d]`` keys and
        values (``blas``'s scheme, on numpy's OpenBLAS), a causal softmax between them."""
        n_new, n_embd = qkv.shape[0], qkv.shape[1] // 3
        d, end = n_embd // n_head, start + n_new
        self._store_rows(qkv, n_head, k_cache, v_cache, start)
        if out is None:
            out = np.empty((n_new, n_embd), dtype=np.float32)
        scale = np.float32(1.0 / math.sqrt(d))
        for h in range(n_head):
            cols = slice(h * d, (h + 1) * d)
            keys, values = k_cache[h, :end], v_cache[h, :end]
            if keys.dtype != np.float32:  # an f16 cache: widened once per head, as BLAS needs
                keys, values = keys.astype(np.float32), values.astype(np.float32)
            scores = self._product(qkv[:, cols], keys.T)
            scores *= scale
            self._k.causal_softmax(scores, start)
            self._product(scores, values, out=out[:, cols])
        return out


@hookimpl
def opswitch_backends() -> list[type[Backend]]:
    return [CpuBackend]
