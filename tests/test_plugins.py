"""Third-party plugins for real: the installed example distribution, a broken
one, and proof that the conformance suite fails a wrong backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest


def opswitch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opswitch", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def example_installed() -> None:
    try:
        metadata.distribution("opswitch-example")
    except metadata.PackageNotFoundError:
        pytest.fail("the example plugin is not installed: pip install -e plugins/opswitch-example")


def test_example_plugin_is_listed_with_partial_coverage(example_installed):
    result = opswitch("backends", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["backends"]}
    example = rows["example"]
    assert example["available"] and example["source"] == "opswitch-example 0.1.0"
    assert set(example["native_ops"]) == {"add", "gelu", "layernorm"}
    assert "attention" in example["fallback_ops"]
    assert rows["naive"]["available"] and rows["blas"]["available"]

    table = opswitch("backends", "--ops").stdout
    assert "opswitch-example 0.1.0" in table
    op_line = next(line for line in table.splitlines() if line.startswith("attention"))
    assert op_line.split()[-1] == "fallback"  # the example column is last (lowest priority)


def test_autoload_switch_hides_entry_point_plugins(example_installed):
    result = opswitch("backends", "--json", env={"OPSWITCH_DISABLE_PLUGIN_AUTOLOAD": "1"})
    names = [row["name"] for row in json.loads(result.stdout)["backends"]]
    assert "example" not in names and "naive" in names


def test_a_plugin_that_fails_to_import_is_listed_as_broken(tmp_path):
    """A real distribution (dist-info on the path) whose module raises on import."""
    dist = tmp_path / "opswitch_broken-9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: opswitch-broken\nVersion: 9.9\n")
    (dist / "entry_points.txt").write_text("[opswitch]\nbroken = opswitch_broken_mod\n")
    (tmp_path / "opswitch_broken_mod.py").write_text("raise ImportError('needs libfrob.so')\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = opswitch("backends", env=env)
    assert result.returncode == 0, result.stderr
    assert "broken  BROKEN  (opswitch-broken 9.9): ImportError: needs libfrob.so" in result.stdout
    assert "naive" in result.stdout
    payload = json.loads(opswitch("backends", "--json", env=env).stdout)
    broken = {b["name"]: b for b in payload["broken_plugins"]}
    assert broken["broken"]["source"] == "opswitch-broken 9.9"
    chosen = opswitch("generate", "--backend", "broken", "--prompt", "hi", env=env)
    assert chosen.returncode == 2 and len(chosen.stderr.strip().splitlines()) == 1
    assert "its plugin (opswitch-broken 9.9) failed: ImportError: needs libfrob.so" in chosen.stderr


def test_conformance_command_passes_for_the_example_plugin(example_installed):
    """The exact command the README gives plugin authors."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "opswitch.testing",
         "--opswitch-backend=example", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


SCRATCH_BACKEND = textwrap.dedent(
    """
    import math
    import numpy as np
    from opswitch.core import Backend, hookimpl
    from opswitch.core.registry import get_registry


    class Scratch(Backend):
        name = "scratch"

        def gelu(self, x):  # wrong on purpose: the exact erf GELU, not GPT-2's tanh one
            from scipy.special import erf
            return (0.5 * x * (1 + erf(x / math.sqrt(2)))).astype(self.dtype)

        def cross_entropy(self, logits, targets):  # wrong on purpose: no max subtraction, a mean
            rows = np.arange(len(targets))
            lse = np.log(np.exp(logits).sum(axis=-1))
            return np.array([(lse - logits[rows, targets]).mean()], dtype=logits.dtype)


    class Plugin:
        @hookimpl
        def opswitch_backends(self):
            return [Scratch]


    get_registry().register(Plugin(), "scratch", "scratch 0.0")
    """
)


def test_the_suite_fails_a_deliberately_wrong_backend(pytester, monkeypatch):
    pytester.makepyfile(scratch_backend=SCRATCH_BACKEND)
    monkeypatch.setenv("PYTHONPATH", f"{pytester.path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = pytester.runpytest_subprocess(
        "-p", "scratch_backend", "--pyargs", "opswitch.testing", "--opswitch-backend=scratch",
        "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 8, result.stdout.str()[-2000:]
    failed = "\n".join(line for line in result.stdout.lines if line.startswith("FAILED"))
    assert "gelu-3x17" in failed
    assert "cross_entropy-5x7" in failed  # a mean is not the summed loss
    assert "cross_entropy-3x33-scale10000" in failed  # overflow: inf/NaN must never pass
    assert "cross_entropy-1x1" not in failed  # one row, no overflow: the mean is the sum
    assert outcomes.get("passed", 0) > 0  # the fallback ops still pass
    assert "linear" not in failed and "attention-seq1" not in failed
