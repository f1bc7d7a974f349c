"""Side-by-side speed measurements: our backends beside HF transformers + torch.

The machine is shared and noisy, so every figure is a median over repeats,
each repeat starts only once the machine is idle (read from /proc/stat),
and the interference seen while measuring is reported, not hidden.
Comparisons are ratios within one run, never absolute times across runs.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


# -- a quiet machine ------------------------------------------------------------
def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Interference:
    """How much CPU other processes took while we measured."""

    repeats: int = 0
    disturbed: int = 0
    worst: float = 0.0  # the largest share of the machine others used during a repeat
    waited: float = 0.0  # seconds spent waiting for an idle machine

    def summary(self) -> str:
        if not self.repeats:
            return "interference: not measured"
        return (
            f"interference: {self.disturbed} of {self.repeats} repeats saw other load "
            f"(worst {self.worst:.0%} of the machine); waited {self.waited:.1f}s for idle"
        )


class Quiet:
    """Waits for an idle machine before a repeat and measures others' load during it."""

    def __init__(self, threshold: float = 0.15, max_wait: float = 10.0) -> None:
        self.threshold, self.max_wait = threshold, max_wait
        self.report = Interference()
        self.available = os.path.exists("/proc/stat")
        self.ncpu = os.cpu_count() or 1

    def wait_idle(self) -> None:
        if not self.available:
            return
        start = time.perf_counter()
        while time.perf_counter() - start < self.max_wait:
            busy0, total0 = _cpu_times()
            time.sleep(0.2)
            busy1, total1 = _cpu_times()
            if (busy1 - busy0) / max(total1 - total0, 1.0) < self.threshold:
                break
        self.report.waited += time.perf_counter() - start

    def measure(self, fn: Callable[[], float]) -> float:
        """Run one repeat after waiting for idle; record others' CPU share during it."""
        self.wait_idle()
        if not self.available:
            return fn()
        busy0, _ = _cpu_times()
        own0, wall0 = _own_cpu_seconds(), time.perf_counter()
        value = fn()
        busy1, _ = _cpu_times()
        own = _own_cpu_seconds() - own0
        wall = time.perf_counter() - wall0
        clock = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        others = max((busy1 - busy0) / clock - own, 0.0) / max(wall * self.ncpu, 1e-9)
        self.report.repeats += 1
        if others > self.threshold:
            self.report.disturbed += 1
        self.report.worst = max(self.report.worst, others)
        return value


# -- results --------------------------------------------------------------------
@dataclass
class Row:
    """One measured thing on one implementation: median over repeats."""

    what: str
    impl: str
    samples: list[float] = field(default_factory=list)
    unit: str = "s"
    work: float = 0.0  # e.g. FLOPs or bytes per call, for rates

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> Callable[[], float]:
    """A repeat that returns the wall time of one call of ``fn``."""

    def run() -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return run


# -- model benchmarks -------------------------------------------------------------
def random_gpt2_params(config, seed: int = 0) -> dict:
    """Random weights of a config's shapes (speed does not depend on the values)."""
    from opswitch.model.weights import nest_params

    rng = np.random.default_rng(seed)
    flat = {
        name: (rng.standard_normal(shape, dtype=np.float32) * 0.02)
        for name, shape in config.param_shapes().items()
    }
    return nest_params(flat, config.n_layer)


def bench_model_ours(
    model, prompt: list[int], new_tokens: int, repeats: int, quiet: Quiet
) -> tuple[Row, Row]:
    """Prefill seconds and decode tokens/s of ``model`` (an opswitch GPT2)."""
    from opswitch.generation import GenerationConfig, generate_ids

    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0, stop_token=-1)
    name = model.backend.name
    prefill, decode = Row("prefill", name, unit="s"), Row("decode", name, unit="tok/s")
    generate_ids(model, prompt, config.replace(max_new_tokens=2))  # warm-up: kernels, caches

    def one() -> float:
        result = generate_ids(model, prompt, config)
        prefill.samples.append(result.prefill_seconds)
        return result.tokens_per_second

    for _ in range(repeats):
        decode.samples.append(quiet.measure(one))
    return prefill, decode


def bench_model_torch(config, prompt: list[int], new_tokens: int, repeats: int, quiet: Quiet):
    """HF transformers + torch on the CPU: the same shape, tokens and greedy decode."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=config.n_inner,
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    ids = torch.tensor([prompt])
    prefill, decode = Row("prefill", "torch", unit="s"), Row("decode", "torch", unit="tok/s")

    def one() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            first = time.perf_counter()
            past = out.past_key_values
            for _ in range(new_tokens - 1):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            end = time.perf_counter()
        prefill.samples.append(first - start)
        return (new_tokens - 1) / (end - first)

    one()  # warm-up
    for _ in range(repeats):
        decode.samples.append(quiet.measure(one))
    return prefill, decode


# -- op benchmarks ---------------------------------------------------------------
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


def bench_op_ours(backend, ops, label, m, k, n, transpose_b, repeats, quiet: Quiet) -> Row:
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((m, k), dtype=np.float32))
    w_host = rng.standard_normal((n, k) if transpose_b else (k, n), dtype=np.float32)
    w = backend.to_device(w_host)
    b = backend.to_device(rng.standard_normal(n, dtype=np.float32))
    if transpose_b:
        def call():
            return ops.matmul(x, w, transpose_b=True)
    else:
        def call():
            return ops.linear(x, w, b)
    return _bench_call(label, backend.name, call, backend.synchronize, m, k, n, repeats, quiet)


def bench_op_torch(label, m, k, n, transpose_b, repeats, quiet: Quiet) -> Row:
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)  # torch's Linear layout: [out, in]
    b = torch.randn(n, generator=gen)
    if transpose_b:
        def call():
            return x @ w.T
    else:
        def call():
            return torch.nn.functional.linear(x, w, b)
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
