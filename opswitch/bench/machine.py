"""The machine's physical limit: its CPU, last-level cache and DRAM bandwidth, and the
bytes a decode step must read (so a rate can be shown as a share of what is possible)."""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass

import numpy as np

from opswitch.bench.idle import Quiet
from opswitch.bench.rows import timed
from opswitch.core.formats import BLOCK_BYTES, BLOCK_VALUES, KV_DTYPES


@dataclass
class Bandwidth:
    """DRAM bandwidth measured now: a parallel read of a large array and a STREAM triad."""

    read: float  # bytes/s
    triad: float  # bytes/s, counting the three arrays as STREAM does
    threads: int
    how: str


SIMD_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "avx2", "fma", "f16c")


def cpu_description() -> str:
    """The CPU's model and the vector features our speed depends on: claims are per CPU kind."""
    import platform

    name, family, model, flags = platform.processor() or platform.machine(), "?", "?", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    name = value
                elif key == "cpu family":
                    family = value
                elif key == "model":
                    model = value
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    features = [flag for flag in SIMD_FLAGS if flag in flags] or ["features unknown"]
    return f"{name} (family {family}, model {model}; {os.cpu_count()} logical CPUs; {' '.join(features)})"


def l3_bytes() -> int:
    """The last-level cache size (so benchmarks can go past it), 32 MiB if unknown."""
    for index in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
            return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
        except (OSError, ValueError, KeyError):
            continue
    return 32 << 20


def measure_bandwidth(quiet: Quiet, repeats: int, mbytes: int = 256) -> Bandwidth:
    """Read and triad over arrays 8× the last-level cache (at least ``mbytes``): DRAM,
    on all of numba's threads when numba is installed, else numpy on one thread."""
    n = (mbytes << 20 if mbytes < 64 else max(mbytes << 20, 8 * l3_bytes())) // 4
    a = np.ones(n, dtype=np.float32)
    b, c = np.ones(n // 2, dtype=np.float32), np.ones(n // 2, dtype=np.float32)
    dst = np.empty(n // 2, dtype=np.float32)
    wanted = os.environ.get("OPSWITCH_NUM_THREADS")
    if wanted and "numba" not in sys.modules:  # the limit on the threads the engines get
        os.environ["NUMBA_NUM_THREADS"] = wanted
    try:
        from opswitch.bench import kernels as k  # numba is optional: imported only here

        threads, how = k.num_threads(), "numba"
        read, triad = (lambda: k.read(a, threads)), (lambda: k.triad(dst, b, c, np.float32(3.0)))
    except ImportError:
        threads, how = 1, "numpy (1 thread: pip install 'opswitch[jit]' for all cores)"
        read = a.sum

        def triad() -> None:
            np.multiply(c, np.float32(3.0), out=dst)
            np.add(dst, b, out=dst)

    read(), triad()  # warm-up: page faults, compilation
    t_read = statistics.median(quiet.measure(timed(read)) for _ in range(repeats))
    t_triad = statistics.median(quiet.measure(timed(triad)) for _ in range(repeats))
    return Bandwidth(a.nbytes / t_read, 3 * dst.nbytes / t_triad, threads, how)


def weight_bytes_per_token(config, fmt: str) -> int:
    """Bytes of weights one decode step reads in storage format ``fmt``: every matrix
    (the tied embedding once, as the lm_head) plus the float32 vectors."""
    e, f, v, n_layer = config.n_embd, config.d_ff, config.vocab_size, config.n_layer
    matrices = n_layer * (e * 3 * e + e * e + e * f + f * e) + v * e
    vectors = n_layer * (3 * e + e + f + e + 4 * e) + 2 * e
    if fmt in BLOCK_BYTES:  # q8_0/q4_0: the f16 scales are inside the blocks
        return matrices // BLOCK_VALUES * BLOCK_BYTES[fmt] + vectors * 4
    per = {"f32": 4, "f16": 2, "bf16": 2, "int8": 1}[fmt]
    scales = (n_layer * (3 * e + e + f + e) + v) * 4 if fmt == "int8" else 0
    return matrices * per + vectors * 4 + scales


def kv_bytes_read(config, position: int, kv_cache: str = "f32") -> int:
    """Bytes of KV cache one decode step at ``position`` reads (keys and values in ``kv_cache``)."""
    return 2 * config.n_layer * config.n_embd * position * np.dtype(KV_DTYPES[kv_cache]).itemsize
