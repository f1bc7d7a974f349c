"""``blas``: the CPU backend, calling BLAS directly through scipy.

Why not just ``x @ w + b``?  Two costs numpy pays that we need not: the
bias add is a second pass over the output (we fold it into the GEMM by
pre-filling the output and using beta=1), and single-token decode goes
through GEMM although GEMV is the right kernel.  Attention reads the
caller's head-major cache in place: one head's keys are a contiguous
``[n_kv, head_dim]`` matrix, so no step copies the cache.

Arrays are C-ordered numpy; a C-ordered ``[m, n]`` is a Fortran ``[n, m]``,
so ``y = x @ w`` is computed as the Fortran ``yᵀ = wᵀ xᵀ`` with no copies.
"""

from __future__ import annotations

import math
import os
from typing import ClassVar

import numpy as np

from opswitch.backends.thread_governor import ThreadGovernor
from opswitch.core import Backend, Probe, hookimpl
from opswitch.core import ops as reference
from opswitch.core.backend import ENV_THREADS

ENV_ADAPT = "OPSWITCH_ADAPT_THREADS"  # "0": always the full thread count (to measure what adapting buys)
GOVERN_MIN = 1 << 16  # BLAS calls on matrices smaller than this run on one thread anyway: not timed


class BlasBackend(Backend):
    name = "blas"
    priority = 50
    description = "scipy.linalg.blas GEMM/GEMV with fused bias; attention over the cache in place"
    dtypes: ClassVar[tuple[str, ...]] = ("float32", "float64")
    kv_formats: ClassVar[tuple[str, ...]] = ("f32", "f16")  # an f16 cache is widened as BLAS reads it
    # which loaded OpenBLAS the products run on (numpy ships its own beside scipy's): named in the probe
    blas_library: ClassVar[tuple[str, ...]] = ("scipy.libs", "/scipy/")

    def __init__(self, dtype: str = "float32", device: str | None = None) -> None:
        super().__init__(dtype, device)
        self.threads: int | None = None

    def _probe_impl(self) -> Probe:
        if not super()._probe_impl().available:
            return super()._probe_impl()
        try:
            from scipy.linalg import blas
            from threadpoolctl import threadpool_info, threadpool_limits
        except ImportError as exc:
            return Probe.missing(f"{exc.name} is not installed: pip install scipy threadpoolctl")
        prefix = "s" if self.dtype == np.float32 else "d"
        wanted = os.environ.get(ENV_THREADS)
        if wanted:
            threadpool_limits(limits=int(wanted), user_api="blas")
        libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        # numpy loads its own OpenBLAS (numpy.libs/libscipy_openblas64_...): report the one used
        ours = [i for i in libs if any(d in i.get("filepath", "") for d in self.blas_library)]
        lib = (ours or libs or [{}])[0]
        self.threads = lib.get("num_threads")
        self._governor = ThreadGovernor(int(self.threads or 1) if self._adapt() else 1, self._set_threads)
        gemm, gemv = getattr(blas, prefix + "gemm"), getattr(blas, prefix + "gemv")
        self._gemm, self._gemv = self._governed("gemm", gemm), self._governed("gemv", gemv)
        name = f"{lib.get('internal_api', 'BLAS')} {lib.get('version') or ''}".strip()
        return Probe.ok(f"host CPU, {name}, {self.threads} threads{self._adapting()}, {self.dtype.name}")

    # -- threads (see thread_governor: a busy machine gets one thread) -----
    @staticmethod
    def _adapt() -> bool:
        return os.environ.get(ENV_ADAPT, "1") != "0"

    def _adapting(self) -> str:
        return " (1 when busy)" if self._governor.most > 1 else ""

    def _set_threads(self, n: int) -> None:
        from threadpoolctl import ThreadpoolController

        controllers = getattr(self, "_blas_controllers", None)
        if controllers is None:  # numpy's OpenBLAS too, as --threads sets them both
            controllers = self._blas_controllers = [
                c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"
            ]
        for c in controllers:
            c.set_num_threads(min(n, int(self.threads or 1)))

    def _governed(self, name: str, fn):
        """``fn`` (a BLAS routine called as ``fn(alpha, a, b, ...)``) timed by the governor."""

        def call(alpha, a, b, *args, **kwargs):
            if a.size < GOVERN_MIN:
                return fn(alpha, a, b, *args, **kwargs)
            return self._governor.run((name, a.shape, b.shape), fn, alpha, a, b, *args, **kwargs)

        return call

    # -- ops -------------------------------------------------------------
    def linear(self, x, w, b=None):  # [n_seq, n_in], [n_in, n_out], [n_out] -> [n_seq, n_out]
        out = np.empty((x.shape[0], w.shape[1]), dtype=self.dtype)
        beta = 0.0
        if b is not None:
            out[...] = b
            beta = 1.0
        if x.shape[0] == 1:  # decode: y = Wᵀ x, with Fortran Wᵀ = C w
            self._gemv(1.0, w.T, x[0], beta=beta, y=out[0], overwrite_y=1)
        else:
            self._gemm(1.0, w.T, x.T, beta=beta, c=out.T, overwrite_c=1)
        return out

    def matmul(self, a, b, transpose_b=False):  # [m, k] @ [k, n] (or [n, k]ᵀ) -> [m, n]
        n = b.shape[0] if transpose_b else b.shape[1]
        out = np.empty((a.shape[0], n), dtype=self.dtype)
        if a.shape[0] == 1:
            self._gemv(1.0, b.T, a[0], trans=int(transpose_b), y=out[0], overwrite_y=1)
        else:
            self._gemm(1.0, b.T, a.T, trans_a=int(transpose_b), c=out.T, overwrite_c=1)
        return out

    def add(self, a, b):
        return np.add(a, b)

    def layernorm(self, x, g, b, eps=1e-5):  # [n_seq, n] -> [n_seq, n]
        mean = x.mean(axis=-1, keepdims=True)
        centred = x - mean
        var = np.einsum("ij,ij->i", centred, centred)[:, None] / x.shape[-1]
        centred *= 1.0 / np.sqrt(var + eps)
        centred *= g
        centred += b
        return centred

    def gelu(self, x):  # tanh approximation, computed with in-place passes
        inner = x * x
        inner *= 0.044715
        inner += 1.0
        inner *= x
        inner *= math.sqrt(2.0 / math.pi)
        np.tanh(inner, out=inner)
        inner += 1.0
        inner *= x
        inner *= 0.5
        return inner

    def attention(self, qkv, n_head, k_cache, v_cache, start, out=None):
        """[n_new, 3*n_embd] -> [n_new, n_embd]; caches [n_head, capacity, d], written at start..

        Every product goes through scipy's BLAS, one head at a time (a head's keys
        are a contiguous [n_kv, d] matrix in the cache, read in place): numpy's
        ``matmul`` would call numpy's own OpenBLAS, a second thread pool spinning
        on the same cores as scipy's.
        """
        n_new, n_embd = qkv.shape[0], qkv.shape[1] // 3
        d, end = n_embd // n_head, start + n_new
        self._store_rows(qkv, n_head, k_cache, v_cache, start)
        if out is None:
            out = np.empty((n_new, n_embd), dtype=self.dtype)
        scale = 1.0 / math.sqrt(d)
        if n_new == 1:  # decode: two GEMVs per head over the cache, one softmax for all heads
            q = qkv[0, :n_embd].reshape(n_head, d)
            scores = np.empty((n_head, end), dtype=self.dtype)
            for h in range(n_head):  # C [end, d] keys = Fortran [d, end]: trans gives keys @ q
                self._gemv(scale, k_cache[h, :end].T, q[h], trans=1, y=scores[h], overwrite_y=1)
            self._softmax_rows(scores, None)
            o = out.reshape(n_head, d)
            for h in range(n_head):
                o[h] = self._gemv(1.0, v_cache[h, :end].T, scores[h])
            return out
        for h in range(n_head):
            cols = slice(h * d, (h + 1) * d)
            keys, values = k_cache[h, :end], v_cache[h, :end]  # [end, d], contiguous
            # scores [n_new, end] in C order is the Fortran keys·qᵀ [end, n_new]
            scores = self._gemm(scale, keys.T, qkv[:, cols].T, trans_a=1).T
            self._softmax_rows(scores, start)
            out[:, cols] = self._gemm(1.0, values.T, scores.T).T  # Fortran vᵀ·pᵀ [d, n_new]
        return out

    @staticmethod
    def _store_rows(qkv, n_head, k_cache, v_cache, start) -> None:
        """The new rows' keys and values into the head-major caches at ``start``..."""
        n_new, n_embd = qkv.shape[0], qkv.shape[1] // 3
        d = n_embd // n_head
        heads = lambda t: t.reshape(n_new, n_head, d).transpose(1, 0, 2)  # noqa: E731
        k_cache[:, start : start + n_new] = heads(qkv[:, n_embd : 2 * n_embd])
        v_cache[:, start : start + n_new] = heads(qkv[:, 2 * n_embd :])

    def _softmax_rows(self, scores, start):
        """Softmax in place over the rows of [n_q, n_k]; with a ``start``, causal:
        query i sees keys 0 .. start + i."""
        n_q, n_k = scores.shape
        if start is not None and n_q > 1:
            scores[np.triu(np.ones((n_q, n_k), bool), k=start + 1)] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores *= 1.0 / scores.sum(axis=-1, keepdims=True)

    def attention_batch(self, qkv, n_head, step):  # [step.n_rows, 3 * n_embd] -> [step.n_rows, n_embd]
        out = np.empty((qkv.shape[0], qkv.shape[1] // 3), dtype=self.dtype)
        for (a, b), (k_cache, v_cache), start in zip(step.bounds, step.caches, step.starts):
            self.attention(qkv[a:b], n_head, k_cache, v_cache, start, out[a:b])
        return out

    def embedding(self, table, ids):
        return table[np.asarray(ids)]

    def take_rows(self, x, rows):
        return x[np.asarray(rows)]

    def slice_rows(self, x, start, stop):
        return x[start:stop]

    def concat_rows(self, parts):
        return np.concatenate(parts)

    def cross_entropy(self, logits, targets):  # [n, n_vocab], int [n] -> [1]
        """Host arrays already: the reference's float64 log-sum-exp is the fast path too."""
        return reference.cross_entropy(logits, targets)


@hookimpl
def opswitch_backends() -> list[type[Backend]]:
    return [BlasBackend]
