"""Which OpenCL devices there are, what runtime each one runs on, and, when a
runtime cannot build our kernels, one line saying why and what to do.

A device is named by its flat index (``opencl:N``), counted over every
platform in the loader's order, as ``opswitch backends`` lists them.
"""

from __future__ import annotations

import re
from typing import Any

PIP_FIX = "pip install 'opswitch[opencl]' (it brings Intel's CPU OpenCL runtime, which runs on any x86 CPU)"
APT_FIX = "apt-get install pocl-opencl-icd (PoCL 3.1 or newer)"


def list_devices(cl: Any) -> list[tuple[str, Any]]:
    """Every OpenCL device as ("P:D", device), in the order their flat index
    (``opencl:N``) counts them; empty when no platform is installed."""
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # the ICD loader found no platform at all
        return []
    found = []
    for p, platform in enumerate(platforms):
        try:
            devices = platform.get_devices()
        except cl.Error:  # a platform with no devices of any type
            continue
        found += [(f"{p}:{d}", device) for d, device in enumerate(devices)]
    return found


def is_gpu(device: Any) -> bool:
    return bool(device.type & 4)  # CL_DEVICE_TYPE_GPU


def device_kind(device: Any) -> str:
    kinds = [("GPU", 4), ("CPU", 2), ("accelerator", 8)]  # CL_DEVICE_TYPE_* bits
    return next((name for name, bit in kinds if device.type & bit), "other")


def runtime_label(device: Any) -> str:
    """The runtime and its version, as a user would search for it:
    "PoCL 3.0-rc2 (LLVM 14.0.6)", "Intel(R) OpenCL 2026.22.10.0", ..."""
    platform = device.platform
    version = platform.version.strip()
    pocl = re.search(r"PoCL (\S+)", version)
    if pocl:
        llvm = re.search(r"LLVM (\d[\w.]*)", version)
        return f"PoCL {pocl.group(1)}" + (f" (LLVM {llvm.group(1)})" if llvm else "")
    return f"{platform.name.strip()} {device.driver_version.strip()}"


def describe_device(device: Any) -> str:
    """What users see: platform, device, driver, compute units, memory."""
    return (
        f"{device.platform.name.strip()} / {device.name.strip()} ({device_kind(device)}, driver "
        f"{device.driver_version.strip()}, {device.max_compute_units} compute units, "
        f"{device.global_mem_size / 2**30:.1f} GiB)"
    )


def device_list(devices: list[tuple[str, Any]]) -> str:
    return "; ".join(f"opencl:{n} {describe_device(device)}" for n, (_, device) in enumerate(devices))


def match_device(spec: str, devices: list[tuple[str, Any]]) -> Any | None:
    """The device ``spec`` ("P:D", "N" or a name substring) names, if any."""
    spec = spec.strip()
    by_key = dict(devices)
    if spec in by_key:
        return by_key[spec]
    if spec.isdigit():
        return devices[int(spec)][1] if int(spec) < len(devices) else None
    needle = spec.lower()
    for _, device in devices:
        if needle in f"{device.platform.name} {device.name}".lower():
            return device
    return None


def preference_order(devices: list[tuple[str, Any]]) -> list[Any]:
    """The order ``opencl`` tries devices in when none is named: GPUs first,
    then the rest, each in the loader's order."""
    every = [device for _, device in devices]
    return [d for d in every if is_gpu(d)] + [d for d in every if not is_gpu(d)]


def _build_log(message: str) -> list[str]:
    """The compiler's log lines inside a pyopencl build error
    ("...\\n\\nBuild on <device>:\\n\\nLOG\\n\\n(options: ...)")."""
    _, _, after = message.partition("Build on ")
    body = after.partition("\n")[2] if after else message
    lines = [line.strip() for line in body.splitlines()]
    return [line for line in lines if line and not line.startswith("(options:")]


def first_meaningful_line(message: str) -> str:
    """The line of a build failure a user should see: the first error, else the first log line."""
    log = _build_log(message)
    errors = [line for line in log if re.search(r"\berror\b", line, re.IGNORECASE)]
    chosen = errors[0] if errors else (log[0] if log else message.strip().splitlines()[0] if message else "")
    chosen = re.sub(r"^.*?\berror:\s*", "error: ", chosen, flags=re.IGNORECASE) if errors else chosen
    return chosen[:300]


def build_failure(device: Any, message: str, intel_installed: bool) -> str:
    """One line: which runtime failed, the compiler's reason, and the fix that works."""
    runtime = runtime_label(device)
    line = first_meaningful_line(message) or "the build failed with no log"
    if "unknown target cpu" in line.lower():
        what = f"{runtime} cannot compile for this CPU ({device.name.strip()}): {line}"
    else:
        what = f"{runtime} cannot build our kernels on {device.name.strip()}: {line}"
    if device_kind(device) != "CPU":
        return f"{what}; update the device's OpenCL driver, or name another device (opencl:N)"
    if runtime.startswith("PoCL"):
        fix = f"another runtime builds for it: {APT_FIX}" if intel_installed else PIP_FIX
        return f"{what}; {fix}"
    return f"{what}; {PIP_FIX if not intel_installed else APT_FIX}"
