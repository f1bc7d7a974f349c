"""What the test suite needs from its environment, and what CI insists on.

On a developer's machine a missing optional dependency or backend is a skip
that says why; with ``CI`` set it is a failure, so the suite cannot go green
while quietly testing less.  Every optional import in tests/ goes through
``require``; the backends CI must have are ``REQUIRED_BACKENDS``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from collections import Counter
from typing import Any

import pytest

IN_CI = bool(os.environ.get("CI"))
# Every built-in backend that can run on the machine: the pure-Python ones always, the
# numba-compiled `cpu` (what `auto` picks), OpenCL (the `opencl` extra brings PoCL and Intel's CPU
# runtime: one of them builds our kernels on any x86 CPU),
# and CUDA where there is a GPU.
CPU_BACKENDS = "naive,blas,cpu,opencl"


def has_nvidia_gpu() -> bool:
    """Whether ``nvidia-smi`` lists a GPU (then CI requires the cuda backend)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU ") for line in listed.splitlines())


def _default_required() -> str:
    if not IN_CI:
        return ""
    return CPU_BACKENDS + (",cuda" if has_nvidia_gpu() else "")


# CI declares what must be present: a backend or the HF reference quietly missing
# there would shrink the parity and conformance matrices without failing anything.
# OPSWITCH_REQUIRE_BACKENDS (comma-separated, may be empty) overrides the list.
_override = os.environ.get("OPSWITCH_REQUIRE_BACKENDS")
REQUIRED_BACKENDS = [
    name for name in (_default_required() if _override is None else _override).split(",") if name
]


def require(module: str, why: str = "") -> Any:
    """Import ``module`` for the tests that need it: a skip on a developer's machine, a failure in CI.

    Works at module level (skips or fails the whole file) and inside a test or fixture.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f"; {why}" if why else " (pip install -e '.[test]' installs it)"
        if IN_CI:
            pytest.fail(f"CI needs {module}, which does not import: {exc}{hint}", pytrace=False)
        pytest.skip(f"{module} is not installed ({exc}){hint}", allow_module_level=True)


BUILT_IN_BACKENDS = ("naive", "blas", "cpu", "opencl", "cuda")


def _unavailable_built_ins() -> list[tuple[str, str]]:
    from opswitch.core.registry import get_registry

    registry = get_registry()
    out = []
    for name in BUILT_IN_BACKENDS:
        try:
            probe = registry.backend(name).probe()
        except Exception as exc:  # a summary line must never break the run's report
            out.append((name, str(exc)))
            continue
        if not probe.available:
            out.append((name, probe.reason))
    return out


# -- which backends the run covered, in the terminal summary ---------------------------------------
_BACKEND_OF: dict[str, str] = {}  # test id -> the backend spec it ran on


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is not None and "opswitch_backend" in spec.params:
            _BACKEND_OF[item.nodeid] = str(spec.params["opswitch_backend"])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line per backend: how many of its tests passed, failed or were skipped."""
    counts: dict[str, Counter] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            backend = _BACKEND_OF.get(getattr(report, "nodeid", ""))
            if backend is not None and (report.when == "call" or outcome != "passed"):
                counts.setdefault(backend, Counter())[outcome] += 1
    if not counts and not REQUIRED_BACKENDS:
        return
    terminalreporter.section("opswitch backends")
    for backend in sorted(counts):
        figures = ", ".join(f"{n} {what}" for what, n in sorted(counts[backend].items()))
        terminalreporter.write_line(f"{backend}: {figures}")
    if counts:  # the built-in backends whose tests were never generated, and why
        for name, reason in _unavailable_built_ins():
            terminalreporter.write_line(f"{name}: not run ({reason})")
    required = ", ".join(REQUIRED_BACKENDS) or "none"
    source = "OPSWITCH_REQUIRE_BACKENDS" if _override is not None else "CI" if IN_CI else "CI not set"
    terminalreporter.write_line(f"required ({source}): {required}")
