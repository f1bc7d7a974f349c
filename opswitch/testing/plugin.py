"""pytest plugin (entry point ``pytest11``): the ``--opswitch-backend`` option
and the ``opswitch_backend`` fixture the conformance tests are parametrized by.

A backend named with ``--opswitch-backend`` must be usable: if its probe says
it is unavailable, every test fails with the probe's reason (a plugin's CI
must not go green on a backend that cannot run).  ``--opswitch-allow-unavailable``
turns that into skips, for CI matrices that run where some hardware is absent.
"""

from __future__ import annotations

import pytest

from opswitch.core.backend import Backend
from opswitch.core.registry import Registry, get_registry


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("opswitch", "opswitch backend conformance")
    group.addoption(
        "--opswitch-backend",
        action="append",
        default=[],
        metavar="NAME[:DEVICE][:DTYPE]",
        help="backend(s) to check, e.g. blas, opencl:1 or naive:float64 (default: every available one)",
    )
    group.addoption(
        "--opswitch-allow-unavailable",
        action="store_true",
        help="skip, instead of failing, the tests of a named backend that is unavailable here",
    )


def backend_specs(config: pytest.Config) -> list[str]:
    """The backends to check: as given, or every available one in each dtype it offers."""
    given = [s.strip() for opt in config.getoption("opswitch_backend") for s in opt.split(",")]
    if any(given):
        return [s for s in given if s]
    registry = get_registry()
    specs = []
    for name in registry.available():
        for base in runtime_specs(registry, name):
            for dtype in registry.backend_class(name).dtypes:
                specs.append(base if dtype == "float32" else f"{base}:{dtype}")
    return specs


def runtime_specs(registry: Registry, name: str) -> list[str]:
    """``[name]``, or one ``name:DEVICE`` per runtime where a backend's devices run
    on several that work (PoCL and Intel's OpenCL, say): two compilers of one set
    of kernels, so undefined behaviour in a kernel shows up as a difference."""
    first_per_runtime: dict[str, str] = {}
    for device in registry.devices(name):
        if device.works and device.runtime:
            first_per_runtime.setdefault(device.runtime, device.id)
    if len(first_per_runtime) < 2:
        return [name]
    return [f"{name}:{device_id}" for device_id in first_per_runtime.values()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "opswitch_backend" in metafunc.fixturenames:
        metafunc.parametrize("opswitch_backend", backend_specs(metafunc.config), indirect=True)


@pytest.fixture
def opswitch_backend(request: pytest.FixtureRequest) -> Backend:
    """A probed, prepared backend instance for ``name[:device][:dtype]``."""
    from opswitch.core.errors import BackendError

    registry = get_registry()
    try:
        backend = registry.backend(request.param)
        registry.bind(backend)  # probe and prepare: unavailable is an error with the reason
    except BackendError as exc:
        if request.config.getoption("opswitch_allow_unavailable"):
            pytest.skip(str(exc))
        pytest.fail(f"{exc} (pass --opswitch-allow-unavailable to skip instead)", pytrace=False)
    return backend
