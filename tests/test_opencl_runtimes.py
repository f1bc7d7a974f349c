"""OpenCL on the machine a user has: the pip-installed runtimes, the device that
works, and one honest line about the ones that do not.

The failure seen on an AMD Zen 5 (PoCL 3.0 with LLVM 14 cannot name the CPU:
"unknown target CPU 'generic'") cannot happen on an older CPU, so these tests
force the wheel's PoCL to fail the same way: a ``sitecustomize`` on the child's
``PYTHONPATH`` makes every PoCL build raise pyopencl's own error with PoCL's
log, exactly as ``clBuildProgram`` reports it there.  Everything else is real:
the ICD loader, both runtimes, our kernels, the CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from typing import ClassVar

import pytest
from helpers import run_cli
from support import IN_CI, require

pyopencl = require("pyopencl")

from opswitch.backends import opencl  # noqa: E402
from opswitch.backends.opencl_devices import first_meaningful_line, runtime_label  # noqa: E402
from opswitch.backends.opencl_icd import intel_runtime  # noqa: E402
from opswitch.core.registry import Registry  # noqa: E402

ZEN5_LOG = (
    "error: unknown target CPU 'generic'\n"
    "note: valid target CPU values are: nocona, core2, penryn, bonnell, atom, silvermont, slm, goldmont,"
    " znver1, znver2, znver3, x86-64, x86-64-v2, x86-64-v3, x86-64-v4\n"
)
FAILING_POCL = textwrap.dedent(f'''
    """Test double for a CPU PoCL 3.0 cannot compile for (see tests/test_opencl_runtimes.py)."""
    import pyopencl as cl

    _build = cl.Program.build

    def build(self, options=[], devices=None, cache_dir=None):
        for device in self._context.devices:
            if "Portable Computing Language" in device.platform.name:
                raise cl.RuntimeError(
                    "clBuildProgram failed: BUILD_PROGRAM_FAILURE - clBuildProgram failed: "
                    "BUILD_PROGRAM_FAILURE - clBuildProgram failed: BUILD_PROGRAM_FAILURE\\n\\n"
                    f"Build on <pyopencl.Device {{device.name!r}} on {{device.platform.name!r}}>:\\n\\n"
                    {ZEN5_LOG!r}
                    "\\n(options: -I /site-packages/pyopencl/cl)"
                )
        return _build(self, options, devices, cache_dir)

    cl.Program.build = build
''')
LOADER_VARIABLES = ("OCL_ICD_VENDORS", "OPENCL_VENDOR_PATH", "OPSWITCH_OPENCL_DEVICE", "PYOPENCL_CTX")


@pytest.fixture(scope="module")
def intel():
    """Intel's CPU runtime, installed by ``opswitch[opencl]``: required in CI."""
    if intel_runtime() is None:
        if IN_CI:
            pytest.fail("CI needs intel-opencl-rt (pip install 'opswitch[opencl]')")
        pytest.skip("intel-opencl-rt is not installed")


def run(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in LOADER_VARIABLES}
    return run_cli(*args, base=clean, env=env, timeout=timeout)


@pytest.fixture
def zen5(tmp_path) -> dict:
    """The environment of a child process in which PoCL cannot build for this CPU."""
    (tmp_path / "sitecustomize.py").write_text(FAILING_POCL)
    path = os.pathsep.join(p for p in [str(tmp_path), os.environ.get("PYTHONPATH", "")] if p)
    return {"PYTHONPATH": path, "XDG_CACHE_HOME": str(tmp_path / "cache")}


def opencl_devices(env: dict) -> tuple[dict, list[str]]:
    r = run("backends", "--json", env=env)
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    row = next(b for b in payload["backends"] if b["name"] == "opencl")
    return row, row["devices"]


def pocl_index(devices: list[str]) -> str:
    line = next(d for d in devices if "Portable Computing Language" in d)
    return line.split()[0].split(":")[1]


# -- the runtimes pip installs ----------------------------------------------


def test_intel_runtime_is_found_with_no_variable_set(intel, tmp_path):
    row, devices = opencl_devices({"XDG_CACHE_HOME": str(tmp_path)})
    assert row["available"], row["reason"]
    assert any("Intel(R) OpenCL" in d and d.endswith(": works") for d in devices), devices
    assert any("Portable Computing Language" in d for d in devices), devices


def test_a_vendors_folder_the_user_chose_is_kept(intel, tmp_path):
    chosen = tmp_path / "vendors"
    chosen.mkdir()  # empty: only what pyopencl's own loader bundles (PoCL) is visible
    _, devices = opencl_devices({"OCL_ICD_VENDORS": str(chosen), "XDG_CACHE_HOME": str(tmp_path)})
    assert devices and not any("Intel" in d for d in devices), devices


# -- a runtime that cannot compile for this CPU --------------------------------


def test_backends_tells_the_truth_about_every_device(intel, zen5):
    row, devices = opencl_devices(zen5)
    assert row["available"] and "Intel(R) OpenCL" in row["device"], row
    pocl = next(d for d in devices if "Portable Computing Language" in d)
    assert "does not work: PoCL 3.0" in pocl and "cannot compile for this CPU" in pocl, pocl
    assert "error: unknown target CPU 'generic'" in pocl and "valid target CPU values" not in pocl
    assert "apt-get install pocl-opencl-icd" in pocl  # the other fix, since Intel's is already here
    assert any("Intel(R) OpenCL" in d and d.endswith(": works") for d in devices)


def test_generate_on_opencl_takes_the_device_that_works(intel, zen5, tiny_model_dir):
    r = run("generate", "--model", str(tiny_model_dir), "--backend", "opencl", "--prompt", "Hi",
            "--max-tokens", "3", "--temperature", "0", env=zen5)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Intel(R) OpenCL" in r.stderr and "Traceback" not in r.stderr


def test_naming_the_device_that_cannot_build_is_an_error_with_its_reason(intel, zen5, tiny_model_dir):
    _, devices = opencl_devices(zen5)
    r = run("generate", "--model", str(tiny_model_dir), "--backend", f"opencl:{pocl_index(devices)}",
            "--prompt", "Hi", "--max-tokens", "3", env=zen5)  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "PoCL 3.0" in lines[0] and "unknown target CPU 'generic'" in lines[0]


def test_with_only_the_failing_runtime_opencl_is_unavailable_and_says_what_to_do(zen5, tmp_path):
    empty = tmp_path / "no-vendors"
    empty.mkdir()
    env = {**zen5, "OCL_ICD_VENDORS": str(empty)}  # Intel's runtime out of the loader's sight
    row, _ = opencl_devices(env)
    assert not row["available"], row
    assert "unknown target CPU 'generic'" in row["reason"] and "PoCL 3.0" in row["reason"]
    assert "pip install 'opswitch[opencl]'" in row["reason"] or "apt-get install" in row["reason"]
    r = run("generate", "--backend", "opencl", "--prompt", "Hi", "--max-tokens", "2", env=env)
    assert r.returncode == 2 and "unknown target CPU" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "--prompt", "Hi", "--max-tokens", "2", "-q", env=env)  # auto is unaffected
    assert r.returncode == 0, r.stderr


# -- pieces ------------------------------------------------------------------


def test_the_compiler_line_is_taken_from_pyopencls_error():
    message = (
        "clBuildProgram failed: BUILD_PROGRAM_FAILURE - clBuildProgram failed: BUILD_PROGRAM_FAILURE\n\n"
        "Build on <pyopencl.Device 'pthread-AMD EPYC' on 'Portable Computing Language'>:\n\n"
        "warning: something harmless\n<source>:12:3: error: use of undeclared identifier 'x'\n\n"
        "(options: -DVW=8)"
    )
    assert first_meaningful_line(message) == "error: use of undeclared identifier 'x'"
    assert first_meaningful_line("clBuildProgram failed: OUT_OF_HOST_MEMORY") == (
        "clBuildProgram failed: OUT_OF_HOST_MEMORY"
    )


def test_runtime_labels_name_the_compiler():
    class Platform:
        name = "Portable Computing Language"
        version = "OpenCL 3.0 PoCL 3.0-rc2  Linux, Release, RELOC, LLVM 14.0.6, SLEEF, DISTRO"

    class Device:
        platform = Platform()
        driver_version = "3.0-rc2"

    assert runtime_label(Device()) == "PoCL 3.0-rc2 (LLVM 14.0.6)"


def test_a_runtime_that_computes_wrongly_is_not_called_available(monkeypatch):
    wrong = opencl.kernel_source().replace("out[j] = a[j] + b[j];", "out[j] = a[j] - b[j];", 1)
    assert wrong != opencl.kernel_source()
    monkeypatch.setattr(opencl, "kernel_source", lambda: wrong)
    monkeypatch.setattr(opencl, "_CHECKS", {})
    for var in LOADER_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(opencl.ENV_TUNING, "cpu")  # a fresh build, not a program cached for the real source
    probe = opencl.OpenCLBackend().probe()
    assert not probe.available
    assert "computes wrongly: add gave" in probe.reason


class Counted:
    """Backends above every built-in that count their prepare() calls."""

    prepared: ClassVar[list[str]] = []


def counting_backend(name: str, priority: int, fails: bool = False) -> type:
    from opswitch.backends.naive import NaiveBackend

    def _prepare_impl(self) -> None:
        Counted.prepared.append(self.name)
        if fails:
            raise RuntimeError("no kernels today")

    return type(name, (NaiveBackend,), {"name": name, "priority": priority, "_prepare_impl": _prepare_impl})


@pytest.mark.parametrize("first_fails", [False, True], ids=["winner-prepares", "winner-fails"])
def test_auto_prepares_only_the_backend_it_chooses(first_fails):
    from opswitch.core import hookimpl

    best, second = counting_backend("best", 300, fails=first_fails), counting_backend("second", 200)

    class Plugin:
        @hookimpl
        def opswitch_backends(self):
            return [best, second]

    registry = Registry(autoload=False)
    registry.register(Plugin(), "counting", "counting 1.0")
    Counted.prepared.clear()
    selection = registry.select("auto")
    if first_fails:
        assert selection.backend.name == "second" and Counted.prepared == ["best", "second"]
        assert "no kernels today" in selection.reason
    else:
        assert selection.backend.name == "best" and Counted.prepared == ["best"]


def test_auto_does_not_build_opencl_kernels_when_another_backend_wins():
    registry = Registry(autoload=False)
    chosen = registry.select("auto")
    if chosen.backend.name == "opencl":
        pytest.skip("opencl is the best backend here (a GPU)")
    assert not registry.backend("opencl")._prepared
