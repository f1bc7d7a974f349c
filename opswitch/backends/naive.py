"""``naive``: the catalogue's numpy references, run as a backend.

Slow and obvious on purpose: it is what every other backend is compared
with.  It computes in float32 or float64 (``naive:float64``), and runs any
weight format by decoding it to the values the format stands for.
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
    kv_formats = ("f32", "f16")  # numpy widens an f16 cache as it reads it

    def _probe_impl(self) -> Probe:
        base = super()._probe_impl()
        if not base.available:
            return base
        return Probe.ok(f"host CPU ({platform.machine() or 'unknown'}), numpy {self.dtype.name}")

    matmul = staticmethod(reference.matmul)
    linear = staticmethod(reference.linear)
    add = staticmethod(reference.add)
    layernorm = staticmethod(reference.layernorm)
    gelu = staticmethod(reference.gelu)
    attention = staticmethod(reference.attention)
    attention_batch = staticmethod(reference.attention_batch)
    embedding = staticmethod(reference.embedding)
    take_rows = staticmethod(reference.take_rows)
    slice_rows = staticmethod(reference.slice_rows)
    concat_rows = staticmethod(reference.concat_rows)
    cross_entropy = staticmethod(reference.cross_entropy)


@hookimpl
def opswitch_backends() -> list[type[Backend]]:
    return [NaiveBackend]
