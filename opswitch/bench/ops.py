"""GPT-2's GEMV (decode) and GEMM (prefill) shapes, one op at a time: ours beside torch.

Decode reads each weight once per token, so a GEMV cycles through copies of
its weight that together pass the last-level cache: read from DRAM, as in a model.
"""

from __future__ import annotations

import time

import numpy as np

from opswitch.bench.idle import Quiet
from opswitch.bench.machine import l3_bytes
from opswitch.bench.rows import Row


def op_shapes(n_embd: int, d_ff: int, vocab: int, prefill: int) -> list[tuple[str, int, int, int, bool]]:
    """(label, m, k, n, transpose_b): GPT-2's GEMV (decode) and GEMM (prefill) shapes."""
    shapes = []
    for m, phase in ((1, "decode"), (prefill, "prefill")):
        shapes += [
            (f"{phase} c_attn", m, n_embd, 3 * n_embd, False),
            (f"{phase} c_fc", m, n_embd, d_ff, False),
            (f"{phase} mlp c_proj", m, d_ff, n_embd, False),
        ]
    shapes.append(("decode lm_head", 1, n_embd, vocab, True))
    return shapes


def _copies(m: int, nbytes: int) -> int:
    """How many copies of a weight to cycle through: for a GEMV (decode) enough to
    pass 4× the last-level cache, so it is read from DRAM as in a model; one for GEMM."""
    return 1 if m > 1 else max(1, -(-4 * l3_bytes() // nbytes))


def bench_op_ours(backend, ops, label, m, k, n, transpose_b, repeats, quiet: Quiet) -> Row:
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((m, k), dtype=np.float32))
    w_host = rng.standard_normal((n, k) if transpose_b else (k, n), dtype=np.float32)
    ws = [backend.to_device(w_host.copy()) for _ in range(_copies(m, w_host.nbytes))]
    b = backend.to_device(rng.standard_normal(n, dtype=np.float32))
    turn = [0]

    def call():
        turn[0] = (turn[0] + 1) % len(ws)
        if transpose_b:
            return ops.matmul(x, ws[turn[0]], transpose_b=True)
        return ops.linear(x, ws[turn[0]], b)

    return _bench_call(label, backend.name, call, backend.synchronize, m, k, n, repeats, quiet)


def bench_op_torch(label, m, k, n, transpose_b, repeats, quiet: Quiet) -> Row:
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)  # torch's Linear layout: [out, in]
    ws = [w.clone() for _ in range(_copies(m, w.numel() * 4))]
    b = torch.randn(n, generator=gen)
    turn = [0]

    def call():
        turn[0] = (turn[0] + 1) % len(ws)
        if transpose_b:
            return x @ ws[turn[0]].T
        return torch.nn.functional.linear(x, ws[turn[0]], b)

    with torch.inference_mode():
        return _bench_call(label, "torch", call, lambda: None, m, k, n, repeats, quiet)


def _bench_call(label, impl, call, sync, m, k, n, repeats, quiet: Quiet) -> Row:
    call()
    sync()  # warm-up: compile, allocate
    inner = max(1, int(0.05 / max(_once(call, sync), 1e-7)))  # ~50 ms a repeat
    row = Row(label, impl, unit="GFLOP/s", work=2.0 * m * k * n)

    def repeat() -> float:
        start = time.perf_counter()
        for _ in range(inner):
            call()
        sync()
        return (time.perf_counter() - start) / inner

    for _ in range(repeats):
        row.samples.append(quiet.measure(repeat))
    return row


def _once(call, sync) -> float:
    start = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - start
