"""Long-running commands give freed KV caches and logits back to the operating system.

glibc serves a large allocation with its own memory map, but raises that size
threshold each time such a block is freed (up to 32 MiB); after the first freed
KV cache, caches and logits of that size come from the heap, and what is freed
there stays in the process.  A server given 1,000 mixed requests with a 256 MiB
KV-cache budget grew by 1.26 GB that way; with the threshold fixed here it grew
237 MiB over 400, less than the 254 MiB of spare caches its pool keeps
(benchmarks/engine_load.py --only rss).  ``MALLOC_MMAP_THRESHOLD_`` in the environment wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
THRESHOLD_BYTES = 1 << 20  # blocks of 1 MiB and more are mapped, and unmapped when freed


def return_large_blocks_to_the_os() -> None:
    """Fix glibc's mmap threshold for this process (no-op elsewhere, or when the user set it)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)
