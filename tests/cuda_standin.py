"""A stand-in for CuPy that runs the cuda backend on the CPU, kernel by kernel.

The backend's host side (its checks, launch geometry, slot arena, cuBLAS
calls, graph capture) is what it exercises; the kernels' numerics are
emulated in numpy from their documented semantics (``cuda_kernels/*.cu``), so
what a wrong grid, a wrong pointer or a stale arena slot does on a GPU
shows up here as a wrong number.  It keeps CuPy's rules that bit before:

- arrays refuse implicit conversion to numpy (``__array__`` raises TypeError);
- fresh device memory is garbage (NaN), so reading an unwritten buffer shows;
- cuBLAS calls raise ``NotImplementedError`` while the current stream is
  being captured (CuPy 11+), and a synchronous copy during a capture fails;
- ``cupy.cuda.device.get_cublas_handle()`` is per thread, and dies with its
  thread (CuPy destroys a thread's handles when it ends);
- CuPy 14 needs the CUDA runtime headers (``cuda.pathfinder``).

Launches, copies and cuBLAS calls are counted (``StandIn.counts``): "kernel"
(and "kernel:<name>"), "memcpy" and "sgemm" as they execute, in a graph or
not; "issued" for what the host issued (a graph launch is one).
Not emulated: timing, concurrency between streams (everything runs at once,
in order), and the CUDA code itself (``test_cuda_compile.py`` compiles it).
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import threading
import types
import weakref
from collections import Counter
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from opswitch.backends import cuda

IMPLICIT = "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct one."
PROPS = {"name": b"NVIDIA H200 (stand-in)", "totalGlobalMem": 141 * 2**30, "major": 9, "minor": 0}


class CUDARuntimeError(RuntimeError):
    pass


class CUBLASError(RuntimeError):
    pass


# -- memory: numpy buffers found again by address ------------------------------------
class Heap:
    """Every live allocation by address, so a raw pointer a kernel reads resolves to memory."""

    def __init__(self) -> None:
        self.blocks: dict[int, weakref.ref] = {}

    def register(self, base: np.ndarray) -> None:
        addr = base.ctypes.data
        self.blocks[addr] = weakref.ref(base, lambda _, a=addr: self.blocks.pop(a, None))

    def view(self, ptr: int, dtype: Any) -> np.ndarray:
        """The memory from ``ptr`` to the end of its allocation, as ``dtype``."""
        ptr = int(ptr)
        for addr, ref in list(self.blocks.items()):
            base = ref()
            if base is not None and addr <= ptr < addr + base.nbytes:
                raw = base.reshape(-1).view(np.uint8)[ptr - addr :]
                size = np.dtype(dtype).itemsize
                return raw[: raw.size // size * size].view(dtype)
        raise CUDARuntimeError(f"cudaErrorIllegalAddress: {ptr:#x} is not device memory")


class PinnedMemory(np.ndarray):
    """Pinned host memory: a buffer with a ``ptr``."""

    @property
    def ptr(self) -> int:
        return self.ctypes.data


class Pointer:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class StandIn:
    """One stand-in CuPy: its device, streams, handles and counters."""

    def __init__(self, headers: bool = True, version: str = "14.2.0", kernels: str = "numpy") -> None:
        self.kernels = kernels  # "numpy": emulated from their semantics; "cpu": the CUDA code, on the CPU
        self.heap = Heap()
        self.counts: Counter = Counter()
        self.capturing: list | None = None  # the closures of the capture in progress
        self.capture_stream: Stream | None = None
        self.local = threading.local()
        self.handles: dict[int, dict] = {}
        self.handle_ids = itertools.count(1000)
        self.stream_ids = itertools.count(0x7000)
        self.headers, self.version = headers, version
        self.cupy = self._module()

    # execution: at once, or recorded while the current stream captures
    def current_stream(self) -> Stream | None:
        stack = getattr(self.local, "streams", [])
        return stack[-1] if stack else None

    def run(self, stream: Stream | None, what: str, fn) -> None:
        if self.capturing is not None and stream is self.capture_stream:
            self.capturing.append((what, fn))
            return
        self.counts["issued"] += 1
        self._execute(what, fn)

    def _execute(self, what: str, fn) -> None:
        kind = what.split(":")[0]
        self.counts[kind] += 1
        if kind == "kernel":
            self.counts[what] += 1
        fn()

    def check_not_capturing(self, stream: Stream | None, what: str) -> None:
        if self.capturing is not None and stream is self.capture_stream:
            raise CUDARuntimeError(f"cudaErrorStreamCaptureUnsupported: {what} during a capture")

    # arrays
    def alloc(self, shape, dtype=np.float32) -> DeviceArray:
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        base = np.empty(max(1, int(np.prod(shape, dtype=np.int64))), dtype=dtype)
        base[...] = np.nan if dtype.kind == "f" else 0x5A
        self.heap.register(base)
        return DeviceArray(self, base[: int(np.prod(shape, dtype=np.int64))].reshape(shape))

    def to_host_view(self, x: Any, dtype: Any) -> np.ndarray | None:
        """A kernel argument as memory: an array's own, a raw pointer's, or None for null."""
        if isinstance(x, DeviceArray):
            if not x._a.flags.c_contiguous:
                raise CUDARuntimeError("a non-contiguous kernel argument (a kernel reads its base pointer)")
            if x._a.dtype != np.dtype(dtype):
                raise CUDARuntimeError(f"a {x._a.dtype} array where the kernel reads {np.dtype(dtype)}")
            return x._a.reshape(-1)
        ptr = int(x)
        return None if ptr == 0 else self.heap.view(ptr, dtype)

    # cuBLAS
    def handle_ok(self, handle: int) -> None:
        h = self.handles.get(int(handle))
        if h is None or h["destroyed"] or (h["thread"] is not None and not h["thread"].is_alive()):
            raise CUBLASError("CUBLAS_STATUS_NOT_INITIALIZED: the handle was destroyed (its thread ended?)")

    def _module(self) -> types.ModuleType:
        si = self
        cp = types.ModuleType("cupy")
        cp.__version__ = self.version
        cp.ndarray = DeviceArray
        cp.float32, cp.float64, cp.int64 = np.float32, np.float64, np.int64

        def asarray(x, dtype=None):
            if isinstance(x, DeviceArray):
                return x if dtype is None else x.astype(dtype)
            host = np.asarray(x, dtype=dtype)
            out = si.alloc(host.shape, host.dtype)
            out._a[...] = host
            return out

        cp.asarray = asarray
        cp.empty = lambda shape, dtype=np.float32: si.alloc(shape, dtype)

        def zeros(shape, dtype=np.float32):
            out = si.alloc(shape, dtype)
            out._a[...] = 0
            return out

        cp.zeros = zeros
        cp.arange = lambda *a, **k: asarray(np.arange(*a, **k))
        cp.log = lambda x: DeviceArray(si, np.log(x._a))
        cp.exp = lambda x: DeviceArray(si, np.exp(x._a))
        cp.RawModule = lambda code, options=(): RawModule(si, code, options)

        rt = types.SimpleNamespace(
            CUDARuntimeError=CUDARuntimeError,
            runtimeGetVersion=lambda: 13000,
            driverGetVersion=lambda: 13000,
            getDeviceCount=lambda: 1,
            getDeviceProperties=lambda i: PROPS,
            getDevice=lambda: 0,
            setDevice=lambda i: None,
            memcpyHostToDevice=1,
            memcpyDeviceToDevice=3,
            streamIsCapturing=lambda ptr: si.capture_stream is not None and si.capture_stream.ptr == ptr,
        )

        def memcpy_async(dst, src, nbytes, kind, stream_ptr):
            stream = Stream.by_ptr.get(stream_ptr)
            d, s = si.heap.view(dst, np.uint8)[:nbytes], si.heap.view(src, np.uint8)[:nbytes]
            if d.size < nbytes or s.size < nbytes:
                raise CUDARuntimeError("cudaErrorInvalidValue: a copy past the end of an allocation")
            si.run(stream, "memcpy", lambda: d.__setitem__(slice(None), s))

        rt.memcpyAsync = memcpy_async

        def pinned(nbytes):
            buf = np.zeros(nbytes, dtype=np.uint8).view(PinnedMemory)
            si.heap.register(buf)
            return buf

        def get_cublas_handle():
            handles = si.local.__dict__.setdefault("cublas", {})
            if "h" not in handles:
                h = next(si.handle_ids)
                si.handles[h] = {"thread": threading.current_thread(), "destroyed": False, "stream": 0}
                handles["h"] = h
            return handles["h"]

        class Device:
            def __init__(self, index=0):
                self.id = index

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class MemoryPool:
            def malloc(self, nbytes):
                return None

        @contextmanager
        def using_allocator(fn):
            yield

        cp.cuda = types.SimpleNamespace(
            runtime=rt, Device=Device, Stream=lambda non_blocking=False: Stream(si),
            device=types.SimpleNamespace(get_cublas_handle=get_cublas_handle),
            alloc_pinned_memory=pinned, MemoryPool=MemoryPool, using_allocator=using_allocator,
        )  # fmt: skip
        return cp

    def cublas_module(self) -> types.ModuleType:
        si = self
        cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")

        def create():
            h = next(si.handle_ids)
            si.handles[h] = {"thread": None, "destroyed": False, "stream": 0}
            return h

        def destroy(h):
            si.handle_ok(h)
            si.handles[h]["destroyed"] = True

        def set_stream(h, stream_ptr):
            if si.capture_stream is not None and si.capture_stream.ptr == stream_ptr:
                raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")
            si.handle_ok(h)
            si.handles[h]["stream"] = stream_ptr

        def current_stream_set(h):  # what CuPy's wrappers do before every call
            stream = si.current_stream()
            set_stream(h, 0 if stream is None else stream.ptr)
            return stream

        def sgemm(h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
            strided(h, ta, tb, m, n, k, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1)

        def strided(h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch):
            stream = current_stream_set(h)
            al, be = ctypes.c_float.from_address(alpha).value, ctypes.c_float.from_address(beta).value
            a, b, c = (si.heap.view(p, np.float32) for p in (A, B, C))

            def gemm():
                for i in range(batch):
                    opa = colmajor(a, i * sa, *((m, k) if ta == 0 else (k, m)), lda)
                    opb = colmajor(b, i * sb, *((k, n) if tb == 0 else (n, k)), ldb)
                    out = colmajor(c, i * sc, m, n, ldc)
                    prod = (opa if ta == 0 else opa.T).astype(np.float32) @ (opb if tb == 0 else opb.T)
                    out[...] = al * prod + (be * out if be else 0.0)

            si.run(stream, "sgemm", gemm)

        cublas.create, cublas.destroy, cublas.setStream = create, destroy, set_stream
        cublas.sgemm, cublas.sgemmStridedBatched = sgemm, strided
        cublas.getVersion = lambda h=None: 130000
        return cublas

    def install(self, monkeypatch) -> StandIn:
        """Put this stand-in where the backend imports CuPy, cuBLAS, NVRTC and cuda.pathfinder from."""
        monkeypatch.setitem(sys.modules, "cupy", self.cupy)
        for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.cublas", self.cublas_module())
        nvrtc = types.ModuleType("cupy_backends.cuda.libs.nvrtc")
        nvrtc.getVersion = lambda: (13, 0)
        monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", nvrtc)
        pathfinder = types.ModuleType("cuda.pathfinder")
        pathfinder.find_nvidia_header_directory = lambda lib: "/stand-in/include" if self.headers else None
        monkeypatch.setitem(sys.modules, "cuda.pathfinder", pathfinder)
        return self


def colmajor(buf: np.ndarray, offset: int, rows: int, cols: int, ld: int) -> np.ndarray:
    """The column-major [rows, cols] matrix with leading dimension ld at ``offset``, bounds-checked."""
    if rows and cols and offset + (cols - 1) * ld + rows > buf.size:
        raise CUBLASError("CUBLAS_STATUS_EXECUTION_FAILED: an operand runs past its allocation")
    s = buf.itemsize
    return np.lib.stride_tricks.as_strided(buf[offset:], shape=(rows, cols), strides=(s, s * ld))


class Stream:
    by_ptr: ClassVar[dict[int, Stream]] = {}

    def __init__(self, si: StandIn) -> None:
        self.si, self.ptr = si, next(si.stream_ids)
        Stream.by_ptr[self.ptr] = self

    def __enter__(self):
        self.si.local.__dict__.setdefault("streams", []).append(self)
        return self

    def __exit__(self, *exc):
        self.si.local.streams.pop()
        return False

    def synchronize(self) -> None:
        self.si.check_not_capturing(self, "cudaStreamSynchronize")

    def begin_capture(self) -> None:
        if self.si.capturing is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: a capture is already in progress")
        self.si.capturing, self.si.capture_stream = [], self

    def end_capture(self) -> Graph:
        if self.si.capture_stream is not self:
            raise CUDARuntimeError("cudaErrorIllegalState: this stream is not capturing")
        steps, self.si.capturing, self.si.capture_stream = self.si.capturing, None, None
        return Graph(self.si, steps)


class Graph:
    def __init__(self, si: StandIn, steps: list) -> None:
        self.si, self.steps = si, steps

    def launch(self, stream=None) -> None:
        self.si.counts["graph_launch"] += 1
        self.si.counts["issued"] += 1
        for what, fn in self.steps:
            self.si._execute(what, fn)


class DeviceArray:
    """The part of ``cupy.ndarray`` the backend uses, over numpy memory."""

    def __init__(self, si: StandIn, a: np.ndarray) -> None:
        self.si, self._a = si, a

    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    data = property(lambda self: Pointer(self._a.ctypes.data))

    def __array__(self, *args, **kwargs):
        raise TypeError(IMPLICIT)

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"

    def get(self, stream=None) -> np.ndarray:
        self.si.check_not_capturing(stream or self.si.current_stream(), "a synchronous copy to the host")
        return self._a.copy()

    def set(self, host, stream=None) -> None:
        self.si.check_not_capturing(stream or self.si.current_stream(), "a synchronous copy to the device")
        self._a[...] = host

    def __getitem__(self, key):
        return DeviceArray(self.si, self._a[_unwrap(key)])

    def __setitem__(self, key, value) -> None:  # an elementwise copy kernel on the current stream
        key, value = _unwrap(key), _unwrap(value)
        self.si.run(self.si.current_stream(), "kernel:copy", lambda: self._a.__setitem__(key, value))

    def astype(self, dtype):
        out = self.si.alloc(self.shape, dtype)
        out._a[...] = self._a
        return out

    def reshape(self, *shape):
        return DeviceArray(self.si, self._a.reshape(*shape))

    def max(self, **kwargs):
        return DeviceArray(self.si, np.asarray(self._a.max(**kwargs)))

    def sum(self, **kwargs):
        return DeviceArray(self.si, np.asarray(self._a.sum(**kwargs)))

    def _binary(self, other, op):
        return DeviceArray(self.si, np.asarray(op(self._a, _unwrap(other))))

    __add__ = lambda self, o: self._binary(o, np.add)  # noqa: E731
    __sub__ = lambda self, o: self._binary(o, np.subtract)  # noqa: E731


def _unwrap(x):
    if isinstance(x, DeviceArray):
        return x._a
    if isinstance(x, tuple):
        return tuple(_unwrap(v) for v in x)
    return x


# -- kernels: compiled "sources" whose functions run numpy emulations ------------------
class RawModule:
    def __init__(self, si: StandIn, code: str, options: tuple) -> None:
        self.si, self.code = si, code
        self.file = next((f for f in cuda.MODULES if cuda.kernel_source(f) == code), None)
        self.defines = {}
        for opt in options:
            if opt.startswith("-D") and "=" in opt:
                name, value = opt[2:].split("=", 1)
                self.defines[name] = int(value)

    def get_function(self, name: str):
        if name not in KERNELS:
            raise CUDARuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        return Function(self, name)


class Function:
    def __init__(self, module: RawModule, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, grid, block, args, shared_mem=0, stream=None) -> None:
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        if min(grid) < 1 or min(block) < 1 or grid[1] > 65535 or grid[2] > 65535 or np.prod(block) > 1024:
            raise CUDARuntimeError(f"cudaErrorInvalidConfiguration: {self.name} grid {grid} block {block}")
        static = STATIC_SHARED.get(self.name.rsplit("_", 1)[0], 0)
        if shared_mem + static > 48 * 1024:  # the limit without an opt-in attribute
            raise CUDARuntimeError(f"cudaErrorInvalidValue: {self.name}: {shared_mem} + {static} B shared")
        for a in args:
            if not isinstance(a, (DeviceArray, np.generic)):
                raise TypeError(f"{self.name}: a kernel argument of type {type(a).__name__}")
        si = self.module.si
        if si.kernels == "cpu":
            import cuda_cpu

            built, raw = cuda_cpu.build(self.module.file), [_raw(a) for a in args]
            fn = lambda: built.launch(self.name, grid, block, shared_mem, raw)  # noqa: E731
        else:
            launch, emulate = Launch(si, grid, block, shared_mem, self.module.defines), KERNELS[self.name]
            fn = lambda: emulate(launch, *args)  # noqa: E731
        si.run(stream or si.current_stream(), f"kernel:{self.name}", fn)


def _raw(a):
    """A kernel argument as the C launcher takes it: an address, or the scalar."""
    if isinstance(a, DeviceArray):
        if not a._a.flags.c_contiguous:
            raise CUDARuntimeError("a non-contiguous kernel argument (a kernel reads its base pointer)")
        return a._a.ctypes.data
    return float(a) if isinstance(a, np.floating) else int(a)


# the static shared memory of kernels that also take dynamic shared memory (bytes, from their source)
STATIC_SHARED = {"gemv_n": 4 * (cuda.GEMV_MAX_M * cuda.GEMV_WARPS * 32 + 32), "attn": 4 * 32}


class Launch:
    def __init__(self, si, grid, block, shared_mem, defines) -> None:
        self.si, self.grid, self.block, self.shared_mem, self.defines = si, grid, block, shared_mem, defines

    def f32(self, x) -> np.ndarray | None:
        return self.si.to_host_view(x, np.float32)

    def i64(self, x) -> np.ndarray:
        return self.si.to_host_view(x, np.int64)

    def weights(self, x, fmt: str) -> np.ndarray:
        """A weight buffer widened to float32, as ``wload`` reads it."""
        raw = x._a.reshape(-1) if isinstance(x, DeviceArray) else None
        if raw is None:
            raise CUDARuntimeError("weights must be a device array")
        if fmt == "f32":
            return raw.view(np.float32)
        if fmt == "f16":
            return raw.view(np.float16).astype(np.float32)
        if fmt == "bf16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return raw.view(np.int8).astype(np.float32)

    def need(self, covered: int, n: int, what: str) -> None:
        if covered < n:
            raise AssertionError(f"{what}: the launch covers {covered} of {n}")


def k_add(L, a, b, out, n):
    n = int(n)
    L.f32(out)[:n] = L.f32(a)[:n] + L.f32(b)[:n]


def k_add_bcast(L, a, b, out, n, n_b):
    n, n_b = int(n), int(n_b)
    L.f32(out)[:n] = L.f32(a)[:n] + np.tile(L.f32(b)[:n_b], n // n_b)


def gelu_f32(v):
    c = np.float32(0.7978845608028654)
    return np.float32(0.5) * v * (np.float32(1) + np.tanh(c * (v + np.float32(0.044715) * v**3)))


def k_gelu(L, x, out, n):
    n = int(n)
    L.f32(out)[:n] = gelu_f32(L.f32(x)[:n])


def k_fill_rows(L, bias, out, n, n_b):
    n, n_b = int(n), int(n_b)
    L.f32(out)[:n] = np.tile(L.f32(bias)[:n_b], n // n_b)


def gather(fmt):
    def k(L, table, scale, ids, out, n):
        n, count = int(n), L.grid[0]
        L.need(L.grid[1] * L.block[0], n, "gather columns")
        rows = L.i64(ids)[:count]
        t = L.weights(table, fmt).reshape(-1, n)[rows]
        s = L.f32(scale)
        L.f32(out)[: count * n] = (t * (s[rows][:, None] if s is not None else 1.0)).reshape(-1)

    return k


def k_layernorm(L, x, g, b, out, n, eps):
    n, rows = int(n), L.grid[0]
    xr = L.f32(x)[: rows * n].reshape(rows, n)
    mean = xr.mean(axis=1, keepdims=True, dtype=np.float32)
    var = ((xr - mean) ** 2).mean(axis=1, keepdims=True, dtype=np.float32)
    normed = (xr - mean) / np.sqrt(var + np.float32(eps))
    L.f32(out)[: rows * n] = (L.f32(g)[:n] * normed + L.f32(b)[:n]).reshape(-1)


def k_add_layernorm(L, a, b, total, g, beta, out, n, eps):
    n, rows = int(n), L.grid[0]
    L.f32(total)[: rows * n] = L.f32(a)[: rows * n] + L.f32(b)[: rows * n]
    k_layernorm(L, total, g, beta, out, n, eps)


def k_softmax(L, x, out, n_k, n_q, causal, scale):
    n_k, n_q, rows = int(n_k), int(n_q), L.grid[0]
    xr = L.f32(x)[: rows * n_k].reshape(rows, n_k) * np.float32(scale)
    res = np.zeros_like(xr)
    for r in range(rows):
        vis = min(max(n_k - n_q + r % n_q + 1, 0), n_k) if causal else n_k
        if vis and np.isfinite(xr[r, :vis].max()):
            e = np.exp(xr[r, :vis] - xr[r, :vis].max())
            res[r, :vis] = e / e.sum()
    L.f32(out)[: rows * n_k] = res.reshape(-1)


SEQ, ROW = 4, 3


def _att_rows(L, seqs, rows, n_rows):
    r = L.i64(rows)[: n_rows * ROW].reshape(n_rows, ROW)
    s = L.i64(seqs)[: (int(r[:, 0].max()) + 1) * SEQ].reshape(-1, SEQ) if n_rows else None
    return r, s


def k_kv_write(L, qkv, seqs, rows, n_embd, d):
    n_embd, d, n_rows = int(n_embd), int(d), L.grid[0]
    L.need(L.grid[1] * L.block[0], n_embd, "kv_write channels")
    r, s = _att_rows(L, seqs, rows, n_rows)
    q = L.f32(qkv)
    for seq, pos, row in r:
        kp, vp, cap = s[seq, :3]
        k = L.si.heap.view(kp, np.float32)[: n_embd * cap].reshape(n_embd // d, cap, d)
        v = L.si.heap.view(vp, np.float32)[: n_embd * cap].reshape(n_embd // d, cap, d)
        src = q[row * 3 * n_embd : (row + 1) * 3 * n_embd]
        k[:, pos] = src[n_embd : 2 * n_embd].reshape(-1, d)
        v[:, pos] = src[2 * n_embd :].reshape(-1, d)


def k_attn_split(L, qkv, seqs, rows, part, n_embd, d, scale):
    n_embd, d, chunk = int(n_embd), int(d), L.defines["ATT_CHUNK"]
    n_rows, n_head, n_splits = L.grid
    if L.shared_mem < 4 * (d + chunk):
        raise CUDARuntimeError("attn_split: too little shared memory for its scores")
    r, s = _att_rows(L, seqs, rows, n_rows)
    q, out = L.f32(qkv), L.f32(part)[: n_rows * n_head * n_splits * (d + 2)]
    out = out.reshape(n_rows, n_head, n_splits, d + 2)
    for i, (seq, pos, row) in enumerate(r):
        kp, vp, cap = s[seq, :3]
        k = L.si.heap.view(kp, np.float32)[: n_head * cap * d].reshape(n_head, cap, d)
        v = L.si.heap.view(vp, np.float32)[: n_head * cap * d].reshape(n_head, cap, d)
        for h in range(n_head):
            qh = q[row * 3 * n_embd + h * d : row * 3 * n_embd + (h + 1) * d] * np.float32(scale)
            for sp in range(n_splits):
                j0, j1 = sp * chunk, min(sp * chunk + chunk, pos + 1)
                if j0 >= j1:
                    out[i, h, sp, :d], out[i, h, sp, d], out[i, h, sp, d + 1] = 0, -np.inf, 0
                    continue
                p = k[h, j0:j1] @ qh
                m = p.max()
                e = np.exp(p - m)
                out[i, h, sp, :d], out[i, h, sp, d], out[i, h, sp, d + 1] = e @ v[h, j0:j1], m, e.sum()


def k_attn_combine(L, part, rows, out, n_embd, d, n_splits):
    n_embd, d, n_splits = int(n_embd), int(d), int(n_splits)
    n_rows, n_head, _ = L.grid
    r = L.i64(rows)[: n_rows * ROW].reshape(n_rows, ROW)
    p = L.f32(part)[: n_rows * n_head * n_splits * (d + 2)].reshape(n_rows, n_head, n_splits, d + 2)
    o = L.f32(out)
    for i, (_, _, row) in enumerate(r):
        for h in range(n_head):
            m = p[i, h, :, d].max()
            w = np.where(p[i, h, :, d + 1] > 0, np.exp(p[i, h, :, d] - m), 0).astype(np.float32)
            total = (w * p[i, h, :, d + 1]).sum()
            o[row * n_embd + h * d : row * n_embd + (h + 1) * d] = (w @ p[i, h, :, :d]) / total


def gemv_n(fmt):
    def k(L, x, w, scale, bias, y, act, kv_seqs, kv_rows, kv_e, kv_d,
          a, b_, g, beta, total, ln_x, eps, m, k_, n):
        m, k_, n = int(m), int(k_), int(n)
        if L.f32(a) is not None:  # the layernorm prologue: x = layernorm(a + b); sum and x written out
            if L.shared_mem < 4 * m * k_:
                raise CUDARuntimeError("gemv_n: too little shared memory for its layernorm prologue")
            rows = L.f32(a)[: m * k_] + L.f32(b_)[: m * k_]
            L.f32(total)[: m * k_] = rows
            k_layernorm(Launch(L.si, (m, 1, 1), L.block, 0, L.defines), total, g, beta, ln_x, k_, eps)
        if L.block[:2] != (32, L.defines["GEMV_WARPS"]) or m > L.defines["GEMV_MAX_M"]:
            raise AssertionError(f"gemv_n: block {L.block}, {m} rows")
        L.need(L.grid[0] * 32, n, "gemv_n columns")
        s, b = L.f32(scale), L.f32(bias)
        res = L.f32(x)[: m * k_].reshape(m, k_) @ L.weights(w, fmt)[: k_ * n].reshape(k_, n)
        res = (res * (s[:n] if s is not None else 1) + (b[:n] if b is not None else 0)).ravel()
        L.f32(y)[: m * n] = res
        if L.f32(act) is not None:
            L.f32(act)[: m * n] = gelu_f32(res)
        if L.i64(kv_rows) is not None:  # row r of y (a qkv) is new row r of an attention batch
            rows, seqs = _att_rows(L, kv_seqs, kv_rows, m)
            e, d = int(kv_e), int(kv_d)
            for r, (seq, pos, _) in enumerate(rows):
                for part, col in ((0, e), (1, 2 * e)):
                    cache = L.si.heap.view(seqs[seq, part], np.float32)[: e * seqs[seq, 2]]
                    cache.reshape(e // d, -1, d)[:, pos] = res.reshape(m, n)[r, col : col + e].reshape(-1, d)

    return k


def gemv_t(fmt):
    def k(L, x, w, scale, y, m, k_, n):
        m, k_, n = int(m), int(k_), int(n)
        if m > L.defines["GEMV_MAX_M"]:
            raise AssertionError(f"gemv_t: {m} rows")
        L.need(L.grid[0] * (L.block[0] // 32), n, "gemv_t columns")
        s = L.f32(scale)
        res = L.f32(x)[: m * k_].reshape(m, k_) @ L.weights(w, fmt)[: n * k_].reshape(n, k_).T
        L.f32(y)[: m * n] = (res * (s[:n] if s is not None else 1)).ravel()

    return k


def widen(fmt):
    def k(L, w, scale, out, rows, cols, axis):
        rows, cols = int(rows), int(cols)
        wide = L.weights(w, fmt)[: rows * cols].reshape(rows, cols)
        s = L.f32(scale)
        if s is not None:
            wide = wide * (s[:cols][None, :] if int(axis) else s[:rows][:, None])
        L.f32(out)[: rows * cols] = wide.ravel()

    return k


KERNELS = {
    "add": k_add, "add_bcast": k_add_bcast, "gelu": k_gelu, "fill_rows": k_fill_rows,
    "layernorm": k_layernorm, "add_layernorm": k_add_layernorm, "softmax": k_softmax,
    "kv_write": k_kv_write, "attn_split": k_attn_split, "attn_combine": k_attn_combine,
}  # fmt: skip
for _fmt in ("f32", "f16", "bf16", "int8"):
    KERNELS[f"gather_{_fmt}"] = gather(_fmt)
    KERNELS[f"gemv_n_{_fmt}"], KERNELS[f"gemv_t_{_fmt}"] = gemv_n(_fmt), gemv_t(_fmt)
    if _fmt != "f32":
        KERNELS[f"widen_{_fmt}"] = widen(_fmt)
