"""``cuda``: NVIDIA GPUs through CuPy, cuBLAS for the big products, our own kernels for the rest.

Devices are ``cuda:0``, ``cuda:1``, … in the CUDA runtime's order (so
``CUDA_VISIBLE_DEVICES`` applies).  The probe imports CuPy, asks the driver
for the device, its name, memory, compute capability and the CUDA
runtime/driver versions, checks that cuBLAS and NVRTC load and (CuPy 14) that
the CUDA runtime headers CuPy compiles with can be found, and copies a few
bytes through the device; it builds nothing.  ``prepare()`` compiles our
kernels (``cuda_kernels/*.cu``, NVRTC through ``cupy.RawModule``) and runs
one of them on a known input before the backend is used.  Every reason it
gives for not running says what to do about it.

Why the shape of things here:

- Weights are uploaded once; activations stay on the device from op to op
  and only ``to_host`` reads back (a decode step reads the last logits).
  All work goes to one non-blocking stream per backend instance.
- ``linear``/``matmul`` of up to ``GEMV_MAX_M`` rows (decode) are one of our
  GEMV kernels (``gemv.cu``), the bias added in the same pass, for every
  weight format: float32 as it is, f16/bf16/int8 (``weight_formats``) widened
  as read, float32 accumulation.  More rows (a prompt) are one cuBLAS SGEMM,
  the bias folded in (``fill_rows`` writes the bias rows, SGEMM adds
  ``x @ w`` with beta = 1); a reduced-format weight is first widened to a
  float32 scratch copy.  Decode needs no cuBLAS, because CuPy's cuBLAS calls
  refuse to run while a stream is being captured (``NotImplementedError``
  since CuPy 11): a step that calls cuBLAS (a prompt) runs eagerly instead.
- The cuBLAS handle is the backend's own (``cublas.create``), not CuPy's
  per-thread one: ``prepare`` runs in a worker thread that ends, and CuPy
  destroys a thread's handles with it.  A finalizer destroys ours.
- Attention writes into and reads the caller's head-major KV cache in
  place, for the whole ragged batch in one launch (``attention.cu``).  Each
  short sequence's query rows (decode) run the split kernels: keys cut into
  ``ATT_CHUNK``-long splits, merged afterwards, over a grid sized by the
  cache's capacity.  A sequence with ``PREFILL_GEMM_MIN`` or more new rows
  (a prompt) takes two strided-batched SGEMMs around a causal softmax kernel.
- Integers the host hands to an op (token ids, positions, cache lengths,
  cache addresses) go through a *slot arena*: pinned host memory copied to a
  device buffer the kernels read.  Nothing in a kernel's launch depends on
  a value that changes from one decode step to the next, which is what lets
  ``StepGraphs`` capture a decode step as a CUDA graph once and replay it
  (``OPSWITCH_CUDA_GRAPHS=1``; off by default until measured on hardware).
  The model says where a step begins and ends (``begin_step``/``end_step``,
  with its ``core.step.Step``); a graph is kept per step shape
  (``step_key``), whichever sequences' caches it attends.
- Ops are fused without the model asking: a GEMV's launch waits for the next
  op (``Deferred``); if that is the GELU of its output, the GEMV writes both
  (``act``), and if it is the attention of that qkv, the GEMV also writes the
  new keys and values into the caches (no ``kv_write``).  A residual ``add``
  waits the same way for the ``layernorm`` of its sum (``add_layernorm``),
  and that waits for a GEMV of the normalised rows, which then computes them
  itself first (its layernorm prologue): a decode layer is 6 launches.
  Anything else launches the waiting kernel first, as does every boundary
  (``to_host``, an upload, the end of a step), so each op's output still
  holds what the op promises.
- Kernel sources and their ``-D`` options live in ``MODULES``: the backend
  compiles exactly what ``tests/test_cuda_compile.py`` compiles with NVRTC
  for sm_80 and sm_90 in CI, where there is no GPU.

Compute is float32 only (``dtypes``); no float16 compute path yet.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from opswitch.core import Backend, BackendError, Device, Probe, formats, hookimpl
from opswitch.core.step import Step

PRIORITY = 90  # above every CPU backend: auto takes a working GPU
INSTALL_HINT = "CuPy is not installed: pip install 'opswitch[cuda]' (CUDA 12 drivers) or 'opswitch[cuda13]'"
LIBS_HINT = (
    "pip install 'opswitch[cuda]' (CUDA 12) or 'opswitch[cuda13]' (CUDA 13):"
    " they bring CuPy with the CUDA toolkit wheels (cupy-cuda1Nx[ctk])"
)
HEADERS_HINT = (
    "CuPy compiles every kernel against cuda_runtime.h: pip install 'opswitch[cuda]' (CUDA 12:"
    " nvidia-cuda-runtime-cu12) or 'opswitch[cuda13]' (CUDA 13: nvidia-cuda-runtime), or set"
    " CUDA_PATH to a CUDA toolkit that has include/cuda_runtime.h"
)
ENV_GRAPHS = "OPSWITCH_CUDA_GRAPHS"
KERNEL_DIR = Path(__file__).with_name("cuda_kernels")
COMMON = "common.cuh"

# Launch shapes, compiled in where a kernel needs them (see MODULES).
NORM_THREADS = 256  # layernorm / softmax: one block per row
ATT_THREADS = 128  # attention split/combine blocks
ATT_CHUNK = 256  # keys per attention split (its scores sit in shared memory)
GEMV_WARPS = 8  # gemv_n: warps splitting k
GEMV_MAX_M = 8  # rows a GEMV kernel takes; more go through SGEMM
GEMVT_THREADS = 256  # gemv_t: one warp per output column
# a layernorm prologue's rows in shared memory: 48 KiB (no opt-in) less gemv_n's static 8 KiB + 128 B
GEMV_LN_FLOATS = (48 * 1024 - 8 * 1024 - 1024) // 4  # (a 1 KiB margin)
EW_THREADS = 256  # elementwise kernels
EW_MAX_BLOCKS = 1 << 16  # elementwise kernels loop over the rest
PREFILL_GEMM_MIN = 16  # a sequence with this many new rows takes the SGEMM attention path
SLOT_CAPACITY = 1 << 20  # int64 slots in the arena (8 MiB pinned + 8 MiB device)

# file -> its -D options; every .cu file is compiled as common.cuh + file.
MODULES: dict[str, tuple[str, ...]] = {
    "elementwise.cu": (),
    "norm.cu": (f"-DNORM_THREADS={NORM_THREADS}",),
    "attention.cu": (f"-DATT_CHUNK={ATT_CHUNK}", f"-DATT_THREADS={ATT_THREADS}"),
    "gemv.cu": (f"-DGEMV_WARPS={GEMV_WARPS}", f"-DGEMV_MAX_M={GEMV_MAX_M}"),
}
KERNELS: dict[str, tuple[str, ...]] = {  # the extern "C" kernels the backend loads from each file
    "elementwise.cu": ("add", "add_bcast", "gelu", "fill_rows", "gather_f32", "gather_f16", "gather_bf16",
                       "gather_int8"),
    "norm.cu": ("layernorm", "add_layernorm", "softmax"),
    "attention.cu": ("kv_write", "attn_split", "attn_combine"),
    "gemv.cu": ("gemv_n_f32", "gemv_t_f32", *(f"{kind}_{fmt}" for fmt in ("f16", "bf16", "int8")
                                              for kind in ("gemv_n", "gemv_t", "widen"))),
}  # fmt: skip
BASE_OPTIONS = ("--std=c++17",)


@cache
def kernel_source(name: str) -> str:
    """The source NVRTC compiles for ``name``: the shared helpers, then the file."""
    common = (KERNEL_DIR / COMMON).read_text()
    return f'#line 1 "{COMMON}"\n{common}\n#line 1 "{name}"\n' + (KERNEL_DIR / name).read_text()


def compile_options(name: str) -> tuple[str, ...]:
    """The options the backend compiles ``name`` with (CuPy adds the architecture)."""
    return BASE_OPTIONS + MODULES[name]


# -- plain array logic (runs under numpy in CI) ---------------------------------
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1


class Gemm(NamedTuple):
    """One cuBLAS (strided-batched) SGEMM in column-major terms: C = op(A) op(B).

    Offsets are in elements from the start of the buffer each operand lives in."""

    transa: int
    transb: int
    m: int
    n: int
    k: int
    a_off: int
    lda: int
    stride_a: int
    b_off: int
    ldb: int
    stride_b: int
    c_off: int
    ldc: int
    stride_c: int
    batch: int = 1


def product_gemm(m: int, n: int, k: int, transpose_b: bool) -> Gemm:
    """Row-major ``out [m, n] = a [m, k] @ b`` (b [k, n], or [n, k]ᵀ) as column-major
    ``outᵀ = op(b) aᵀ``: A is ``b``, B is ``a``, C is ``out``; nothing is copied."""
    lda = max(1, k if transpose_b else n)
    return Gemm(CUBLAS_OP_T if transpose_b else CUBLAS_OP_N, CUBLAS_OP_N, n, m, k,
                0, lda, 0, 0, max(1, k), 0, 0, max(1, n), 0)  # fmt: skip


def prefill_gemms(count: int, n_kv: int, d: int, n_head: int, capacity: int, row0: int) -> tuple[Gemm, Gemm]:
    """A prompt's attention as two strided-batched SGEMMs, batched over heads.

    scores [n_head, count, n_kv] = q_h k_hᵀ: A is the k cache (head stride
    capacity·d), B is qkv from row ``row0`` (row stride 3·n_embd, head h at
    column h·d), C is scores.  out rows row0.. [count, n_embd] = p_h v_h: A is
    the v cache, B is scores, C is out (row stride n_embd).  The causal mask
    and 1/sqrt(d) are the softmax kernel's, between the two."""
    n_embd = n_head * d
    scores = Gemm(CUBLAS_OP_T, CUBLAS_OP_N, n_kv, count, d,
                  0, d, capacity * d, row0 * 3 * n_embd, 3 * n_embd, d,
                  0, n_kv, count * n_kv, n_head)  # fmt: skip
    values = Gemm(CUBLAS_OP_N, CUBLAS_OP_N, d, count, n_kv,
                  0, d, capacity * d, 0, n_kv, count * n_kv,
                  row0 * n_embd, n_embd, d, n_head)  # fmt: skip
    return scores, values


SEQ_FIELDS, ROW_FIELDS = 4, 3  # as attention.cu reads them


@dataclass
class AttentionPlan:
    """What one ``attention_batch`` call launches, from host values only.

    seqs [n_seq, 4]: k address, v address, capacity, 0.  rows [n_rows, 3]:
    sequence, position, qkv row, for every new row (``kv_write``).  split_rows:
    the rows of short sequences (the split kernels); prompts: (sequence, first
    row, start, count) of each long one (the SGEMM path).  n_splits covers the
    largest capacity among the short sequences, so it does not change as they grow."""

    seqs: np.ndarray
    rows: np.ndarray
    split_rows: np.ndarray
    prompts: list[tuple[int, int, int, int]]
    n_splits: int


def attention_plan(addresses: Sequence[tuple[int, int]], capacities: Sequence[int], starts: Sequence[int],
                   counts: Sequence[int]) -> AttentionPlan:  # fmt: skip
    """Check a ragged batch against its caches and lay out the kernels' integers."""
    if not (len(addresses) == len(capacities) == len(starts) == len(counts)):
        raise ValueError("attention_batch: caches, starts and counts differ in length")
    seqs = np.zeros((len(counts), SEQ_FIELDS), dtype=np.int64)
    rows, split, prompts, longest, row0 = [], [], [], 0, 0
    for s, ((k, v), capacity, start, count) in enumerate(zip(addresses, capacities, starts, counts)):
        start, count = int(start), int(count)
        if start < 0 or count < 0 or start + count > capacity:
            raise ValueError(
                f"attention: positions {start}..{start + count} do not fit a cache of capacity {capacity}"
            )
        seqs[s, :3] = (k, v, capacity)
        mine = [(s, start + i, row0 + i) for i in range(count)]
        rows += mine
        if count >= PREFILL_GEMM_MIN:
            prompts.append((s, row0, start, count))
        elif count:
            split += mine
            longest = max(longest, capacity)
        row0 += count
    as_rows = lambda r: np.array(r, dtype=np.int64).reshape(-1, ROW_FIELDS)  # noqa: E731
    return AttentionPlan(seqs, as_rows(rows), as_rows(split), prompts, split_count(longest))


def split_count(capacity: int) -> int:
    """Splits of ``ATT_CHUNK`` keys covering a cache of ``capacity`` positions."""
    return max(1, -(-capacity // ATT_CHUNK))


def elementwise_grid(n: int) -> int:
    """Blocks for an elementwise kernel over ``n`` items (they loop past the cap)."""
    return max(1, min(-(-n // EW_THREADS), EW_MAX_BLOCKS))


def check_ids(ids: Any, n_rows: int) -> np.ndarray:
    """Row ids as int64, negative ones counted from the end (numpy's rule), checked."""
    flat = np.asarray(ids).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < -n_rows or flat.max() >= n_rows):
        raise IndexError(f"row id out of range for a table of {n_rows} rows")
    return np.where(flat < 0, flat + n_rows, flat)


class SlotArenaFull(RuntimeError):
    """The arena cannot take more integers without waiting for the device."""


class SlotArena:
    """Host integers the kernels read from device memory, in call order.

    ``put`` appends to the host side and (unless ``deferred``) copies the new
    part to the device at once, on the stream, so kernels queued after it see
    it.  While a graph is captured or replayed the copies are deferred and
    ``flush`` makes one before the launch.  Offsets restart at 0 after
    ``reset``, which the owner calls only when the stream has drained (the
    host side is then free to overwrite); a step therefore lays out its
    integers at the same offsets every time, which is what a replayed graph reads.
    """

    def __init__(
        self, host: np.ndarray, upload: Callable[[int, int], None], drain: Callable[[], None]
    ) -> None:
        self.host, self.upload, self.drain = host, upload, drain
        self.offset = self.flushed = 0
        self.deferred = False

    def put(self, values: Any) -> int:
        """Append ``values`` (ints); returns their offset in slots."""
        flat = np.asarray(values, dtype=np.int64).reshape(-1)
        n = flat.size
        if self.offset + n > self.host.size:
            if self.deferred or n > self.host.size:
                free = self.host.size - self.offset
                raise SlotArenaFull(f"{n} integers do not fit the slot arena ({free} free)")
            self.drain()
            self.reset()
        start = self.offset
        self.host[start : start + n] = flat
        self.offset += n
        if not self.deferred:
            self.flush()
        return start

    def flush(self) -> None:
        """Copy what was put since the last copy to the device."""
        if self.offset > self.flushed:
            self.upload(self.flushed, self.offset)
            self.flushed = self.offset

    def reset(self) -> None:
        self.offset = self.flushed = 0


# -- CUDA graphs of repeated steps ----------------------------------------------
EAGER, CAPTURE, REPLAY = "eager", "capture", "replay"
MAX_EAGER_KEYS = 64  # step keys remembered (as seen, or as not capturable)


class NotCapturable(RuntimeError):
    """Raised by an op that cannot be captured (a cuBLAS call): its step runs eagerly, graphs stay on."""


@dataclass
class Tape:
    """A captured step: its graph, each op's token and output, and the arena
    offset after each op (a replay must lay its integers out identically)."""

    graph: Any
    tokens: list
    outs: list
    arena_ends: list
    refs: list = field(repr=False)  # arrays the graph reads or writes, kept alive (their ids are in tokens)


class StepGraphs:
    """Capture a step that repeats (a decode step) as a CUDA graph and replay it.

    A *step* is what the model brackets with the backend's ``begin_step`` and
    ``end_step``: ``begin(key)`` and ``finish()`` here.  ``key`` is what a
    graph of the step depends on (``step_key``: each sequence's new rows and
    its cache's capacity), or None for a step that cannot be captured
    (a prompt: cuBLAS).  Ops called outside a step run eagerly, unrecorded.
    Each op call in a step becomes a token: its name, its scalars, its host
    integers by value, or only by shape where the op reads them from the
    slot arena (``slot_args``: ids, positions, cache lengths and addresses),
    its device inputs as "output of op i of this step" or by identity
    (weights).

    Policy: a step runs eagerly; once its key has been seen ``warmup`` times,
    its next step is captured (it runs when the capture is launched at its
    end) and kept as the key's tape; a step whose key has a tape replays it:
    each op only checks its token and puts its integers in the arena,
    returning the tape's output, and ``finish`` launches the graph.  A token
    that differs (the model changed), an early end, or an upload in the
    middle falls back: the ops so far are run eagerly into the same outputs
    and the step goes on eagerly (a tape whose tokens differed is dropped).
    If capturing fails where eager work succeeds, graphs are switched off
    for good, with the reason in ``disabled_reason``; an op that raises
    ``NotCapturable`` instead makes its step eager, and that key is not
    captured again.  At most ``max_graphs`` tapes are kept, least recently
    used dropped first.

    ``runtime`` provides ``begin_capture()``, ``end_capture() -> graph``,
    ``launch(graph)`` and ``capture_pool(on)``; impls are called as
    ``impl(*args, out=None, launch=True)``.  Written against those only, so
    the bookkeeping is tested under numpy.
    """

    def __init__(self, runtime: Any, arena: SlotArena, slot_args: Callable[[str, tuple], frozenset],
                 warmup: int = 2, max_graphs: int = 8) -> None:  # fmt: skip
        self.runtime, self.arena, self.slot_args = runtime, arena, slot_args
        self.warmup, self.max_graphs = warmup, max_graphs
        self.enabled, self.disabled_reason = True, ""
        self.tapes: OrderedDict[tuple, Tape] = OrderedDict()
        self.eager_keys: OrderedDict[tuple, None] = OrderedDict()  # steps that refused a capture
        self.seen: OrderedDict[tuple, int] = OrderedDict()  # steps run per key, for the warm-up
        self.counts: Counter = Counter()
        self.mode: str | None = None  # None: between steps
        self.key: tuple | None = None
        self._clear_step()

    def _clear_step(self) -> None:
        self.tokens: list = []
        self.calls: list = []
        self.arena_ends: list = []
        self.produced: dict[int, int] = {}
        self.refs: list = []
        self.tape: Tape | None = None
        self.poisoned = False
        self.refused = False

    # -- one op -------------------------------------------------------------
    def call(self, name: str, impl: Callable, args: tuple) -> Any:
        """Run (or capture, or replay) one op of the current step."""
        if self.mode is None:
            return impl(*args)  # outside a step: nothing to capture
        token = self._token(name, args)
        if self.mode == REPLAY:
            i, tape = len(self.calls), self.tape
            if i < len(tape.tokens) and token == tape.tokens[i]:
                out = impl(*args, out=tape.outs[i], launch=False)
                if self.arena.offset == tape.arena_ends[i]:
                    return self._record(token, impl, args, out)
            self.tapes.pop(self.key, None)  # this key's steps no longer make these ops
            self._leave_graph()
        if self.mode == CAPTURE:
            try:
                out = impl(*args)
            except NotCapturable:
                self._leave_graph()
                self.refused = True
                out = impl(*args)
            except Exception as exc:
                self._leave_graph()
                out = impl(*args)  # a genuine error of the op raises here
                self._disable(f"capturing {name} failed: {type(exc).__name__}: {exc}")
        else:
            out = impl(*args)
        return self._record(token, impl, args, out)

    def _record(self, token: tuple, impl: Callable, args: tuple, out: Any) -> Any:
        self.produced[id(out)] = len(self.calls)
        self.tokens.append(token)
        self.calls.append((impl, args, out))
        self.arena_ends.append(self.arena.offset)
        return out

    def _token(self, name: str, args: tuple) -> tuple:
        slots = self.slot_args(name, args)
        return (name, *(self._arg(a, i in slots) for i, a in enumerate(args)))

    def _arg(self, a: Any, slot: bool) -> Any:
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        if isinstance(a, np.generic):
            return a.item()
        if isinstance(a, (list, tuple)):
            return ("slots", _shapes(a)) if slot else tuple(self._arg(v, False) for v in a)
        if isinstance(a, np.ndarray) and a.dtype.kind in "iub":  # host integers (ids, rows)
            return ("slots", a.shape) if slot else ("host", a.shape, a.dtype.str, a.tobytes())
        i = self.produced.get(id(a))
        if i is not None:
            return ("op", i)
        self.refs.append(a)  # kept alive with the tape, so its id stays its own
        return ("ext", id(a))

    # -- step boundaries ------------------------------------------------------
    def begin(self, key: tuple | None) -> None:
        """A step begins: eager, captured or replayed, as its ``key`` has been seen."""
        if self.mode is not None:
            self.finish()  # the last step was not ended
        self._clear_step()
        self.mode, self.key = EAGER, key
        if not self.enabled or key is None or key in self.eager_keys:
            return
        tape = self.tapes.get(key)
        if tape is not None:
            self.tapes.move_to_end(key)
            self.tape, self.mode, self.arena.deferred = tape, REPLAY, True
        elif self.seen.get(key, 0) >= self.warmup:
            try:
                self.runtime.begin_capture()
            except Exception as exc:
                self._disable(f"cannot begin a capture: {type(exc).__name__}: {exc}")
                return
            self.runtime.capture_pool(True)
            self.mode, self.arena.deferred = CAPTURE, True

    def finish(self) -> None:
        """End the step: launch its graph if it was captured or replayed."""
        if self.mode is None:
            return
        try:
            if self.mode == REPLAY:
                if len(self.calls) == len(self.tape.tokens):
                    self.arena.flush()
                    self.runtime.launch(self.tape.graph)
                    self.counts["replayed"] += 1
                else:
                    self._leave_graph()
            elif self.mode == CAPTURE:
                self._finish_capture()
            else:
                self.counts["eager"] += 1
        finally:
            self._end_step()

    def _finish_capture(self) -> None:
        try:
            graph = self.runtime.end_capture()
        except Exception as exc:
            self.mode = EAGER  # the capture is over either way
            self.runtime.capture_pool(False)
            self._rerun()
            self._disable(f"ending a capture failed: {type(exc).__name__}: {exc}")
            return
        self.runtime.capture_pool(False)
        self.arena.deferred = False
        self.arena.flush()
        self.runtime.launch(graph)
        self.counts["captured"] += 1
        if not self.poisoned:
            self.tapes[self.key] = Tape(graph, list(self.tokens), [c[2] for c in self.calls],
                                        list(self.arena_ends), self.refs)  # fmt: skip
            while len(self.tapes) > self.max_graphs:
                self.tapes.popitem(last=False)

    def _end_step(self) -> None:
        key = self.key
        if key is not None:
            if self.refused:
                self.eager_keys[key] = None
                while len(self.eager_keys) > MAX_EAGER_KEYS:
                    self.eager_keys.popitem(last=False)
            self.seen[key] = self.seen.pop(key, 0) + 1
            while len(self.seen) > MAX_EAGER_KEYS:
                self.seen.popitem(last=False)
        self.mode, self.key, self.arena.deferred = None, None, False
        self.calls, self.tape = [], None  # drop references to this step's arrays

    def interrupt(self) -> None:
        """Something other than an op touches the device mid-step (an upload, an
        allocation, a read): finish this step eagerly and keep no graph of it."""
        if self.mode in (CAPTURE, REPLAY):
            self._leave_graph()
        if self.mode is not None:
            self.poisoned = True

    def _leave_graph(self) -> None:
        """From capture or replay to eager, mid-step: run the ops so far for real."""
        if self.mode == CAPTURE:
            try:
                self.runtime.end_capture()
            except Exception:
                pass  # an invalidated capture: nothing to keep either way
            self.runtime.capture_pool(False)
        self.mode = EAGER
        self.counts["fallbacks"] += 1
        self._rerun()

    def _rerun(self) -> None:
        self.arena.deferred = False
        for impl, args, out in self.calls:
            impl(*args, out=out)

    def _disable(self, reason: str) -> None:
        self.enabled, self.disabled_reason = False, reason
        self.tapes.clear()


def _shapes(x: Any) -> Any:
    """The shapes in ``x`` (a list of caches: their buffers'): what a graph depends on
    where the values themselves (cache addresses) come from the slot arena."""
    if isinstance(x, (list, tuple)):
        return tuple(_shapes(v) for v in x)
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(shape)


def step_key(step: Step) -> tuple | None:
    """What a CUDA graph of ``step`` depends on: each sequence's new rows and cache
    capacity (its key splits), the logit rows' count; not which caches they are, nor
    their lengths (the kernels read both from the slot arena).  None where the step
    calls cuBLAS (a prompt's products and attention), which cannot be captured."""
    if step.n_rows > GEMV_MAX_M or max(step.counts) >= PREFILL_GEMM_MIN:
        return None
    rows = None if step.logit_rows is None else len(step.logit_rows)
    return (step.counts, step.capacities, rows)


# -- the backend ------------------------------------------------------------------
class Deferred(NamedTuple):
    """A kernel launched by the next op, which may fold it into its own: ``kind``
    ("gemv_n", "add" or "add_ln"), its output, and what the launch needs."""

    kind: str
    out: Any
    args: tuple


@dataclass(frozen=True)
class Packed:
    """A weight kept on the device in a reduced format (f16, bf16 bits, int8 + scales)."""

    fmt: str
    data: Any
    scale: Any  # float32 per channel (int8), else None
    axis: int  # the axis scales run along: 1 = per column (linear), 0 = per row (tables)
    stored: formats.Stored  # the host copy, for to_host

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape

    def fits_gemv(self, transpose_b: bool) -> bool:
        """Our GEMV kernels scale per output: columns of w, or rows of a transposed w."""
        return self.scale is None or self.axis == (0 if transpose_b else 1)


def _runtime_error_reason(exc: Exception, runtime_version: str = "") -> str:
    """What a CUDA runtime error at probe time means for the user, and what to do."""
    text = str(exc)
    code = text.split(":", 1)[0].strip()
    if "InsufficientDriver" in text:
        cuda = f"CUDA {runtime_version}" if runtime_version else "CUDA"
        return (
            f"no usable NVIDIA driver ({code}): no GPU here, or its driver is older than CuPy's"
            f" {cuda}; install or update the driver, or a CuPy built for its CUDA (e.g. cupy-cuda11x)"
        )
    if "NoDevice" in text:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return f"no CUDA device found{hint} ({code})"
    return f"the CUDA runtime failed: {text}"


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _runtime_version(rt: Any) -> str:
    try:
        return _version(rt.runtimeGetVersion())
    except Exception:
        return ""


def describe_device(rt: Any, index: int) -> tuple[str, int]:
    """(``name (compute capability, memory, runtime, driver)``, memory bytes) of device ``index``."""
    props = rt.getDeviceProperties(index)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    memory = int(props["totalGlobalMem"])
    return (
        f"{name} (compute capability {props['major']}.{props['minor']}, {memory / 2**30:.1f} GiB,"
        f" CUDA runtime {_version(rt.runtimeGetVersion())}, driver {_version(rt.driverGetVersion())})",
        memory,
    )


def cuda_headers_reason(cupy: Any) -> str:
    """Why CuPy will fail to compile a kernel for want of the CUDA runtime headers, or "".

    CuPy 14 adds ``-I`` the ``cudart`` headers to every NVRTC compile and looks
    them up with ``cuda.pathfinder`` (CUDA_PATH/CUDA_HOME, then the pip wheels);
    a driver-only machine has none, and fails at the first kernel.  Older CuPy
    finds its headers its own way, so nothing is checked for it."""
    try:
        major = int(str(getattr(cupy, "__version__", "0")).split(".")[0])
    except ValueError:
        major = 0
    if major < 14:
        return ""
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
    except Exception as exc:  # cuda-pathfinder is a dependency of CuPy 14: a broken install
        return f"CuPy cannot look for the CUDA headers ({type(exc).__name__}: {exc}); {HEADERS_HINT}"
    if found:
        return ""
    return f"the CUDA runtime headers are not installed; {HEADERS_HINT}"


def _destroy_cublas(cublas: Any, handle: int) -> None:
    try:
        cublas.destroy(handle)
    except Exception:  # the context may be gone already: nothing left to free
        pass


class _Scope:
    """Make the backend's device and stream current for an op (and restore them)."""

    def __init__(self, rt: Any, index: int, stream: Any) -> None:
        self.rt, self.index, self.stream = rt, index, stream
        self._previous: list[int] = []

    def __enter__(self) -> None:
        previous = self.rt.getDevice()
        if previous != self.index:
            self.rt.setDevice(self.index)
        self._previous.append(previous)
        self.stream.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.stream.__exit__(*exc)
        previous = self._previous.pop()
        if previous != self.index:
            self.rt.setDevice(previous)


def slot_args(name: str, args: tuple) -> frozenset:
    """Which arguments of an op its kernels read from the slot arena (so their
    values may change between replays of a graph): ids, rows, and the caches'
    addresses and lengths of the split attention kernels (prompts' SGEMM sizes
    and operands depend on them)."""
    if name in ("embedding", "take_rows"):
        return frozenset((1,))
    if name == "attention_batch" and all(int(c) < PREFILL_GEMM_MIN for c in args[4]):
        return frozenset((2, 3))
    if name == "attention" and args[0].shape[0] < PREFILL_GEMM_MIN:
        return frozenset((4,))
    return frozenset()


class CudaBackend(Backend):
    name = "cuda"
    priority = PRIORITY
    max_priority = PRIORITY
    description = "CuPy: cuBLAS SGEMM for prompts, our own CUDA kernels (NVRTC) for decode and the rest"
    dtypes = ("float32",)
    weight_formats = ("f32", "f16", "bf16", "int8")
    thread_safe = False  # one stream, one slot arena, one graph recorder per instance

    def __init__(self, dtype: str = "float32", device: str | None = None) -> None:
        super().__init__(dtype, device)
        self.index = 0
        self.graphs: StepGraphs | None = None
        self._deferred: Deferred | None = None

    # -- devices and probing -------------------------------------------------------
    @classmethod
    def list_devices(cls) -> list[Device]:
        try:
            import cupy

            rt = cupy.cuda.runtime
            found = []
            for i in range(rt.getDeviceCount()):
                text, memory = describe_device(rt, i)
                found.append(Device(str(i), text, memory))
            return found
        except Exception:  # no CuPy, no driver: no devices
            return []

    def _probe_impl(self) -> Probe:
        try:
            import cupy
        except ImportError:
            return Probe.missing(INSTALL_HINT)
        except Exception as exc:  # a broken install (e.g. two CuPy packages)
            return Probe.missing(f"CuPy failed to import ({type(exc).__name__}: {exc}); reinstall it")
        rt = cupy.cuda.runtime
        try:
            n = rt.getDeviceCount()
        except rt.CUDARuntimeError as exc:
            return Probe.missing(_runtime_error_reason(exc, _runtime_version(rt)))
        if n == 0:
            return Probe.missing("no CUDA device found")
        wanted = "0" if self.device_id is None else self.device_id
        if not wanted.isdigit() or int(wanted) >= n:
            devices = "; ".join(f"cuda:{d.id} {d.description}" for d in self.list_devices())
            return Probe.missing(f"there is no CUDA device {wanted!r}; devices: {devices}")
        self.index = int(wanted)
        try:
            text, _ = describe_device(rt, self.index)
        except rt.CUDARuntimeError as exc:
            return Probe.missing(_runtime_error_reason(exc))
        try:  # attribute-style imports: CuPy 14 finds pip-installed CUDA libraries this way
            from cupy_backends.cuda.libs import cublas  # noqa: F401
        except Exception as exc:
            return Probe.missing(f"cuBLAS cannot be loaded ({exc}): {LIBS_HINT}")
        try:
            from cupy_backends.cuda.libs import nvrtc

            nvrtc.getVersion()  # NVRTC is loaded on first use
        except Exception as exc:
            return Probe.missing(f"NVRTC (the CUDA runtime compiler) cannot be loaded ({exc}): {LIBS_HINT}")
        headers = cuda_headers_reason(cupy)
        if headers:
            return Probe.missing(headers)
        try:  # a round trip through the device: a context and memory work
            with cupy.cuda.Device(self.index):
                back = cupy.asarray(np.arange(4, dtype=np.float32)).get()
        except Exception as exc:
            return Probe.missing(f"cannot use {text}: {type(exc).__name__}: {exc}")
        if not np.array_equal(back, np.arange(4, dtype=np.float32)):
            return Probe.missing(f"{text} returned wrong data in a copy test")
        return Probe.ok(text)

    def _prepare_impl(self) -> None:
        """Stream, cuBLAS, our kernels (compiled now), the slot arena; then one
        kernel on a known input, so a broken toolchain fails here and not mid-model."""
        import cupy

        if self._probe is None or not self._probe.available:
            raise BackendError(f"cuda is not available: {self.probe().reason}")
        self._cp, self._rt = cupy, cupy.cuda.runtime
        from cupy_backends.cuda.libs import cublas

        self._cublas = cublas
        try:
            with cupy.cuda.Device(self.index):
                self._open(cupy)
        except BackendError:
            raise
        except Exception as exc:
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise BackendError(f"the cuda backend could not start on device {self.index}: {first}") from exc

    def _open(self, cupy: Any) -> None:
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._scope = _Scope(self._rt, self.index, self._stream)
        # our own handle: CuPy's (get_cublas_handle) belongs to this thread, which
        # may be a worker that ends after prepare, destroying it
        self._handle = self._cublas.create()
        self._handle_finalizer = weakref.finalize(self, _destroy_cublas, self._cublas, self._handle)
        self._handle_finalizer.atexit = False  # at exit the context goes, and the handle with it
        self._cublas.setStream(self._handle, self._stream.ptr)
        self._k: dict[str, Any] = {}
        for name, kernels in KERNELS.items():
            module = cupy.RawModule(code=kernel_source(name), options=compile_options(name))
            for kernel in kernels:
                self._k[kernel] = module.get_function(kernel)  # compiles the module on first use
        pinned = cupy.cuda.alloc_pinned_memory(SLOT_CAPACITY * 8)
        self._pinned = pinned
        self._slots = cupy.empty(SLOT_CAPACITY, dtype=np.int64)
        host = np.frombuffer(pinned, dtype=np.int64, count=SLOT_CAPACITY)
        self._arena = SlotArena(host, self._upload_slots, self._stream.synchronize)
        self._capture = None  # the private memory pool while a graph is captured
        self._graph_pool = cupy.cuda.MemoryPool()
        with self._scope:
            a = cupy.asarray(np.arange(5, dtype=np.float32))
            got = self.to_host(self._add(a, a))
        if not np.array_equal(got, 2 * np.arange(5, dtype=np.float32)):
            raise BackendError(f"our CUDA kernels computed wrong results on device {self.index} ({got})")
        if os.environ.get(ENV_GRAPHS, "").strip().lower() in ("1", "true", "yes"):
            self.graphs = StepGraphs(self, self._arena, slot_args)

    # the StepGraphs runtime
    def begin_capture(self) -> None:
        self._stream.begin_capture()

    def end_capture(self) -> Any:
        self._flush()  # the step's last kernel belongs to its graph
        return self._stream.end_capture()

    def launch(self, graph: Any) -> None:
        self._flush()
        graph.launch(stream=self._stream)

    def capture_pool(self, on: bool) -> None:
        self._capture = self._graph_pool if on else None

    # -- memory ----------------------------------------------------------------
    def _upload_slots(self, start: int, stop: int) -> None:
        nbytes = (stop - start) * 8
        self._rt.memcpyAsync(self._slots.data.ptr + start * 8, self._pinned.ptr + start * 8, nbytes,
                             self._rt.memcpyHostToDevice, self._stream.ptr)  # fmt: skip

    def _slot_ptr(self, offset: int) -> np.uint64:
        return np.uint64(self._slots.data.ptr + offset * 8)

    def _empty(self, shape: tuple[int, ...]) -> Any:
        if self._capture is not None:  # a graph's arrays live in its own pool, apart from eager ones
            with self._cp.cuda.using_allocator(self._capture.malloc):
                return self._cp.empty(shape, dtype=np.float32)
        return self._cp.empty(shape, dtype=np.float32)

    def _mid_step(self) -> None:
        self._flush()
        if self.graphs is not None:
            self.graphs.interrupt()

    def to_device(self, x: Any) -> Any:
        """Host array -> device array: floats as float32, integer arrays as they are."""
        if isinstance(x, (self._cp.ndarray, Packed)):
            return x
        x = np.asarray(x)
        x = np.ascontiguousarray(x, dtype=self.dtype if x.dtype.kind not in "iub" else None)
        with self._scope:
            self._mid_step()
            return self._cp.asarray(x)

    def to_host(self, x: Any) -> np.ndarray:
        """Device array -> numpy (in the middle of a step, the step goes on eagerly)."""
        if isinstance(x, np.ndarray):
            return x
        if isinstance(x, Packed):
            return formats.decode(x.stored)
        with self._scope:
            self._mid_step()
            host = x.get(stream=self._stream)
            self._arena.reset()  # the stream has drained
        return host

    def alloc(self, shape: tuple[int, ...]) -> Any:
        """A zeroed device array (KV-cache buffers), outside any graph's pool."""
        with self._scope:
            self._mid_step()
            return self._cp.zeros(shape, dtype=np.float32)

    def store(self, dst: Any, src: np.ndarray) -> None:
        with self._scope:
            self._mid_step()
            dst.set(np.ascontiguousarray(src, dtype=np.float32), stream=self._stream)

    def upload_weight(self, stored: formats.Stored) -> Any:
        """f32 as a device array; f16/bf16/int8 kept as they are (``Packed``)."""
        if stored.fmt == "f32":
            return self.to_device(stored.data)
        with self._scope:
            self._mid_step()
            data = self._cp.asarray(stored.data)
            scale = None if stored.scale is None else self._cp.asarray(stored.scale)
        return Packed(stored.fmt, data, scale, formats.channel_axis(stored.role), stored)

    def synchronize(self) -> None:
        with self._scope:
            self._mid_step()
            self._stream.synchronize()
            self._arena.reset()

    # -- steps: where the model says a forward pass begins and ends (CUDA graphs) ---
    def begin_step(self, step: Step) -> None:
        """The ops until ``end_step`` are ``step``'s forward pass: with graphs on, it is
        run eagerly, captured or replayed as ``step_key(step)`` has been seen."""
        if self.graphs is None:
            return
        with self._scope:
            self._flush()
            if self._arena.offset:  # a step lays its integers out from 0, as its graph reads them
                self._stream.synchronize()
                self._arena.reset()
            self.graphs.begin(step_key(step))

    def end_step(self) -> None:
        """The step's ops are all called: launch its graph (captured or replayed)."""
        if self.graphs is None:
            return
        with self._scope:
            self._flush()
            self.graphs.finish()

    # -- ops: each public op runs its impl directly, or through the graph recorder ---
    def _call(self, name: str, impl: Callable, args: tuple) -> Any:
        with self._scope:
            if self.graphs is None:
                return impl(*args)
            return self.graphs.call(name, impl, args)

    def matmul(self, a, b, transpose_b=False):  # [m, k] @ [k, n] (or [n, k]ᵀ) -> [m, n]
        return self._call("matmul", self._matmul, (a, b, transpose_b))

    def linear(self, x, w, b=None):  # [n_rows, n_in], [n_in, n_out], [n_out] -> [n_rows, n_out]
        return self._call("linear", self._linear, (x, w, b))

    def add(self, a, b):  # [...], [...] (or a trailing-shape b) -> [...]
        return self._call("add", self._add, (a, b))

    def layernorm(self, x, g, b, eps=1e-5):  # [n_rows, n], [n], [n] -> [n_rows, n]
        return self._call("layernorm", self._layernorm, (x, g, b, eps))

    def gelu(self, x):  # [...] -> [...]
        return self._call("gelu", self._gelu, (x,))

    def attention(self, qkv, n_head, k_cache, v_cache, start):  # [n_new, 3e] -> [n_new, e]
        return self._call("attention", self._attention, (qkv, n_head, k_cache, v_cache, start))

    def attention_batch(self, qkv, n_head, step):  # [step.n_rows, 3e] -> [step.n_rows, e]
        args = (qkv, n_head, step.caches, step.starts, step.counts)
        return self._call("attention_batch", self._attention_batch, args)

    def embedding(self, table, ids):  # [n_vocab, n], int [n_rows] -> [n_rows, n]
        return self._call("embedding", self._embedding, (table, ids))

    def take_rows(self, x, rows):  # [n_rows, n], int [k] -> [k, n]
        return self._call("take_rows", self._embedding, (x, rows))

    def slice_rows(self, x, start, stop):  # [n_rows, n] -> [stop - start, n]  (a view)
        return self._call("slice_rows", self._slice_rows, (x, start, stop))

    def concat_rows(self, parts):  # list of [n_i, n] -> [sum n_i, n]
        return self._call("concat_rows", self._concat_rows, (parts,))

    def cross_entropy(self, logits, targets):  # [n, n_vocab], int [n] -> [1]
        """Summed -log softmax at the targets, reduced on the device in float64 (CuPy's
        reductions): one number comes back instead of ``[n, n_vocab]`` logits.  Not part
        of a decode step, so never captured in a graph."""
        cp = self._cp
        with self._scope, self._stream:
            self._flush()
            x = logits.astype(cp.float64)
            top = x.max(axis=-1, keepdims=True)
            lse = top[:, 0] + cp.log(cp.exp(x - top).sum(axis=-1))
            t = cp.asarray(check_ids(targets, logits.shape[1]))
            picked = x[cp.arange(t.size), t]
            return (lse - picked).sum().reshape(1).astype(cp.float32)

    # -- impls: host work first (checks, arena slots), then `launch` the kernels ---
    def _contiguous(self, x: Any) -> Any:
        """``x``, or a C-ordered copy from our allocator (a graph's pool while capturing)."""
        if x.flags.c_contiguous:
            return x
        out = self._empty(x.shape)
        out[...] = x
        return out

    def _flush(self) -> None:
        """Launch the deferred kernel, if any: before anything that may read its output."""
        d, self._deferred = self._deferred, None
        if d is None:
            return
        if d.kind == "gemv_n":
            self._gemv_n(*d.args, d.out, np.uint64(0), None)
        elif d.kind == "add_ln":
            self._add_layernorm(*d.args, d.out)
        else:
            a, b = d.args
            self._ew("add", d.out.size, (a, b, d.out, np.int64(d.out.size)))

    def _add_layernorm(self, a: Any, b: Any, total: Any, g: Any, beta: Any, eps: float, out: Any) -> None:
        n = out.shape[-1]
        self._k["add_layernorm"]((out.size // n,), (NORM_THREADS,),
                                 (a, b, total, g, beta, out, np.int32(n), np.float32(eps)))  # fmt: skip

    def _gemv_n(self, fmt: str, x: Any, w: Any, scale: Any, bias: Any, m: int, k: int, n: int,
                ln: tuple | None, y: Any, act: Any, kv: tuple | None) -> None:  # fmt: skip
        """y = x w (+ bias); act = gelu(y) unless null; kv: (seqs, rows, n_embd, d) of an
        attention batch whose new keys and values y holds, written into its caches too;
        ln: (a, b, sum, g, beta, eps) when x is layernorm(a + b), made by the kernel first."""
        null = np.uint64(0)
        kv = kv or (null, null, np.int32(0), np.int32(1))
        if ln is None:
            prologue, shared = (null,) * 6 + (np.float32(0),), 0
        else:
            a, b, total, g, beta, eps = ln
            prologue, shared = (a, b, g, beta, total, x, np.float32(eps)), 4 * m * k
        args = (x, w, scale, bias, y, act, *kv, *prologue, np.int32(m), np.int32(k), np.int32(n))
        self._k[f"gemv_n_{fmt}"]((-(-n // 32),), (32, GEMV_WARPS), args, shared_mem=shared)

    def _ew(self, kernel: str, n: int, args: tuple) -> None:
        self._k[kernel]((elementwise_grid(n),), (EW_THREADS,), args)

    def _sgemm(self, g: Gemm, a: Any, b: Any, c: Any, alpha: float = 1.0, beta: float = 0.0) -> None:
        """One cuBLAS call for ``g`` over device buffers a, b, c (float32); never in a capture,
        where CuPy's cuBLAS calls raise (and an unsupported one would invalidate the capture)."""
        if self._capture is not None:
            raise NotCapturable("cuBLAS is not called while a CUDA graph is captured")
        alpha_beta = np.array([alpha, beta], dtype=np.float32)  # read by cuBLAS during the call
        pa, pb = alpha_beta.ctypes.data, alpha_beta.ctypes.data + 4
        A, B, C = a.data.ptr + 4 * g.a_off, b.data.ptr + 4 * g.b_off, c.data.ptr + 4 * g.c_off
        if g.batch == 1:
            self._cublas.sgemm(
                self._handle, g.transa, g.transb, g.m, g.n, g.k, pa, A, g.lda, B, g.ldb, pb, C, g.ldc
            )
        else:
            self._cublas.sgemmStridedBatched(
                self._handle, g.transa, g.transb, g.m, g.n, g.k, pa, A, g.lda, g.stride_a,
                B, g.ldb, g.stride_b, pb, C, g.ldc, g.stride_c, g.batch,
            )  # fmt: skip

    def _widen(self, w: Packed) -> Any:
        """A float32 copy of a packed weight (scratch, for products of many rows)."""
        rows, cols = w.shape
        out = self._empty((rows, cols))
        scale = w.scale if w.scale is not None else np.uint64(0)
        self._ew(f"widen_{w.fmt}", rows * cols, (w.data, scale, out, np.int64(rows), np.int64(cols),
                                                 np.int32(w.axis)))  # fmt: skip
        return out

    def _product(self, x: Any, w: Any, bias: Any, transpose_b: bool, out: Any, launch: bool) -> Any:
        m, k = x.shape
        n = w.shape[0] if transpose_b else w.shape[1]
        if out is None:
            out = self._empty((m, n))
        if not launch or out.size == 0:
            return out
        packed = isinstance(w, Packed)
        gemv = m <= GEMV_MAX_M and (not packed or w.fits_gemv(transpose_b))
        ln, d = None, self._deferred
        if gemv and not transpose_b and d is not None and d.kind == "add_ln" and d.out is x:
            ln, self._deferred = d.args, None  # x = layernorm(a + b), made by the GEMV itself
        self._flush()
        x = self._contiguous(x)
        if gemv:  # decode rows: no cuBLAS
            fmt, data = (w.fmt, w.data) if packed else ("f32", self._contiguous(w))
            scale = w.scale if packed and w.scale is not None else np.uint64(0)
            if transpose_b:
                warps = GEMVT_THREADS // 32
                self._k[f"gemv_t_{fmt}"]((-(-n // warps),), (GEMVT_THREADS,),
                                         (x, data, scale, out, np.int32(m), np.int32(k), np.int32(n)))
            else:  # launched by the next op: the GELU of `out` takes it into its own launch
                b = bias if bias is not None else np.uint64(0)
                self._deferred = Deferred("gemv_n", out, (fmt, x, data, scale, b, m, k, n, ln))
            return out  # fmt: skip
        if isinstance(w, Packed):
            w = self._widen(w)
        w = self._contiguous(w)
        if bias is not None:
            self._ew("fill_rows", out.size, (bias, out, np.int64(out.size), np.int32(n)))
        self._sgemm(product_gemm(m, n, k, transpose_b), w, x, out, beta=0.0 if bias is None else 1.0)
        return out

    def _matmul(self, a, b, transpose_b=False, out=None, launch=True):
        return self._product(a, b, None, bool(transpose_b), out, launch)

    def _linear(self, x, w, b=None, out=None, launch=True):
        return self._product(x, w, b, False, out, launch)

    def _add(self, a, b, out=None, launch=True):
        if a.size < b.size:
            a, b = b, a
        if a.shape != b.shape and (not b.size or a.shape[a.ndim - b.ndim :] != b.shape):
            raise ValueError(f"add: cannot broadcast shapes {a.shape} and {b.shape}")
        if out is None:
            out = self._empty(a.shape)
        if launch and out.size:
            self._flush()
            a, b = self._contiguous(a), self._contiguous(b)
            if a.shape == b.shape:  # launched by the next op: the layernorm of `out` takes it in
                self._deferred = Deferred("add", out, (a, b))
            else:
                self._ew("add_bcast", a.size, (a, b, out, np.int64(a.size), np.int64(b.size)))
        return out

    def _gelu(self, x, out=None, launch=True):
        if out is None:
            out = self._empty(x.shape)
        if launch and out.size:
            d = self._deferred
            if d is not None and d.kind == "gemv_n" and d.out is x:  # GELU in the GEMV's epilogue
                self._deferred = None
                self._gemv_n(*d.args, d.out, out, None)
                return out
            self._flush()
            self._ew("gelu", x.size, (self._contiguous(x), out, np.int64(x.size)))
        return out

    def _layernorm(self, x, g, b, eps=1e-5, out=None, launch=True):
        if out is None:
            out = self._empty(x.shape)
        if launch and out.size:
            n = x.shape[-1]
            d = self._deferred
            if d is not None and d.kind == "add" and d.out is x:  # the residual add in the same pass
                self._deferred = None
                if x.size // n <= GEMV_MAX_M and x.size <= GEMV_LN_FLOATS:  # a GEMV next may take both
                    self._deferred = Deferred("add_ln", out, (*d.args, x, g, b, eps))
                else:
                    self._add_layernorm(*d.args, x, g, b, eps, out)
                return out
            self._flush()
            self._k["layernorm"]((x.size // n,), (NORM_THREADS,),
                                 (self._contiguous(x), g, b, out, np.int32(n), np.float32(eps)))  # fmt: skip
        return out

    def _softmax_rows(self, x, out, rows: int, n_k: int, n_q: int, causal: bool, scale: float) -> None:
        args = (x, out, np.int32(n_k), np.int32(n_q), np.int32(causal), np.float32(scale))
        self._k["softmax"]((rows,), (NORM_THREADS,), args)

    def _embedding(self, table, ids, out=None, launch=True):
        """embedding and take_rows: a row gather; ids are checked on the host."""
        n_rows, n = table.shape
        shape = np.shape(ids)
        slot = self._arena.put(check_ids(ids, n_rows))
        if out is None:
            out = self._empty((*shape, n))
        count = int(np.prod(shape, dtype=np.int64))
        if launch and count and n:
            self._flush()
            if isinstance(table, Packed) and not table.fits_gemv(True):
                table = Packed("f32", self._widen(table), None, 0, table.stored)
            fmt = table.fmt if isinstance(table, Packed) else "f32"
            data = table.data if isinstance(table, Packed) else self._contiguous(table)
            scale = table.scale if isinstance(table, Packed) and table.scale is not None else np.uint64(0)
            self._k[f"gather_{fmt}"]((count, -(-n // 128)), (128,),
                                     (data, scale, self._slot_ptr(slot), out, np.int32(n)))  # fmt: skip
        return out

    def _slice_rows(self, x, start, stop, out=None, launch=True):
        if out is not None:
            return out
        start, stop, _ = slice(start, stop).indices(x.shape[0])
        return x[start : max(start, stop)]

    def _concat_rows(self, parts, out=None, launch=True):
        if out is None:
            out = self._empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
        if launch:
            self._flush()
            offset = out.data.ptr
            for part in parts:
                part = self._contiguous(part)
                if part.nbytes:
                    self._rt.memcpyAsync(offset, part.data.ptr, part.nbytes, self._rt.memcpyDeviceToDevice,
                                         self._stream.ptr)  # fmt: skip
                offset += part.nbytes
        return out

    def _attention(self, qkv, n_head, k_cache, v_cache, start, out=None, launch=True):
        counts = [qkv.shape[0]]
        return self._attention_batch(qkv, n_head, [(k_cache, v_cache)], [start], counts, out, launch)

    def _attention_batch(self, qkv, n_head, caches, starts, counts, out=None, launch=True):
        """kv_write for every row; split kernels for short sequences; SGEMMs for prompts."""
        n_rows, n_embd = qkv.shape[0], qkv.shape[1] // 3
        d = n_embd // n_head
        if sum(int(c) for c in counts) != n_rows:
            raise ValueError(f"attention_batch: counts add up to {sum(counts)}, qkv has {n_rows} rows")
        for k, v in caches:
            if k.shape != v.shape or k.ndim != 3 or k.shape[0] != n_head or k.shape[2] != d:
                raise ValueError(f"attention: a cache of shape {k.shape} is not [{n_head}, capacity, {d}]")
        plan = attention_plan([(k.data.ptr, v.data.ptr) for k, v in caches], [k.shape[1] for k, _ in caches],
                              starts, counts)  # fmt: skip
        seqs = self._slot_ptr(self._arena.put(plan.seqs))
        rows = self._slot_ptr(self._arena.put(plan.rows))
        split = self._slot_ptr(self._arena.put(plan.split_rows)) if len(plan.split_rows) < n_rows else rows
        if out is None:
            out = self._empty((n_rows, n_embd))
        if not launch or not n_rows:
            return out
        e, d32 = np.int32(n_embd), np.int32(d)
        pending = self._deferred
        if pending is not None and pending.kind == "gemv_n" and pending.out is qkv:  # qkv's own GEMV
            self._deferred = None  # writes the new keys and values into the caches as it makes them
            self._gemv_n(*pending.args, pending.out, np.uint64(0), (seqs, rows, e, d32))
        else:
            self._flush()
            qkv = self._contiguous(qkv)
            self._k["kv_write"]((n_rows, -(-n_embd // 256)), (256,), (qkv, seqs, rows, e, d32))
        scale = np.float32(1.0 / math.sqrt(d))
        n_split_rows = len(plan.split_rows)
        if n_split_rows:
            part = self._empty((n_split_rows, n_head, plan.n_splits, d + 2))
            self._k["attn_split"]((n_split_rows, n_head, plan.n_splits), (ATT_THREADS,),
                                  (qkv, seqs, split, part, e, d32, scale),
                                  shared_mem=4 * (d + ATT_CHUNK))  # fmt: skip
            self._k["attn_combine"]((n_split_rows, n_head), (ATT_THREADS,),
                                    (part, split, out, e, d32, np.int32(plan.n_splits)))
        for s, row0, start, count in plan.prompts:  # fmt: skip
            k, v = caches[s]
            n_kv = start + count
            scores = self._empty((n_head, count, n_kv))
            g_scores, g_values = prefill_gemms(count, n_kv, d, n_head, k.shape[1], row0)
            self._sgemm(g_scores, k, qkv, scores)
            self._softmax_rows(scores, scores, n_head * count, n_kv, count, True, float(scale))
            self._sgemm(g_values, v, scores, out)
        return out


@hookimpl
def opswitch_backends() -> list[type[Backend]]:
    return [CudaBackend]
