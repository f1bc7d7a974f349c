"""``naive``: the catalogue's numpy references, run as a backend.

Slow and obvious on purpose: it is what every other backend is compared
with, and the only one that computes in float64 on request.
"""

from __future__ import annotations

import platform

from opswitch.core import Backend, Probe, hookimpl
from opswitch.core import ops as reference


class NaiveBackend(Backend):
    name = "naive"
    priority = 10
    description = "plain numpy reference (float32, or float64 on request)"
    dtypes = ("float32", "float64")

    def _probe_impl(self) -> Probe:
        return Probe.ok(f"host CPU ({platform.machine() or 'unknown'}), numpy {self.dtype.name}")

    matmul = staticmethod(reference.matmul)
    linear = staticmethod(reference.linear)
    add = staticmethod(reference.add)
    layernorm = staticmethod(reference.layernorm)
    gelu = staticmethod(reference.gelu)
    softmax = staticmethod(reference.softmax)
    attention = staticmethod(reference.attention)
    embedding = staticmethod(reference.embedding)
    slice_rows = staticmethod(reference.slice_rows)
    cross_entropy = staticmethod(reference.cross_entropy)


@hookimpl
def opswitch_backends() -> list[type[Backend]]:
    return [NaiveBackend]
