"""Lint and type checks as tests, so `pytest` (the README's test command, and CI's) runs them.

ruff covers the package, the tests, the benchmarks, the example plugins and tools/
mypy checks ``opswitch/`` at the strictness set in pyproject.toml's
``[tool.mypy]`` (function bodies included).  Each fails with the tool's own
report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import require

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_ruff_finds_nothing():
    require("ruff")
    paths = ("opswitch", "tests", "benchmarks", "plugins", "tools", "conftest.py")  # as tox -e lint
    result = _run("ruff", "check", "--no-cache", *paths, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_no_type_errors():
    require("mypy")
    # the config's `files` (opswitch/); the cache under .mypy_cache makes a rerun take seconds
    result = _run("mypy", timeout=900)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
