"""pytest plugin (entry point ``pytest11``): the ``--opswitch-backend`` option
and the ``opswitch_backend`` fixture the conformance tests are parametrized by."""

from __future__ import annotations

import pytest

from opswitch.core.registry import get_registry


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("opswitch", "opswitch backend conformance")
    group.addoption(
        "--opswitch-backend",
        action="append",
        default=[],
        metavar="NAME[:DTYPE]",
        help="backend(s) to check, e.g. blas or naive:float64 (default: every available one)",
    )


def backend_specs(config: pytest.Config) -> list[str]:
    """The backends to check: as given, or every available one in each dtype it offers."""
    given = [s.strip() for opt in config.getoption("opswitch_backend") for s in opt.split(",")]
    if any(given):
        return [s for s in given if s]
    registry = get_registry()
    specs = []
    for name in registry.available():
        for dtype in type(registry.backend(name)).dtypes:
            specs.append(name if dtype == "float32" else f"{name}:{dtype}")
    return specs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "opswitch_backend" in metafunc.fixturenames:
        metafunc.parametrize("opswitch_backend", backend_specs(metafunc.config), indirect=True)


@pytest.fixture
def opswitch_backend(request: pytest.FixtureRequest):
    """A probed, available backend instance for ``name[:dtype]``; skips with the reason if not."""
    from opswitch.core.errors import BackendError

    name, _, dtype = request.param.partition(":")
    registry = get_registry()
    try:
        backend = registry.backend(name, dtype or "float32")
    except BackendError as exc:
        pytest.fail(str(exc), pytrace=False)
    probe = backend.probe()
    if not probe.available:
        pytest.skip(f"backend {name!r} unavailable: {probe.reason}")
    return backend
