"""Registry: discovery, selection rules, op-table resolution and fallback."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from opswitch.core import Backend, Probe, hookimpl
from opswitch.core.errors import BackendError
from opswitch.core.ops import CATALOGUE, OP_NAMES, BackendOps
from opswitch.core.optable import OpTable
from opswitch.core.registry import Registry, get_registry, use_registry


class Halfway(Backend):
    """Implements one op; the rest must fall back to the reference."""

    name = "halfway"
    priority = 99

    def add(self, a, b):
        return a + b


class Missing(Backend):
    name = "missing"
    priority = 100

    def _probe_impl(self) -> Probe:
        return Probe.missing("the frobnicator is not installed: pip install frobnicator")


class Plugin:
    @hookimpl
    def opswitch_backends(self):
        return [Halfway, Missing]


@pytest.fixture
def registry() -> Registry:
    r = Registry(autoload=False)
    r.register(Plugin(), "test-plugin", "test 1.0")
    return r


def test_auto_picks_the_highest_priority_available(registry):
    selection = registry.select("auto")
    assert selection.backend.name == "halfway"  # 'missing' has higher priority but is unavailable
    assert ("missing", "the frobnicator is not installed: pip install frobnicator") in selection.skipped
    assert "highest-priority" in selection.reason and "frobnicator" in selection.reason


def test_comma_list_tries_in_order(registry):
    selection = registry.select("missing,naive,blas")
    assert selection.backend.name == "naive"
    assert "first available in the requested list" in selection.reason


def test_unavailable_explicit_backend_is_an_error_never_a_fallback(registry):
    with pytest.raises(BackendError) as err:
        registry.select("missing")
    message = str(err.value)
    assert "'missing' is unavailable" in message and "frobnicator" in message
    assert "available backends: " in message and "naive" in message and "blas" in message


def test_unknown_backend_names_the_known_ones(registry):
    with pytest.raises(BackendError, match=r"unknown backend 'cudaa'; available backends: .*blas"):
        registry.select("cudaa")
    with pytest.raises(BackendError, match=r"no backend of 'nope,warp' is available .*nope: no backend"):
        registry.select("nope,warp")


def test_a_list_skips_backends_this_machine_lacks_visibly(registry):
    """`warp,opencl,blas` is a preference order that must work where the plugin `warp` is not
    installed (cuda is built in now: tests/test_cuda.py checks its unavailable case)."""
    selection = registry.select("warp,missing,naive")
    assert selection.backend.name == "naive"
    assert ("warp", "no backend of that name is installed") in selection.skipped
    assert "skipped warp (no backend of that name is installed)" in selection.reason


def test_env_var_sets_the_default(registry, monkeypatch):
    monkeypatch.setenv("OPSWITCH_BACKEND", "naive")
    assert registry.select().backend.name == "naive"
    monkeypatch.setenv("OPSWITCH_BACKEND", "missing")
    with pytest.raises(BackendError, match="frobnicator"):
        registry.select()
    assert registry.select("blas").backend.name == "blas"  # an explicit choice beats the env


def test_op_table_resolves_once_and_records_fallbacks(registry):
    backend = registry.backend("halfway")
    table = registry.bind(backend)
    assert table.fallbacks == tuple(op for op in OP_NAMES if op != "add")
    assert table.add == backend.add  # native: the bound method itself, no wrapper
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(table.gelu(x), np.asarray(OpTable(registry.backend("naive")).gelu(x)))


def test_binding_an_unavailable_backend_fails(registry):
    with pytest.raises(BackendError, match="frobnicator"):
        registry.bind(registry.backend("missing"))


def test_backend_instances_are_cached_per_dtype(registry):
    assert registry.backend("naive") is registry.backend("naive")
    assert registry.backend("naive", "float64").dtype == np.float64
    with pytest.raises(BackendError, match="computes in float32"):
        registry.backend("halfway", "float64")


def test_a_plugin_breaking_the_contract_is_reported_not_fatal():
    class Bad:
        @hookimpl
        def opswitch_backends(self):
            return [int]

    class Raises:
        @hookimpl
        def opswitch_backends(self):
            raise RuntimeError("boom")

    r = Registry(autoload=False)
    r.register(Bad(), "bad", "bad 0.1")
    r.register(Raises(), "raises", "raises 0.2")
    assert "naive" in r.names()
    errors = {b.name: b.error for b in r.broken}
    assert "not an opswitch Backend subclass" in errors["bad"]
    assert "RuntimeError: boom" in errors["raises"]


def test_duplicate_backend_names_are_reported():
    class Dup(Backend):
        name = "naive"

    class P:
        @hookimpl
        def opswitch_backends(self):
            return [Dup]

    r = Registry(autoload=False)
    r.register(P(), "dup", "dup 0.1")
    assert any("already provided by built-in" in b.error for b in r.broken)


def test_a_raising_probe_becomes_a_reason():
    class Explodes(Backend):
        name = "explodes"

        def _probe_impl(self):
            raise OSError("driver crashed")

    probe = Explodes().probe()
    assert not probe.available and "OSError: driver crashed" in probe.reason


def test_autoload_can_be_disabled(monkeypatch):
    monkeypatch.setenv("OPSWITCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    r = Registry()
    assert "example" not in r.names()
    assert {"naive", "blas"} <= set(r.names())


def test_a_probe_can_raise_its_priority_for_what_it_found():
    """An OpenCL GPU should outrank BLAS under auto, though its class priority is lower."""

    class FoundGPU(Backend):
        name = "found-gpu"
        priority = 1
        max_priority = 200  # declared, so auto probes it before blas (50)

        def _probe_impl(self):
            return Probe.ok("a GPU", priority=200)

    class P:
        @hookimpl
        def opswitch_backends(self):
            return [FoundGPU]

    r = Registry(autoload=False)
    r.register(P(), "gpu", "gpu 0.1")
    assert r.select("auto").backend.name == "found-gpu"
    assert r.statuses()[0].name == "found-gpu" and r.statuses()[0].priority == 200


def test_the_ops_protocol_is_the_catalogue():
    """BackendOps (what plugin authors type against) names every op, with the reference's parameters."""
    methods = {name for name, _ in inspect.getmembers(BackendOps, inspect.isfunction) if name[0] != "_"}
    assert methods == set(OP_NAMES)
    for name, spec in CATALOGUE.items():
        declared = list(inspect.signature(getattr(BackendOps, name)).parameters)[1:]  # less self
        assert declared == list(inspect.signature(spec.reference).parameters), name


def test_use_registry_installs_one_for_a_block_and_restores_the_last(registry):
    before = get_registry()
    with use_registry(registry):
        assert get_registry() is registry
        with use_registry(None):  # None: a fresh one on first use
            fresh = get_registry()
            assert fresh is not registry and fresh is not before
        assert get_registry() is registry
    assert get_registry() is before
