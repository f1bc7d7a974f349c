"""Side-by-side speed measurements: our backends beside HF transformers + torch.

The machine is shared and noisy, so every figure is a median over repeats,
each repeat starts only once the machine is idle (read from /proc/stat),
and the interference seen while measuring is reported, not hidden.
Comparisons are ratios within one run, never absolute times across runs.
"""

from __future__ import annotations

import os
import statistics
import sys
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


# -- the physical limit: memory bandwidth ------------------------------------------
@dataclass
class Bandwidth:
    """DRAM bandwidth measured now: a parallel read of a large array and a STREAM triad."""

    read: float  # bytes/s
    triad: float  # bytes/s, counting the three arrays as STREAM does
    threads: int
    how: str


SIMD_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "avx2", "fma", "f16c")


def cpu_description() -> str:
    """The CPU's model and the vector features our speed depends on: claims are per CPU kind."""
    import platform

    name, family, model, flags = platform.processor() or platform.machine(), "?", "?", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    name = value
                elif key == "cpu family":
                    family = value
                elif key == "model":
                    model = value
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    features = [flag for flag in SIMD_FLAGS if flag in flags] or ["features unknown"]
    return f"{name} (family {family}, model {model}; {os.cpu_count()} logical CPUs; {' '.join(features)})"


def l3_bytes() -> int:
    """The last-level cache size (so benchmarks can go past it), 32 MiB if unknown."""
    for index in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
            return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
        except (OSError, ValueError, KeyError):
            continue
    return 32 << 20


def measure_bandwidth(quiet: Quiet, repeats: int, mbytes: int = 256) -> Bandwidth:
    """Read and triad over arrays 8× the last-level cache (at least ``mbytes``): DRAM,
    on all of numba's threads when numba is installed, else numpy on one thread."""
    n = (mbytes << 20 if mbytes < 64 else max(mbytes << 20, 8 * l3_bytes())) // 4
    a = np.ones(n, dtype=np.float32)
    b, c = np.ones(n // 2, dtype=np.float32), np.ones(n // 2, dtype=np.float32)
    dst = np.empty(n // 2, dtype=np.float32)
    wanted = os.environ.get("OPSWITCH_NUM_THREADS")
    if wanted and "numba" not in sys.modules:  # the limit on the threads the engines get
        os.environ["NUMBA_NUM_THREADS"] = wanted
    try:
        from opswitch.cli import bench_kernels as k

        threads, how = k.num_threads(), "numba"
        read, triad = (lambda: k.read(a, threads)), (lambda: k.triad(dst, b, c, np.float32(3.0)))
    except ImportError:
        threads, how = 1, "numpy (1 thread: pip install 'opswitch[jit]' for all cores)"
        read = a.sum

        def triad() -> None:
            np.multiply(c, np.float32(3.0), out=dst)
            np.add(dst, b, out=dst)

    read(), triad()  # warm-up: page faults, compilation
    t_read = statistics.median(quiet.measure(timed(read)) for _ in range(repeats))
    t_triad = statistics.median(quiet.measure(timed(triad)) for _ in range(repeats))
    return Bandwidth(a.nbytes / t_read, 3 * dst.nbytes / t_triad, threads, how)


def weight_bytes_per_token(config, fmt: str) -> int:
    """Bytes of weights one decode step reads in storage format ``fmt``: every matrix
    (the tied embedding once, as the lm_head) plus the float32 vectors."""
    per = {"f32": 4, "f16": 2, "bf16": 2, "int8": 1}[fmt]
    e, f, v, n_layer = config.n_embd, config.d_ff, config.vocab_size, config.n_layer
    matrices = n_layer * (e * 3 * e + e * e + e * f + f * e) + v * e
    vectors = n_layer * (3 * e + e + f + e + 4 * e) + 2 * e
    scales = (n_layer * (3 * e + e + f + e) + v) * 4 if fmt == "int8" else 0
    return matrices * per + vectors * 4 + scales


def kv_bytes_read(config, position: int) -> int:
    """Bytes of KV cache one decode step at ``position`` reads (float32 keys and values)."""
    return 2 * config.n_layer * config.n_embd * position * 4


# -- decode, prefill, late decode -------------------------------------------------------
def decode_rate(model, prompt: list[int], new_tokens: int, repeats: int, quiet: Quiet) -> Row:
    """Greedy decode tokens/s after ``prompt``, the engine alone (argmax, no sampling).

    The prompt is prefilled once; each repeat rewinds the cache to the prompt's
    end and decodes ``new_tokens`` (so decode late in the context costs no prefill)."""
    row = Row("decode", model.backend.name, unit="tok/s")
    cache = model.new_cache(len(prompt) + new_tokens)
    first = int(np.argmax(model.next_logits(prompt, cache)))

    def one() -> float:
        cache.length, token = len(prompt), first
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(np.argmax(model.next_logits([token], cache)))
        return new_tokens / (time.perf_counter() - start)

    one()  # warm-up
    for _ in range(repeats):
        row.samples.append(quiet.measure(one))
    return row


def prefill_time(model, prompt: list[int], repeats: int, quiet: Quiet) -> Row:
    """Seconds to process ``prompt`` and produce the first token's logits."""
    row = Row("prefill", model.backend.name, unit="s")

    def one() -> float:
        cache = model.new_cache(len(prompt))
        start = time.perf_counter()
        model.next_logits(prompt, cache)
        return time.perf_counter() - start

    one()
    for _ in range(repeats):
        row.samples.append(quiet.measure(one))
    return row


def hf_model(config):
    """HF ``GPT2LMHeadModel`` of ``config``'s shape, random weights, eval mode."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=config.n_inner,
        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1,
    )
    return transformers.GPT2LMHeadModel(hf_config).eval()


def torch_decode_rate(model, prompt: list[int], new_tokens: int, repeats: int, quiet: Quiet) -> Row:
    """HF + torch greedy decode with ``past_key_values``, as ``generate`` does it; the
    prompt's cache is computed once and cropped back to it before each repeat."""
    import torch

    row = Row("decode", "torch", unit="tok/s")
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        past, first = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def one() -> float:
            extra = past.get_seq_length() - len(prompt)
            if extra:
                past.crop(-extra)  # transformers 5 crops by a negative count
            token, cache = first, past
            start = time.perf_counter()
            for _ in range(new_tokens):
                result = model(token, past_key_values=cache, use_cache=True)
                cache, token = result.past_key_values, result.logits[:, -1].argmax(-1, keepdim=True)
            return new_tokens / (time.perf_counter() - start)

        one()
        for _ in range(repeats):
            row.samples.append(quiet.measure(one))
    return row


def torch_prefill_time(model, prompt: list[int], repeats: int, quiet: Quiet) -> Row:
    import torch

    row = Row("prefill", "torch", unit="s")
    ids = torch.tensor([prompt])

    def one() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(ids, use_cache=True).logits[:, -1].argmax(-1)
            return time.perf_counter() - start

    one()
    for _ in range(repeats):
        row.samples.append(quiet.measure(one))
    return row


# -- per-op profile ---------------------------------------------------------------------
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
    from opswitch.core.ops import OP_NAMES
    from opswitch.generation import GenerationConfig
    from opswitch.generation.sampling import sample_next

    ops, sync = model.ops, model.backend.synchronize
    current: list[Profile] = []
    depth = [0]
    originals = {name: getattr(ops, name) for name in OP_NAMES}

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

    for name, fn in originals.items():
        setattr(ops, name, wrap(name, fn))
    try:
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
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)
    config = GenerationConfig(temperature=0.8, top_k=40, top_p=0.9)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(20):
        sample_next(logits, config, rng)
    return prefill, decode, (time.perf_counter() - start) / 20


# -- load time and peak memory, in a fresh process -------------------------------------
# `python -c` puts the current directory first on sys.path: run from the parent of a clone
# (which holds a folder named opswitch), the child would import that folder, not opswitch
_NO_CWD_ON_PATH = "import sys\nif sys.path and sys.path[0] in ('', '.'):\n    del sys.path[0]\n"


def python_command(code: str) -> list[str]:
    """``python -c code`` that imports the opswitch this process runs, whatever the cwd holds."""
    return [sys.executable, "-c", _NO_CWD_ON_PATH + code]


_LOAD_SCRIPT = """
import json, sys, time
def hwm():  # peak RSS of this process image (ru_maxrss would include the parent's, kept over exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
engine, path, fmt, backend = sys.argv[1:5]
if engine == "torch":
    import torch, transformers
    torch.set_num_threads(int(sys.argv[5]))
else:
    import opswitch
    from opswitch.core.registry import get_registry
    get_registry().select(backend)  # probe and import the backend's libraries before the clock
base = hwm()
start = time.perf_counter()
if engine == "torch":
    with torch.inference_mode():
        model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
        loaded = time.perf_counter()
        model(torch.tensor([[1, 2, 3]])).logits[0, -1].argmax()
else:
    lm = opswitch.load_model(path, backend=backend, weights=fmt)
    loaded = time.perf_counter()
    lm.model.forward([1, 2, 3])
end = time.perf_counter()
peak = hwm()
print(json.dumps({"load": loaded - start, "first": end - start, "peak": peak, "base": base}))
"""


def load_and_first_token(engine: str, path: str, fmt: str = "f32", backend: str = "",
                         threads: int = 1) -> dict:
    """Load time, load + first token, and peak RSS (total, and the libraries' baseline
    before loading) of a saved model directory, measured in a fresh process."""
    import json
    import subprocess

    result = subprocess.run(
        [*python_command(_LOAD_SCRIPT), engine, path, fmt, backend, str(threads)],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr else "failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- tokenizer throughput ---------------------------------------------------------------
def real_text(path: str | None, mbytes: float = 4.0) -> tuple[str, str]:
    """A few MB of real text: ``path``, else the Python standard library's own source
    (English docstrings and code, present on every machine, the same for one Python)."""
    import sysconfig
    from pathlib import Path

    if path:
        return Path(path).read_text(encoding="utf-8", errors="replace"), path
    parts, size = [], 0
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = file.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text.encode())
        if size >= mbytes * 1e6:
            break
    return "".join(parts), "the Python standard library's *.py files"


# -- one engine in its own process ------------------------------------------------------
def engine_main(argv: list[str] | None = None) -> None:
    """Entry of an engine's process: decode early and late and prefill -> one JSON line.

    argv: engine (``torch`` or ``ours``), model (a directory, or ``shape:NAME`` for
    random weights of a preset, ``tiny`` for the --quick model), backend spec,
    weight format (``FMT:KV`` for a KV-cache format other than f32), repeats, prompt, late,
    prefill and new tokens, idle wait."""
    import json
    import sys

    engine, model_spec, spec, fmt, *numbers = argv if argv is not None else sys.argv[1:]
    repeats, prompt, late, prefill, new = (int(v) for v in numbers[:5])
    quiet = Quiet(max_wait=float(numbers[5]))
    config, params = _engine_weights(model_spec, engine)
    if engine == "torch":
        import torch

        torch.set_num_threads(int(os.environ.get("OPSWITCH_NUM_THREADS", os.cpu_count() or 1)))
        model = hf_model(config) if params is None else params
        decode, first = torch_decode_rate, torch_prefill_time
    else:
        from opswitch.core.registry import get_registry
        from opswitch.model.gpt2 import GPT2

        fmt, _, kv = fmt.partition(":")
        model = GPT2(config, params, get_registry().select(spec).backend, weights=fmt, kv_cache=kv or "f32")
        decode, first = decode_rate, prefill_time
    tokens = [1 + t % (config.vocab_size - 1) for t in range(max(prompt, late, prefill))]
    rows = {"early": decode(model, tokens[:prompt], new, repeats, quiet),
            "late": decode(model, tokens[:late], new, repeats, quiet) if late else None,
            "prefill": first(model, tokens[:prefill], repeats, quiet)}
    out = {k: {"median": r.median, "samples": r.samples} for k, r in rows.items() if r}
    out["interference"] = [quiet.report.disturbed, quiet.report.repeats]
    print(json.dumps(out))


def _engine_weights(model_spec: str, engine: str):
    """(config, params) for ours; (config, None) for torch's random model, or (config, HF model)."""
    from opswitch.model.config import PRESETS, GPT2Config

    if model_spec == "tiny":
        config = GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=2)
    elif model_spec.startswith("shape:"):
        config = PRESETS[model_spec[6:]]
    else:
        from opswitch.model.hub import resolve_model
        from opswitch.model.weights import load_gpt2

        path = resolve_model(model_spec)
        config, params = load_gpt2(path)
        if engine == "torch":
            import transformers

            return config, transformers.GPT2LMHeadModel.from_pretrained(path).eval()
        return config, params
    return config, (None if engine == "torch" else random_gpt2_params(config))


def run_engine(engine: str, model_spec: str, spec: str, fmt: str, repeats: int, prompt: int, late: int,
               prefill: int, new: int, idle_wait: float) -> dict:
    """``engine_main`` in a fresh process (thread pools of engines never share one)."""
    import json
    import subprocess

    code = "from opswitch.cli.benchmark import engine_main; engine_main()"
    numbers = (repeats, prompt, late, prefill, new, idle_wait)
    args = [engine, model_spec, spec, fmt, *(str(v) for v in numbers)]
    result = subprocess.run([*python_command(code), *args], capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])
