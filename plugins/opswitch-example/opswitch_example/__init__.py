"""An example third-party backend, installed like any plugin distribution.

It implements only ``add``, ``gelu`` and ``layernorm`` (with float32 numpy
written in its own way); every other op — attention over the caller-owned
KV cache included, ``attention_batch(qkv, n_head, step)`` with its
``opswitch.core.LayerStep`` — falls back to opswitch's reference, which
``opswitch backends --ops`` shows.  It needs no ``begin_step``/``end_step``:
it records nothing across a step.  It keeps no state, so its ops are thread-safe (the
default), and it has one device, ``example:0`` (the default
``list_devices``).  Copy this directory to start a backend of your own; the
README's "Write a backend" lists what else a backend may declare.
"""

from __future__ import annotations

import numpy as np

from opswitch.core import Backend, Probe, hookimpl


class ExampleBackend(Backend):
    name = "example"
    priority = 5  # below the built-ins: auto never prefers an example
    description = "example plugin: add, gelu and layernorm; the rest falls back"
    dtypes = ("float32",)
    thread_safe = True

    def _probe_impl(self) -> Probe:
        return Probe.ok(f"host CPU, numpy {np.__version__}")

    def add(self, a, b):  # [...], [...] -> [...]
        return np.add(a, b, dtype=self.dtype)

    def gelu(self, x):  # [...] -> [...]   tanh approximation
        c = np.float32(np.sqrt(2.0 / np.pi))
        return 0.5 * x * (1.0 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))

    def layernorm(self, x, g, b, eps=1e-5):  # [n_seq, n], [n], [n] -> [n_seq, n]
        centred = x - x.mean(axis=-1, keepdims=True)
        inv_std = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
        return (centred * inv_std) * g + b


@hookimpl
def opswitch_backends() -> list[type[Backend]]:
    return [ExampleBackend]
