"""The cuda backend's kernel files, built with g++ and run on the CPU (emulation.h).

``build(name)`` compiles ``cuda_kernels/<name>`` exactly as the backend hands
it to NVRTC (``kernel_source``, the ``-D`` options of ``compile_options``), but
with a header that maps CUDA's built-ins onto fibers, plus two textual
substitutions: the dynamic shared-memory declaration, and the one line of PTX
(float16 -> float32).  Every ``extern "C"`` kernel gets a launcher, callable
through ctypes with the same arguments as the kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from opswitch.backends import cuda

HERE = Path(__file__).parent
HALF_ASM = re.compile(r'asm\("cvt\.f32\.f16 %0, %1;" : "=f"\((\w+)\) : "h"\(([^;]*)\)\);')
DYN_SHARED = re.compile(r"extern __shared__ float (\w+)\[\];")
SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')
CTYPES = {"int": ctypes.c_int, "long long": ctypes.c_longlong, "float": ctypes.c_float}


def available() -> bool:
    return shutil.which("g++") is not None


def _ctype(param: str):
    kind = " ".join(param.replace("const", "").split()[:-1]).strip()
    return ctypes.c_void_p if "*" in param else CTYPES[kind]


def _signatures(source: str, defines: dict) -> dict[str, list[str]]:
    """Each extern "C" kernel's parameters, after the preprocessor (the macros make some)."""
    flags = [f"-D{k}={v}" for k, v in defines.items()]
    expanded = subprocess.run(["g++", "-E", "-P", "-x", "c++", *flags, "-"], input=source, text=True,
                              capture_output=True, check=True).stdout  # fmt: skip
    found = SIGNATURE.finditer(" ".join(expanded.split()))
    return {m[1]: [p.strip() for p in m[2].split(",")] for m in found}


class Module:
    """One built kernel file: ``module.launch(name, grid, block, shared_mem, args)``."""

    def __init__(self, lib: ctypes.CDLL, signatures: dict[str, list[str]]) -> None:
        self.lib, self.signatures = lib, signatures
        for name, params in signatures.items():
            fn = getattr(lib, f"launch_{name}")
            fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_size_t] + [_ctype(p) for p in params]
            fn.restype = ctypes.c_char_p

    def launch(self, name: str, grid, block, shared_mem: int, args) -> None:
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        failure = getattr(self.lib, f"launch_{name}")(*grid, *block, shared_mem, *args)
        if failure:
            raise RuntimeError(f"{name}: {failure.decode()}")


@cache
def build(name: str) -> Module:
    source = cuda.kernel_source(name)
    defines = dict(opt[2:].split("=", 1) for opt in cuda.compile_options(name) if opt.startswith("-D"))
    source = HALF_ASM.sub(r"\1 = emu::half_to_float(\2);", source)
    source = DYN_SHARED.sub(r"float *\1 = (float *)emu::dyn_shared.data();", source)
    signatures = _signatures(source, defines)
    launchers = []
    for kernel, params in signatures.items():
        names = ", ".join(p.split()[-1].lstrip("*") for p in params)
        launchers.append(
            f'extern "C" const char *launch_{kernel}(unsigned gx, unsigned gy, unsigned gz, unsigned bx,'
            f" unsigned by, unsigned bz, size_t shmem, {', '.join(params)}) {{ return emu::launch("
            f"dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, shmem, [=] {{ {kernel}({names}); }}); }}"
        )
    text = f'#include "{HERE / "emulation.h"}"\n' + source + "\n" + "\n".join(launchers) + "\n"
    digest = hashlib.sha256((text + (HERE / "emulation.h").read_text()).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"opswitch-cuda-cpu-{digest}.so"
    if not out.exists():
        src = out.with_suffix(".cpp")
        src.write_text(text)
        flags = [f"-D{k}={v}" for k, v in defines.items()]
        tmp = out.with_suffix(f".{id(text)}.tmp")
        command = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w", *flags, str(src), "-o", str(tmp)]
        subprocess.run(command, check=True, capture_output=True)
        tmp.replace(out)
    return Module(ctypes.CDLL(str(out)), signatures)
