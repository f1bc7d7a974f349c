"""numba kernels for ``opswitch bench``'s memory-bandwidth measurement (needs numba)."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange


def num_threads() -> int:
    return numba.get_num_threads()


@njit(parallel=True, fastmath=True, cache=True)
def read(a, chunks):  # sum of a large array: one read stream per task
    n = a.size
    total = np.float32(0.0)
    for c in prange(chunks):
        acc = np.float32(0.0)
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            acc += a[i]
        total += acc
    return total


@njit(parallel=True, fastmath=True, cache=True)
def triad(out, b, c, s):  # STREAM triad: out = b + s * c
    for i in prange(out.size):
        out[i] = b[i] + s * c[i]
