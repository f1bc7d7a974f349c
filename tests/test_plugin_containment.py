"""A plugin is third-party code: whatever it does at import, registration,
construction or probe, opswitch keeps working and says what went wrong.

The import-time cases are real entry points: a ``*.dist-info`` folder on
PYTHONPATH is a distribution ``importlib.metadata`` finds, as pip would
install it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from opswitch.core import Backend, Probe, hookimpl
from opswitch.core.errors import BackendError
from opswitch.core.registry import Registry, use_registry

PLUGINS = {
    "exits_on_import": "import sys\nsys.exit(3)\n",
    "prints_on_import": "print('HELLO FROM A PLUGIN')\nimport os\nos.write(1, b'RAW FD WRITE\\n')\n",
    "raises_on_import": "raise RuntimeError('no such hardware')\n",
    "hangs_on_import": "import time\ntime.sleep(3600)\n",
}


def _install(tmp_path, name: str, source: str) -> None:
    """A one-module distribution with an ``opswitch`` entry point."""
    (tmp_path / f"{name}.py").write_text(source)
    info = tmp_path / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[opswitch]\n{name} = {name}\n")


@pytest.fixture
def broken_site(tmp_path):
    for name, source in PLUGINS.items():
        _install(tmp_path, name, source)
    return tmp_path


def _run(site, *args, timeout=120):
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OPSWITCH_PROBE_TIMEOUT": "2"}
    return subprocess.run([sys.executable, "-m", "opswitch", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_broken_plugins_never_break_the_tool(broken_site):
    started = time.monotonic()
    listing = _run(broken_site, "backends")
    assert listing.returncode == 0, listing.stderr
    for name in PLUGINS:
        if name != "prints_on_import":
            assert name in listing.stdout and "BROKEN" in listing.stdout
    assert "SystemExit: 3" in listing.stdout and "timed out" in listing.stdout
    assert "HELLO FROM A PLUGIN" not in listing.stdout + listing.stderr
    assert "RAW FD WRITE" not in listing.stdout + listing.stderr
    text = _run(broken_site, "generate", "-q", "--backend", "blas", "--prompt", "It is", "--max-tokens", "5",
                "--seed", "1")
    assert text.returncode == 0, text.stderr
    assert "HELLO" not in text.stdout and "RAW FD" not in text.stdout
    auto = _run(broken_site, "generate", "-q", "--prompt", "It is", "--max-tokens", "3", "--seed", "1")
    assert auto.returncode == 0, auto.stderr
    named = _run(broken_site, "generate", "--backend", "exits_on_import,blas", "--prompt", "It",
                 "--max-tokens", "2")
    assert named.returncode == 0 and "broken" in named.stderr and "SystemExit" in named.stderr
    assert time.monotonic() - started < 100  # the hanging import costs its time limit, not forever


class _Plugin:
    def __init__(self, *classes):
        self.classes = classes

    @hookimpl
    def opswitch_backends(self):
        return list(self.classes)


def _registry(*classes) -> Registry:
    r = Registry(autoload=False)
    r.register(_Plugin(*classes), "bad", "bad 0.1")
    return r


def _backend(**attrs) -> type[Backend]:
    return type("Bad", (Backend,), {"name": "bad", **attrs})


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"name": 5}, "lower-case string `name`"),
        ({"priority": "high"}, "`priority` must be an integer"),
        ({"dtypes": None}, "`dtypes` must be a non-empty tuple"),
        ({"dtypes": ("int4",)}, "`dtypes`"),
        ({"weight_formats": ("q4",)}, "`weight_formats`"),
        ({"thread_safe": "yes"}, "`thread_safe`"),
    ],
)
def test_bad_attributes_are_rejected_at_registration(attrs, message):
    r = _registry(_backend(**attrs))
    assert any(message in b.error for b in r.broken), r.broken
    assert r.select("auto").backend.name != "bad"


def test_constructor_and_probe_failures_are_contained(monkeypatch):
    monkeypatch.setenv("OPSWITCH_PROBE_TIMEOUT", "1")

    def boom(self, dtype="float32", device=None):
        raise SystemExit(4)

    raising = _backend(name="ctor", __init__=boom, priority=999)
    none_probe = _backend(name="noneprobe", priority=998, _probe_impl=lambda self: None)
    hangs = _backend(name="hangs", priority=997, _probe_impl=lambda self: time.sleep(30))
    loud = _backend(name="loud", priority=996, _probe_impl=lambda self: print("LOUD") or Probe.missing("no"))
    r = _registry(raising, none_probe, hangs, loud)
    selection = r.select("auto")  # every one above the built-ins fails, each in its own way
    assert selection.backend.name in ("cpu", "blas")  # the best built-in CPU backend here
    why = dict(selection.skipped)
    assert "SystemExit: 4" in why["ctor"]
    assert "not an opswitch Probe" in why["noneprobe"]
    assert "timed out" in why["hangs"]
    with pytest.raises(BackendError, match="is broken: SystemExit: 4"):
        r.select("ctor")
    rows = {row.name: row for row in r.statuses()}
    assert not rows["hangs"].probe.available and "timed out" in rows["hangs"].probe.reason


def test_an_op_that_raises_is_reported_as_the_backends(tiny_config, tiny_params):
    from opswitch.model.gpt2 import GPT2

    class Buggy(Backend):
        name = "buggy"

        def gelu(self, x):
            raise ZeroDivisionError("oops")

    r = _registry(Buggy)
    with use_registry(r):
        model = GPT2(tiny_config, tiny_params, r.backend("buggy"))
        with pytest.raises(BackendError, match=r"'buggy' failed in op 'gelu': ZeroDivisionError: oops"):
            model.forward([1, 2, 3])
