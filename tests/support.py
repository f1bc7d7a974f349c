"""What the test suite needs from its environment, and what CI insists on."""

from __future__ import annotations

import importlib
import os

import pytest

IN_CI = bool(os.environ.get("CI"))
# CI declares what must be present: a backend or the HF reference quietly missing
# there would shrink the parity and conformance matrices without failing anything.
_DEFAULT_REQUIRED = "naive,blas,opencl" if IN_CI else ""
REQUIRED_BACKENDS = [
    name for name in os.environ.get("OPSWITCH_REQUIRE_BACKENDS", _DEFAULT_REQUIRED).split(",") if name
]


def require(module: str):
    """Import ``module`` for a reference test: a skip on a developer's machine, a failure in CI."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if IN_CI:
            raise RuntimeError(f"CI needs {module} for the reference tests: {exc}") from exc
        pytest.skip(f"{module} is not installed ({exc})", allow_module_level=True)
