"""``opencl``: our own OpenCL C kernels, run through PyOpenCL on any device.

Device choice, in order:

- the spec: ``opencl:N`` is the N-th device of every platform, counted in
  the order ``opswitch backends`` lists them.
- ``OPSWITCH_OPENCL_DEVICE``: ``"N"`` (the same index), ``"P:D"`` (platform
  index, device index), or a case-insensitive substring of the platform or
  device name (``"nvidia"``, ``"pthread"``).  A value that matches nothing
  makes the backend unavailable, with the list of devices in the reason.
- ``PYOPENCL_CTX``: pyopencl's own selector, honoured when the above is unset.
- otherwise the first GPU, else the first other device (e.g. PoCL's CPU
  device from ``pip install pocl-binary-distribution``).

The probe only finds the device (cheap: a ``blas`` run never compiles
OpenCL kernels); ``prepare()`` builds the kernels once the backend has been
chosen, and whatever the compiler prints stays out of the user's terminal.

``OPSWITCH_OPENCL_TUNING=cpu|gpu`` overrides which kernel shapes are built
(normally chosen by the device's type), e.g. for an accelerator that is
neither, or to test the GPU shapes on a CPU device.

Why the shape of things here:

- Weights are uploaded once (``to_device``) as ``pyopencl.array.Array``;
  activations come from a memory pool and stay on the device from op to op.
  Only ``to_host`` reads back.
- Every op is one of our kernels in ``opencl_kernels/*.cl``.  Sizes are
  kernel arguments, so one build serves every shape; tile shapes and vector
  width are ``-D`` options picked per device kind (``TUNING``).  Programs are
  built once per (context, options) and cached (``build_program``).
- Single-row products (decode) take GEMV kernels that stream the weight
  matrix once along its contiguous rows; the rest take tiled GEMM (on CPUs,
  ``x @ wᵀ`` for many rows transposes ``w`` once and runs the plain GEMM).
- On PoCL, ``vloadN``/``vstoreN``/``mad`` are out-of-line calls that stop
  vectorisation (3x slower GEMM); ``common.cl`` replaces them there.
- ``attention`` writes into and reads the caller's head-major KV cache
  (``alloc``'d here); ``attention_batch`` runs the same two kernels per
  sequence with row offsets into one qkv/out buffer, so nothing is copied.

``priority`` is 40 on a CPU device, below ``blas`` (50): there BLAS is faster
at prefill.  On a GPU the probe raises it to ``GPU_PRIORITY`` (80), so
``auto`` prefers the GPU.  Ops are not thread-safe (kernels hold their
arguments): ``thread_safe = False`` makes the model layer serialise them.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from opswitch.backends.opencl_devices import (
    PIP_FIX,
    build_failure,
    describe_device,
    device_list,
    is_gpu,
    list_devices,
    match_device,
    preference_order,
    runtime_label,
)
from opswitch.backends.opencl_icd import intel_runtime, register_pip_runtimes
from opswitch.core import Backend, BackendError, Device, Probe, hookimpl

ENV_DEVICE = "OPSWITCH_OPENCL_DEVICE"
GPU_PRIORITY = 80  # above blas: a GPU decodes faster than the host's BLAS
ENV_TUNING = "OPSWITCH_OPENCL_TUNING"
INSTALL_HINT = "pyopencl is not installed: pip install 'opswitch[opencl]'"
NO_PLATFORM = "no OpenCL platform found (install a GPU's OpenCL driver, or a CPU runtime)"
KERNEL_DIR = Path(__file__).with_name("opencl_kernels")
KERNEL_FILES = ("common.cl", "gemm.cl", "elementwise.cl", "norm.cl", "attention.cl")

# Build-time shapes per device kind (-D options; see the .cl files).
# CPU: a work-item is one core's SIMD lanes (VW=16 for AVX-512), groups are
# small, and a GEMM work-item keeps 12x2 vector accumulators in registers.
# GPU: float4 per work-item and 256-item groups, so neighbouring work-items
# coalesce.  The CPU shapes were tuned on PoCL (AVX-512); the GPU ones are
# conventional and checked for correctness only (tests run them on PoCL).
TUNING: dict[str, dict[str, int]] = {
    "cpu": dict(
        VW=16, EW_L=16, NORM_L=16, ATT_L=16,
        GEMM_LX=1, GEMM_LY=1, GEMM_WM=12, GEMM_WC=2, GEMM_TK=256,
        GEMMT_LX=2, GEMMT_LY=4, GEMMT_WM=3, GEMMT_WN=8, GEMMT_TK=128,
        GEMV_LX=1, GEMV_LY=1, GEMV_WC=4,
        GEMVT_LX=1, GEMVT_LY=16,
        TR_T=32, NT_VIA_GEMM_M=16,
    ),
    "gpu": dict(
        VW=4, EW_L=256, NORM_L=256, ATT_L=64,
        GEMM_LX=16, GEMM_LY=16, GEMM_WM=4, GEMM_WC=1, GEMM_TK=16,
        GEMMT_LX=16, GEMMT_LY=16, GEMMT_WM=4, GEMMT_WN=4, GEMMT_TK=16,
        GEMV_LX=32, GEMV_LY=8, GEMV_WC=1,
        GEMVT_LX=32, GEMVT_LY=8,
        TR_T=16, NT_VIA_GEMM_M=0,
    ),
}  # fmt: skip
# A CPU with 8-wide SIMD (AVX2) has half the vector registers' width and count:
# halve the vectors, and the register blocks so the accumulators still fit.
NARROW_CPU = dict(VW=8, GEMM_WM=6, GEMMT_WN=4, GEMV_WC=8)

_I, _F = np.int32, np.float32
_BUF = None
KERNEL_ARGS: dict[str, list] = {  # scalar argument types, so calls can pass Python numbers
    "gemm": [_BUF] * 4 + [_I] * 4,
    "gemm_nt": [_BUF] * 4 + [_I] * 4,
    "gemv": [_BUF] * 4 + [_I] * 3,
    "gemv_t": [_BUF] * 4 + [_I] * 3,
    "add": [_BUF] * 3 + [_I],
    "add_bcast": [_BUF] * 3 + [_I] * 2,
    "gelu": [_BUF] * 2 + [_I],
    "embedding": [_BUF] * 3 + [_I],
    "kv_write": [_BUF] * 3 + [_I] * 5,
    "layernorm": [_BUF] * 4 + [_I, _F],
    "attention": [_BUF] * 5 + [_I] * 6 + [_F],
    "transpose": [_BUF] * 2 + [_I] * 2,
}

# context -> {options: Program}; weak, so a dropped context takes its programs along
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@cache
def kernel_source() -> str:
    """All our kernel files as one program (common.cl first: shared helpers)."""
    return "\n".join((KERNEL_DIR / name).read_text() for name in KERNEL_FILES)


def build_program(context: Any, options: tuple[str, ...]) -> Any:
    """The built program for ``context`` and ``options``, building it only once."""
    import pyopencl as cl

    programs = _PROGRAMS.setdefault(context, {})
    if options not in programs:
        programs[options] = cl.Program(context, kernel_source()).build(options=list(options))
    return programs[options]


def tuning_kind(device: Any) -> str:
    """ "gpu" or "cpu": which TUNING to build for ``device`` ($OPSWITCH_OPENCL_TUNING wins)."""
    import pyopencl as cl

    wanted = os.environ.get(ENV_TUNING, "").strip().lower()
    if wanted:
        if wanted not in TUNING:
            raise ValueError(f"{ENV_TUNING}={wanted!r}: use one of {', '.join(TUNING)}")
        return wanted
    return "gpu" if device.type & cl.device_type.GPU else "cpu"


def tuning(device: Any, kind: str) -> dict[str, int]:
    """The build-time shapes for ``device``: its kind's, narrowed for 8-wide CPUs."""
    tune = dict(TUNING[kind])
    if kind == "cpu" and device.preferred_vector_width_float < 16:
        tune.update(NARROW_CPU)
    return tune


def build_options(device: Any, tune: dict[str, int]) -> tuple[str, ...]:
    """``-D`` options: the tile shapes, plus PoCL's fast vector moves."""
    opts = [f"-D{key}={value}" for key, value in tune.items()]
    if "Portable Computing Language" in device.platform.name:
        opts.append("-DPACKED_VECTORS")  # clang-only trick, see common.cl
    return tuple(opts)


def _pick_device(cl: Any, devices: list[tuple[str, Any]], index: str | None) -> tuple[list[Any], str]:
    """(devices to try, in order; "") or ([], why not).  A named device (the
    spec's index, OPSWITCH_OPENCL_DEVICE, PYOPENCL_CTX) is the only one tried;
    otherwise every device, GPUs first."""
    if index is not None:
        device = match_device(index, devices) if index.isdigit() else None
        if device is None:
            return [], f"there is no OpenCL device {index!r}; devices: {device_list(devices)}"
        return [device], ""
    spec = os.environ.get(ENV_DEVICE, "").strip()
    if spec:
        device = match_device(spec, devices)
        if device is None:
            return [], (
                f"{ENV_DEVICE}={spec!r} matches no OpenCL device; use 'N', 'P:D' or a name substring"
                f" of one of: {device_list(devices)}"
            )
        return [device], ""
    if os.environ.get("PYOPENCL_CTX"):
        try:
            return [cl.create_some_context(interactive=False).devices[0]], ""
        except Exception as exc:
            return [], (
                f"PYOPENCL_CTX={os.environ['PYOPENCL_CTX']!r} selects no device ({exc}); "
                f"devices: {device_list(devices)}"
            )
    return preference_order(devices), ""


@dataclass
class DeviceCheck:
    """Whether our kernels build and compute on a device: the context and
    program when they do (prepare reuses them), the reason when they do not."""

    reason: str = ""
    tune: dict[str, int] | None = None
    context: Any = None
    program: Any = None
    options: tuple[str, ...] = ()

    @property
    def works(self) -> bool:
        return not self.reason


_CHECKS: dict[tuple, DeviceCheck] = {}  # per process: a device is built for at most once


def _check_key(device: Any) -> tuple:
    return (device.int_ptr, os.environ.get(ENV_TUNING, ""))


def check_device(cl: Any, device: Any) -> DeviceCheck:
    """Build our whole program on ``device`` and run one kernel on known input:
    a runtime that cannot compile for this CPU, or computes wrongly, is found
    here, before ``opencl`` is called available."""
    key = _check_key(device)
    if key not in _CHECKS:
        _CHECKS[key] = _check(cl, device)
    return _CHECKS[key]


def _check(cl: Any, device: Any) -> DeviceCheck:
    try:
        kind = tuning_kind(device)
    except ValueError as exc:
        return DeviceCheck(str(exc))
    tune = tuning(device, kind)
    need = _largest_work_group(tune)
    if need > device.max_work_group_size:
        return DeviceCheck(
            f"{describe_device(device)} allows work-groups of {device.max_work_group_size}, "
            f"the {kind} kernels need {need}; set {ENV_TUNING} or {ENV_DEVICE}"
        )
    options = build_options(device, tune)
    try:
        context = cl.Context([device])
        program = build_program(context, options)
        wrong = _one_kernel_check(cl, context, program, tune)
    except cl.Error as exc:
        return DeviceCheck(build_failure(device, str(exc), intel_runtime() is not None))
    if wrong:
        return DeviceCheck(f"{runtime_label(device)} on {device.name.strip()} computes wrongly: {wrong}")
    return DeviceCheck("", tune, context, program, options)


def _one_kernel_check(cl: Any, context: Any, program: Any, tune: dict[str, int]) -> str:
    """Run ``add`` on a length that is no multiple of any vector or group size (so
    both the vector body and the scalar tail run); "" when every element, and
    the guard past the end, is exact."""
    n = 1001
    x = np.arange(n, dtype=np.float32)
    y = (x * 0.5).astype(np.float32)
    out = np.full(n + 1, -1.0, np.float32)  # one guard element the kernel must not touch
    queue = cl.CommandQueue(context)
    flags = cl.mem_flags
    a = cl.Buffer(context, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=x)
    b = cl.Buffer(context, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=y)
    c = cl.Buffer(context, flags.READ_WRITE | flags.COPY_HOST_PTR, hostbuf=out)
    kernel = cl.Kernel(program, "add")
    kernel.set_scalar_arg_dtypes(KERNEL_ARGS["add"])
    size = _round_up(-(-n // tune["VW"]), tune["EW_L"])
    kernel(queue, (size,), (tune["EW_L"],), a, b, c, n)
    cl.enqueue_copy(queue, out, c)
    queue.finish()
    expected = np.append(x + y, np.float32(-1.0))
    bad = np.flatnonzero(out != expected)
    if bad.size:
        i = int(bad[0])
        return f"add gave {out[i]!r} at element {i} of {n}, expected {expected[i]!r}"
    return ""


def _largest_work_group(tune: dict[str, int]) -> int:
    sizes = [tune["EW_L"], tune["NORM_L"], tune["ATT_L"], tune["TR_T"] ** 2]
    sizes += [tune[f"{k}_LX"] * tune[f"{k}_LY"] for k in ("GEMM", "GEMMT", "GEMV", "GEMVT")]
    return max(sizes)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class OpenCLBackend(Backend):
    name = "opencl"
    priority = 40
    max_priority = GPU_PRIORITY
    description = "own OpenCL kernels via PyOpenCL (GPU, or CPU through PoCL)"
    dtypes = ("float32",)
    thread_safe = False
    # the probe builds our whole program per device it checks: seconds when cold
    # (Intel's compiler takes ~3 s on an idle 2-core VM), milliseconds from pyopencl's cache
    probe_seconds = 180.0

    def __init__(self, dtype: str = "float32", device: str | None = None) -> None:
        super().__init__(dtype, device)
        self.device: Any = None
        self.context: Any = None
        self.queue: Any = None

    # -- devices and probing ---------------------------------------------
    @classmethod
    def list_devices(cls) -> list[Device]:
        """Every device, each with whether our kernels build and run on it, or why not."""
        try:
            import pyopencl as cl
        except ImportError:
            return []
        register_pip_runtimes()
        found = []
        for n, (_, device) in enumerate(list_devices(cl)):
            check = check_device(cl, device)
            verdict = "works" if check.works else f"does not work: {check.reason}"
            found.append(Device(
                str(n), f"{describe_device(device)}: {verdict}", int(device.global_mem_size),
                works=check.works, runtime=runtime_label(device),
            ))  # fmt: skip
        return found

    def _probe_impl(self) -> Probe:
        """The first device whose kernels build and compute right (a named one, or GPUs first)."""
        try:
            import pyopencl as cl
        except ImportError:
            return Probe.missing(INSTALL_HINT)
        registered = register_pip_runtimes()
        devices = list_devices(cl)
        if not devices:
            note = "" if intel_runtime() is None else f" ({registered}, yet no platform loaded)"
            return Probe.missing(f"{NO_PLATFORM}; {PIP_FIX}{note}")
        candidates, why_not = _pick_device(cl, devices, self.device_id)
        if not candidates:
            return Probe.missing(why_not)
        index = {device.int_ptr: n for n, (_, device) in enumerate(devices)}
        failures = []
        for device in candidates:
            check = check_device(cl, device)
            if check.works:
                self._cl, self.device, self._check = cl, device, check
                return Probe.ok(describe_device(device), priority=GPU_PRIORITY if is_gpu(device) else None)
            failures.append(f"opencl:{index.get(device.int_ptr, '?')}: {check.reason}")
        if len(candidates) == 1:
            return Probe.missing(f"our kernels cannot run on {failures[0]}")
        return Probe.missing("no OpenCL device can run our kernels: " + " | ".join(failures))

    def _prepare_impl(self) -> None:
        """Queue, memory pool and kernels on the probed device (built by the probe's check)."""
        cl = self._cl
        try:
            self._open(cl, self._check)
        except cl.Error as exc:
            reason = build_failure(self.device, str(exc), intel_runtime() is not None)
            raise BackendError(f"our OpenCL kernels failed on {self.device.name.strip()}: {reason}") from exc

    def _open(self, cl: Any, check: DeviceCheck) -> None:
        import pyopencl.array as cl_array
        import pyopencl.tools as cl_tools

        self._cl_array = cl_array
        self.context, self.options = check.context, check.options
        self.queue = cl.CommandQueue(self.context)
        self._pool = cl_tools.MemoryPool(cl_tools.ImmediateAllocator(self.queue))
        self._t = SimpleNamespace(**check.tune)  # type: ignore[arg-type]
        self._k = SimpleNamespace()
        for name, arg_types in KERNEL_ARGS.items():
            kernel = cl.Kernel(check.program, name)
            kernel.set_scalar_arg_dtypes(arg_types)
            setattr(self._k, name, kernel)

    # -- arrays ----------------------------------------------------------
    def to_device(self, x: Any) -> Any:
        """Host array -> device Array: floats as float32, integer arrays as they are."""
        if isinstance(x, self._cl_array.Array):
            return x
        x = np.asarray(x)
        x = np.ascontiguousarray(x, dtype=self.dtype if x.dtype.kind not in "iub" else None)
        return self._cl_array.to_device(self.queue, x)

    def to_host(self, x: Any) -> np.ndarray:
        """Device Array -> numpy; numpy (the core's fallback path) passes through."""
        if isinstance(x, np.ndarray):
            return x
        if hasattr(x, "get"):
            return x.get(queue=self.queue)
        return np.asarray(x)

    def alloc(self, shape: tuple[int, ...]) -> Any:
        """A zeroed device array (KV-cache buffers: not from the pool, they live long)."""
        return self._cl_array.zeros(self.queue, shape, np.float32)

    def store(self, dst: Any, src: np.ndarray) -> None:
        dst.set(np.ascontiguousarray(src, dtype=np.float32), queue=self.queue)

    def synchronize(self) -> None:
        self.queue.finish()

    def _empty(self, shape: tuple[int, ...]) -> Any:
        return self._cl_array.Array(self.queue, shape, np.float32, allocator=self._pool)

    # -- ops -------------------------------------------------------------
    def matmul(self, a, b, transpose_b=False):  # [m, k] @ [k, n] (or [n, k]ᵀ) -> [m, n]
        n = b.shape[0] if transpose_b else b.shape[1]
        return self._product(a, b, None, n, transpose_b)

    def linear(self, x, w, b=None):  # [n_seq, n_in], [n_in, n_out], [n_out] -> [n_seq, n_out]
        return self._product(x, w, b, w.shape[1], False)

    def _product(self, a, w, bias, n: int, trans: bool):
        m, k = a.shape
        out = self._empty((m, n))
        if not out.size:
            return out
        bias_buf = out.data if bias is None else bias.data
        t = self._t
        if m == 1:  # decode: GEMV, one pass over w along its contiguous rows
            if trans:
                local = (t.GEMVT_LX, t.GEMVT_LY)
                groups = -(-n // t.GEMVT_LY)
                kernel = self._k.gemv_t
            else:
                local = (t.GEMV_LX, t.GEMV_LY)
                groups = -(-n // (t.GEMV_LX * t.GEMV_WC * t.VW))
                kernel = self._k.gemv
            size = (groups * local[0], local[1])
            kernel(self.queue, size, local, a.data, w.data, bias_buf, out.data, k, n, int(bias is not None))
            return out
        if trans and t.NT_VIA_GEMM_M and m >= t.NT_VIA_GEMM_M:  # CPU: transposing once is cheaper
            w, trans = self._transpose(w), False
        if trans:
            local = (t.GEMMT_LX, t.GEMMT_LY)
            tile = (t.GEMMT_LX * t.GEMMT_WN, t.GEMMT_LY * t.GEMMT_WM)
            kernel = self._k.gemm_nt
        else:
            local = (t.GEMM_LX, t.GEMM_LY)
            tile = (t.GEMM_LX * t.GEMM_WC * t.VW, t.GEMM_LY * t.GEMM_WM)
            kernel = self._k.gemm
        size = (-(-n // tile[0]) * local[0], -(-m // tile[1]) * local[1])
        kernel(self.queue, size, local, a.data, w.data, bias_buf, out.data, m, n, k, int(bias is not None))
        return out

    def _transpose(self, x):  # [r, c] -> [c, r], a new device array
        r, c = x.shape
        out, tile = self._empty((c, r)), self._t.TR_T
        size = (_round_up(c, tile), _round_up(r, tile))
        self._k.transpose(self.queue, size, (tile, tile), x.data, out.data, r, c)
        return out

    def add(self, a, b):  # [...], [...] (or a trailing-shape b, broadcast) -> [...]
        if a.size < b.size:
            a, b = b, a
        out = self._empty(a.shape)
        if not out.size:
            return out
        if a.shape == b.shape:
            size = _round_up(-(-a.size // self._t.VW), self._t.EW_L)
            self._k.add(self.queue, (size,), (self._t.EW_L,), a.data, b.data, out.data, a.size)
        elif b.size and a.shape[a.ndim - b.ndim :] == b.shape:
            size = _round_up(a.size, self._t.EW_L)
            self._k.add_bcast(self.queue, (size,), (self._t.EW_L,), a.data, b.data, out.data, a.size, b.size)
        else:
            raise ValueError(f"add: cannot broadcast shapes {a.shape} and {b.shape}")
        return out

    def gelu(self, x):  # [...] -> [...]
        out = self._empty(x.shape)
        if not out.size:
            return out
        size = _round_up(-(-x.size // self._t.VW), self._t.EW_L)
        self._k.gelu(self.queue, (size,), (self._t.EW_L,), x.data, out.data, x.size)
        return out

    def layernorm(self, x, g, b, eps=1e-5):  # [n_seq, n], [n], [n] -> [n_seq, n]
        n = x.shape[-1]
        out = self._empty(x.shape)
        if not out.size:
            return out
        rows, local = x.size // n, self._t.NORM_L
        self._k.layernorm(self.queue, (rows * local,), (local,), x.data, g.data, b.data, out.data, n, eps)
        return out

    def attention(self, qkv, n_head, k_cache, v_cache, start):
        """[n_new, 3*n_embd] -> [n_new, n_embd]; caches [n_head, capacity, d], written at start.."""
        out = self._empty((qkv.shape[0], qkv.shape[1] // 3))
        self._attend(qkv, n_head, k_cache, v_cache, start, 0, qkv.shape[0], out)
        return out

    def attention_batch(self, qkv, n_head, step):  # [step.n_rows, 3 * n_embd] -> [step.n_rows, n_embd]
        out = self._empty((qkv.shape[0], qkv.shape[1] // 3))
        for (a, b), (k_cache, v_cache), start in zip(step.bounds, step.caches, step.starts):
            self._attend(qkv, n_head, k_cache, v_cache, start, a, b - a, out)
        return out

    def _attend(self, qkv, n_head, k_cache, v_cache, start, row0, n_new, out) -> None:
        """Write rows row0.. of qkv into the caches at start.., then attend them into out."""
        if not n_new:
            return
        n_embd = qkv.shape[1] // 3
        d, capacity = n_embd // n_head, k_cache.shape[1]
        n_kv = start + n_new
        local = self._t.EW_L
        self._k.kv_write(
            self.queue, (_round_up(n_embd, local), n_new), (local, 1),
            qkv.data, k_cache.data, v_cache.data, n_embd, d, capacity, start, row0,
        )  # fmt: skip
        scores = self._empty((n_head, n_new, n_kv))
        local = self._t.ATT_L
        self._k.attention(
            self.queue, (n_new * local, n_head), (local, 1),
            qkv.data, k_cache.data, v_cache.data, scores.data, out.data, n_new, n_kv, n_embd, d, capacity,
            row0, 1.0 / math.sqrt(d),
        )  # fmt: skip

    def embedding(self, table, ids):  # [n_vocab, n], int [n_seq] -> [n_seq, n]
        ids = np.asarray(ids)
        n_vocab, n = table.shape
        flat = ids.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < -n_vocab or flat.max() >= n_vocab):
            raise IndexError(f"embedding: token id out of range for a table of {n_vocab} rows")
        flat = np.where(flat < 0, flat + n_vocab, flat).astype(np.int32)  # numpy's negative ids
        out = self._empty((*ids.shape, n))
        if flat.size:
            # async: pyopencl keeps `flat` alive until the copy is done; no queue stall
            ids_dev = self._cl_array.to_device(self.queue, flat, allocator=self._pool, async_=True)
            local = self._t.EW_L
            self._k.embedding(
                self.queue, (_round_up(n, local), flat.size), (local, 1),
                table.data, ids_dev.data, out.data, n,
            )  # fmt: skip
        return out

    def take_rows(self, x, rows):  # [n_rows, n], int [k] -> [k, n]
        return self.embedding(x, rows)

    def concat_rows(self, parts):  # list of [n_i, n] -> [sum n_i, n]  (device copies)
        out = self._empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
        offset = out.offset
        for part in parts:
            if part.nbytes:
                self._cl.enqueue_copy(
                    self.queue, out.base_data, part.base_data, byte_count=part.nbytes,
                    src_offset=part.offset, dst_offset=offset,
                )  # fmt: skip
            offset += part.nbytes
        return out

    def slice_rows(self, x, start, stop):  # [n_seq, n] -> [stop - start, n]  (a device copy)
        start, stop, _ = slice(start, stop).indices(x.shape[0])
        rows = max(0, stop - start)
        out = self._empty((rows, *x.shape[1:]))
        if rows:
            row_bytes = x.nbytes // x.shape[0]
            self._cl.enqueue_copy(
                self.queue, out.base_data, x.base_data, byte_count=rows * row_bytes,
                src_offset=x.offset + start * row_bytes, dst_offset=out.offset,
            )  # fmt: skip
        return out


@hookimpl
def opswitch_backends() -> list[type[Backend]]:
    return [OpenCLBackend]
