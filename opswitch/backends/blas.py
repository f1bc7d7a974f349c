"""``blas``: the CPU backend, calling BLAS directly through scipy.

Why not just ``x @ w + b``?  Three costs numpy pays that we need not:
the bias add is a second pass over the output (we fold it into the GEMM by
pre-filling the output and using beta=1), single-token decode goes through
GEMM although GEMV is the right kernel, and the KV cache would be copied
every step (we grow it in place inside a preallocated buffer).

Arrays are C-ordered numpy; a C-ordered ``[m, n]`` is a Fortran ``[n, m]``,
so ``y = x @ w`` is computed as the Fortran ``yᵀ = wᵀ xᵀ`` with no copies.
"""

from __future__ import annotations

import math
import os

import numpy as np

from opswitch.core import Backend, Probe, hookimpl

ENV_THREADS = "OPSWITCH_NUM_THREADS"


class _KVView(np.ndarray):
    """The filled rows of a larger cache buffer, so appends can stay in place.

    ``_kv_state`` is ``[buffer, rows_filled]``, shared by every view of one
    buffer: if a caller passes an older view again (rows_filled moved on),
    we copy instead of overwriting rows a newer view still shows.
    """


def _grow(past: np.ndarray | None, new: np.ndarray) -> np.ndarray:
    """Append ``new`` rows after ``past``, in place when its buffer has room."""
    n_past = 0 if past is None else past.shape[0]
    n_total = n_past + new.shape[0]
    state = getattr(past, "_kv_state", None)
    if state is None or state[1] != n_past or state[0].shape[0] < n_total:
        capacity = max(64, 1 << math.ceil(math.log2(n_total)))
        state = [np.empty((capacity, new.shape[1]), dtype=new.dtype), n_past]
        if n_past:
            state[0][:n_past] = past
    state[0][n_past:n_total] = new
    state[1] = n_total
    view = state[0][:n_total].view(_KVView)
    view._kv_state = state
    return view


class BlasBackend(Backend):
    name = "blas"
    priority = 50
    description = "scipy.linalg.blas GEMM/GEMV with fused bias, in-place KV cache"
    dtypes = ("float32", "float64")

    def __init__(self, dtype: str = "float32") -> None:
        super().__init__(dtype)
        self.threads: int | None = None

    def _probe_impl(self) -> Probe:
        try:
            from scipy.linalg import blas
            from threadpoolctl import threadpool_info, threadpool_limits
        except ImportError as exc:
            return Probe.missing(f"{exc.name} is not installed: pip install scipy threadpoolctl")
        prefix = "s" if self.dtype == np.float32 else "d"
        self._gemm, self._gemv = getattr(blas, prefix + "gemm"), getattr(blas, prefix + "gemv")
        wanted = os.environ.get(ENV_THREADS)
        if wanted:
            threadpool_limits(limits=int(wanted), user_api="blas")
        libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        ours = [i for i in libs if "scipy" in i.get("filepath", "")]  # numpy may load its own
        lib = (ours or libs or [{}])[0]
        self.threads = lib.get("num_threads")
        name = f"{lib.get('internal_api', 'BLAS')} {lib.get('version') or ''}".strip()
        return Probe.ok(f"host CPU, {name}, {self.threads} threads, {self.dtype.name}")

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

    def softmax(self, x, causal=False):  # [..., n_q, n_k], last axis
        if causal:
            n_q, n_k = x.shape[-2:]
            x = np.where(np.triu(np.ones((n_q, n_k), bool), k=n_k - n_q + 1), -np.inf, x)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        e /= e.sum(axis=-1, keepdims=True)
        return e

    def attention(self, qkv, n_head, past_k=None, past_v=None):
        n_seq, n_embd = qkv.shape[0], qkv.shape[1] // 3
        d = n_embd // n_head
        k = _grow(past_k, qkv[:, n_embd : 2 * n_embd])
        v = _grow(past_v, qkv[:, 2 * n_embd :])
        n_kv = k.shape[0]
        # head-major contiguous copies: np.matmul on strided views skips BLAS entirely
        q = np.ascontiguousarray(qkv[:, :n_embd].reshape(n_seq, n_head, d).transpose(1, 0, 2))
        kh = np.ascontiguousarray(np.asarray(k).reshape(n_kv, n_head, d).transpose(1, 2, 0))
        vh = np.ascontiguousarray(np.asarray(v).reshape(n_kv, n_head, d).transpose(1, 0, 2))
        scores = np.matmul(q, kh)
        scores *= 1.0 / math.sqrt(d)
        probs = self.softmax(scores, causal=n_seq > 1)
        out = np.matmul(probs, vh)  # [h, n_seq, d]
        return out.transpose(1, 0, 2).reshape(n_seq, n_embd), k, v

    def embedding(self, table, ids):
        return table[np.asarray(ids)]

    def slice_rows(self, x, start, stop):
        return x[start:stop]


@hookimpl
def opswitch_backends() -> list[type[Backend]]:
    return [BlasBackend]
