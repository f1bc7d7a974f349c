"""Compile every CUDA kernel file with NVRTC, as the cuda backend does, without a GPU.

NVRTC needs no driver or device, so this runs in CI on any machine: each
``.cu`` file, with exactly the source and ``-D`` options the backend hands
to ``cupy.RawModule`` (``kernel_source``/``compile_options``), for sm_80
(A100) and sm_90 (H100).  Any error or warning fails, and every kernel the
backend loads must be in the PTX, in float32 only (no accidental doubles).
"""

from __future__ import annotations

import re

import pytest
from support import require

from opswitch.backends import cuda

nvrtc = require(
    "cuda.bindings.nvrtc", why="pip install cuda-bindings nvidia-cuda-nvrtc-cu12 (the test extra has them)"
)

ARCHS = ("compute_80", "compute_90")


def _check(result):
    err, *rest = result
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    return rest[0] if len(rest) == 1 else rest


def compile_ptx(name: str, arch: str) -> tuple[bool, str, str]:
    """(compiled, log, ptx) for kernel file ``name`` as the backend builds it."""
    program = _check(nvrtc.nvrtcCreateProgram(cuda.kernel_source(name).encode(), name.encode(), 0, [], []))
    try:
        options = [o.encode() for o in (*cuda.compile_options(name), f"--gpu-architecture={arch}")]
        (err,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        size = _check(nvrtc.nvrtcGetProgramLogSize(program))
        # a fresh, writable buffer: NVRTC writes into it, and ``b" " * 1`` would be
        # CPython's shared one-byte b" " object (a size-1 empty log would turn every
        # b" " in the process into b"\x00")
        log = bytearray(size)
        _check(nvrtc.nvrtcGetProgramLog(program, log))
        ptx = b""
        if err == nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = _check(nvrtc.nvrtcGetPTXSize(program))
            ptx = bytearray(size)
            _check(nvrtc.nvrtcGetPTX(program, ptx))
        ok = err == nvrtc.nvrtcResult.NVRTC_SUCCESS
        return ok, log.decode(errors="replace").strip(" \x00\n"), ptx.decode(errors="replace")
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def test_every_kernel_file_is_compiled_by_the_backend():
    on_disk = {p.name for p in cuda.KERNEL_DIR.glob("*.cu")}
    assert on_disk == set(cuda.MODULES) == set(cuda.KERNELS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(cuda.MODULES))
def test_kernels_compile_without_errors_or_warnings(name, arch):
    ok, log, ptx = compile_ptx(name, arch)
    assert ok and not log, f"NVRTC on {name} for {arch}:\n{log}"
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert set(cuda.KERNELS[name]) <= entries, f"missing kernels: {set(cuda.KERNELS[name]) - entries}"
    assert ".f64" not in ptx, f"{name} computes in double precision somewhere"


def test_a_warning_fails_the_check(monkeypatch):
    """The check itself: a kernel with an unused variable is reported, not passed."""
    source = cuda.kernel_source("elementwise.cu") + "\n__global__ void k(float *x) { int unused = 1; }\n"
    monkeypatch.setattr(cuda, "kernel_source", lambda name: source)
    ok, log, _ = compile_ptx("elementwise.cu", ARCHS[0])
    assert ok and "unused" in log


def test_a_missing_define_is_an_error():
    """The .cu files refuse to build without the launch shapes the backend compiles in."""
    source = cuda.kernel_source("attention.cu").encode()
    program = _check(nvrtc.nvrtcCreateProgram(source, b"attention.cu", 0, [], []))
    options = [b"--gpu-architecture=compute_80"]
    (err,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
    nvrtc.nvrtcDestroyProgram(program)
    assert err != nvrtc.nvrtcResult.NVRTC_SUCCESS
