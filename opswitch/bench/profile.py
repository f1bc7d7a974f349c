"""Time per op of a prefill and of decode steps, through the op table's supported hook
(``OpTable.instrumented``), and sampling's time per step, for its share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Profile:
    """Wall time per op over some calls, and the step time they add up to."""

    what: str
    per_op: dict[str, list[float]] = field(default_factory=dict)
    total: float = 0.0
    calls: int = 1


def profile_model(model, prompt: list[int], decode_steps: int = 8) -> tuple[Profile, Profile, float]:
    """Per-op wall time of a prefill of ``prompt`` and of ``decode_steps`` decode steps
    (averaged), by wrapping the bound op table; and sampling's time per step
    (top-k 40, top-p 0.9 over the real vocabulary), for its share."""
    from opswitch.generation import GenerationConfig
    from opswitch.generation.sampling import sample_next

    sync = model.backend.synchronize
    current: list[Profile] = []
    depth = [0]

    def wrap(name, fn):
        def run(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)  # nested (per-sequence attention): counted by the outer op
            depth[0] += 1
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                sync()
            finally:
                depth[0] -= 1
            current[0].per_op.setdefault(name, []).append(time.perf_counter() - start)
            return out

        return run

    with model.ops.instrumented(wrap):
        prefill = Profile(f"prefill of {len(prompt)} tokens")
        decode = Profile("decode step", calls=decode_steps)
        cache = model.new_cache(len(prompt) + decode_steps + 1)
        current[:] = [prefill]
        start = time.perf_counter()
        logits = model.next_logits(prompt, cache)
        prefill.total = time.perf_counter() - start
        current[:] = [decode]
        token = int(np.argmax(logits))
        start = time.perf_counter()
        for _ in range(decode_steps):
            logits = model.next_logits([token], cache)
            token = int(np.argmax(logits))
        decode.total = time.perf_counter() - start
    config = GenerationConfig(temperature=0.8, top_k=40, top_p=0.9)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(20):
        sample_next(logits, config, rng)
    return prefill, decode, (time.perf_counter() - start) / 20
