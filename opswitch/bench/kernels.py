"""numba kernels for the memory-bandwidth measurement in ``opswitch.bench.machine`` (needs numba)."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange


def num_threads() -> int:
    return numba.config.NUMBA_NUM_THREADS


@njit(parallel=True, fastmath=True, cache=True)
def _read_rows(rows, out):  # rows [n_rows, n]: one contiguous read stream per task
    for r in prange(rows.shape[0]):
        row = rows[r]
        acc = np.float32(0.0)
        for i in range(row.size):  # the plain form: numba vectorises it best (measured)
            acc += row[i]
        out[r] = acc


def read(a: np.ndarray, chunks: int) -> float:
    """Sum of a large float32 array (its size a multiple of ``chunks``): a pure read stream."""
    out = np.empty(chunks, dtype=np.float32)
    _read_rows(a.reshape(chunks, -1), out)
    return float(out.sum())


@njit(parallel=True, fastmath=True, cache=True)
def triad(out, b, c, s):  # STREAM triad: out = b + s * c
    for i in prange(out.size):
        out[i] = b[i] + s * c[i]
