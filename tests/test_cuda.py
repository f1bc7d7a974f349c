"""The cuda backend without a GPU: its probe's reasons, its registration, the
plain array logic it launches with, run under numpy, and the backend itself
on a stand-in CuPy whose kernels are emulated in numpy (``cuda_standin.py``).

The stand-in keeps the CuPy rules that broke the backend before: per-thread
cuBLAS handles that die with their thread, no cuBLAS call during a graph
capture, no implicit conversion to numpy, headers needed by CuPy 14.  The
real CUDA code runs on the CPU in ``test_cuda_kernels_cpu.py``; NVRTC compiles
it in ``test_cuda_compile.py``; the conformance suite runs it where a GPU is
(``--opswitch-backend=cuda``).  The probe is also tested against simple
stand-ins, one per situation a user meets, and against whatever CuPy is
installed (none in CI, which keeps the 136 MB wheel out of the test extra).
"""

from __future__ import annotations

import math
import sys
import types
from collections import Counter

import numpy as np
import pytest

from opswitch.backends import cuda
from opswitch.core import OP_NAMES, BackendError, Registry, formats, ops
from opswitch.core.step import Step, attention_step

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


# -- the probe --------------------------------------------------------------------
class CUDARuntimeError(RuntimeError):
    pass


INSUFFICIENT = "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"
PROPS = {"name": b"NVIDIA H100 80GB HBM3", "totalGlobalMem": 85 * 2**30, "major": 9, "minor": 0}


def fake_cupy(monkeypatch, count=1, error=None, libs_ok=True, round_trip=True):
    """Install a stand-in CuPy: ``count`` devices, or ``error`` from the driver."""
    rt = types.SimpleNamespace(
        CUDARuntimeError=CUDARuntimeError,
        runtimeGetVersion=lambda: 12090,
        driverGetVersion=lambda: 12080,
        getDeviceProperties=lambda i: PROPS,
    )

    def get_count():
        if error:
            raise CUDARuntimeError(error)
        return count

    rt.getDeviceCount = get_count

    class FakeDevice:
        def __init__(self, index):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def asarray(x):
        if not round_trip:
            raise CUDARuntimeError("cudaErrorLaunchFailure: unspecified launch failure")
        return types.SimpleNamespace(get=lambda: np.array(x))

    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(runtime=rt, Device=FakeDevice)
    module.asarray = asarray
    monkeypatch.setitem(sys.modules, "cupy", module)
    for lib in ("cublas", "nvrtc"):
        fake = types.ModuleType(f"cupy_backends.cuda.libs.{lib}") if libs_ok else None
        if fake:
            fake.getVersion = lambda: (12, 9)
        monkeypatch.setitem(sys.modules, f"cupy_backends.cuda.libs.{lib}", fake)
    if libs_ok:  # parents, so `import cupy_backends.cuda.libs.x` finds the stand-ins
        for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))


def probe(device=None):
    return cuda.CudaBackend(device=device).probe()


def test_without_cupy_the_reason_is_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    got = probe()
    assert not got.available and got.reason == cuda.INSTALL_HINT
    assert got.reason.startswith("CuPy is not installed: pip install 'opswitch[cuda]'")
    assert "'opswitch[cuda13]'" in got.reason


def test_without_a_driver_the_reason_says_so_and_what_to_do(monkeypatch):
    fake_cupy(monkeypatch, error=INSUFFICIENT)
    got = probe()
    assert not got.available
    assert "no usable NVIDIA driver (cudaErrorInsufficientDriver)" in got.reason
    assert "CUDA 12.9" in got.reason and "install or update the driver" in got.reason


def test_no_device_and_a_wrong_device_are_reasons(monkeypatch):
    fake_cupy(monkeypatch, count=0)
    assert probe().reason == "no CUDA device found"
    fake_cupy(monkeypatch, error="cudaErrorNoDevice: no CUDA-capable device is detected")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert probe().reason == "no CUDA device found (CUDA_VISIBLE_DEVICES='') (cudaErrorNoDevice)"
    fake_cupy(monkeypatch, count=1)
    reason = probe("3").reason
    assert reason.startswith("there is no CUDA device '3'; devices: cuda:0 NVIDIA H100")


def test_missing_libraries_and_a_failing_device_are_reasons(monkeypatch):
    fake_cupy(monkeypatch, libs_ok=False)
    reason = probe().reason
    assert reason.startswith("cuBLAS cannot be loaded") and "pip install 'opswitch[cuda]'" in reason
    fake_cupy(monkeypatch, round_trip=False)
    assert "cudaErrorLaunchFailure" in probe().reason


def test_a_working_gpu_is_described(monkeypatch):
    fake_cupy(monkeypatch, count=2)
    got = probe("1")
    assert got.available
    assert got.device == (
        "NVIDIA H100 80GB HBM3 (compute capability 9.0, 85.0 GiB, CUDA runtime 12.9, driver 12.8)"
    )
    devices = cuda.CudaBackend.list_devices()
    assert [d.id for d in devices] == ["0", "1"] and devices[0].memory_bytes == 85 * 2**30


def test_the_installed_cupy_if_any_gets_an_honest_answer():
    """No stand-ins: without CuPy the install command, on a machine without a GPU
    the driver reason, on a GPU machine the GPU."""
    got = probe()
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert got.reason == cuda.INSTALL_HINT
        return
    if got.available:
        assert "compute capability" in got.device
    else:
        assert got.reason.startswith(("no usable NVIDIA driver", "no CUDA device", "cuBLAS", "NVRTC"))


def test_registered_above_every_cpu_backend_with_every_op_native(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    registry = Registry(autoload=False)
    assert "cuda" in registry.names()
    assert set(cuda.CudaBackend.native_ops()) == set(OP_NAMES)
    cpu = [registry.backend_class(n).max_priority or registry.backend_class(n).priority
           for n in ("naive", "blas")]  # fmt: skip
    assert cuda.CudaBackend.priority > max(cpu)
    assert cuda.CudaBackend.priority >= registry.backend_class("opencl").max_priority
    with pytest.raises(BackendError, match="pip install 'opswitch\\[cuda\\]'"):
        registry.select("cuda")
    assert registry.select("auto").backend.name != "cuda"
    assert registry.select("cuda,naive").backend.name == "naive"


# -- cuBLAS calls, emulated on flat numpy buffers -----------------------------------
def colmajor(buf, offset, rows, cols, ld):
    """The column-major [rows, cols] matrix with leading dimension ld at ``offset``."""
    s = buf.itemsize
    return np.lib.stride_tricks.as_strided(buf[offset:], shape=(rows, cols), strides=(s, s * ld))


def run_gemm(g: cuda.Gemm, a, b, c, alpha=1.0, beta=0.0):
    """cublasSgemm(StridedBatched) semantics over flat arrays a, b, c (beta = 0: C is not read)."""
    for i in range(g.batch):
        ar, ac = (g.m, g.k) if g.transa == cuda.CUBLAS_OP_N else (g.k, g.m)
        br, bc = (g.k, g.n) if g.transb == cuda.CUBLAS_OP_N else (g.n, g.k)
        A = colmajor(a, g.a_off + i * g.stride_a, ar, ac, g.lda)
        B = colmajor(b, g.b_off + i * g.stride_b, br, bc, g.ldb)
        A = A if g.transa == cuda.CUBLAS_OP_N else A.T
        B = B if g.transb == cuda.CUBLAS_OP_N else B.T
        C = colmajor(c, g.c_off + i * g.stride_c, g.m, g.n, g.ldc)
        C[...] = alpha * (A @ B) + (beta * C if beta else 0.0)


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (1, 7, 3), (5, 65, 127), (33, 96, 97)])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_products_map_onto_one_sgemm_without_copies(m, k, n, transpose_b):
    a, b, bias = randn(m, k), randn(n, k) if transpose_b else randn(k, n), randn(n)
    out = np.tile(bias, (m, 1))  # what fill_rows leaves for beta = 1
    run_gemm(cuda.product_gemm(m, n, k, transpose_b), b.reshape(-1), a.reshape(-1), out.reshape(-1), beta=1.0)
    np.testing.assert_allclose(out, ops.matmul(a, b, transpose_b) + bias, rtol=1e-12, atol=1e-12)


def kv_write(qkv, caches, plan, n_head):
    """attention.cu's kv_write, from the plan's rows."""
    n_embd = qkv.shape[1] // 3
    d = n_embd // n_head
    for s, pos, row in plan.rows:
        k, v = caches[s]
        k[:, pos] = qkv[row, n_embd : 2 * n_embd].reshape(n_head, d)
        v[:, pos] = qkv[row, 2 * n_embd :].reshape(n_head, d)


def split_attention(qkv, caches, plan, n_head, out):
    """attn_split + attn_combine: each short sequence's rows, keys in ATT_CHUNK splits."""
    n_embd = qkv.shape[1] // 3
    d = n_embd // n_head
    for s, pos, row in plan.split_rows:
        k, v = caches[s]
        for h in range(n_head):
            q = qkv[row, h * d : (h + 1) * d] / math.sqrt(d)
            parts = []
            for split in range(plan.n_splits):
                j0, j1 = split * cuda.ATT_CHUNK, min((split + 1) * cuda.ATT_CHUNK, pos + 1)
                if j0 >= j1:
                    parts.append((np.zeros(d), -np.inf, 0.0))
                    continue
                p = k[h, j0:j1] @ q
                m = p.max()
                e = np.exp(p - m)
                parts.append((e @ v[h, j0:j1], m, e.sum()))
            top = max(m for _, m, _ in parts)
            weights = [math.exp(m - top) if total > 0 else 0.0 for _, m, total in parts]
            total = sum(w * t for w, (_, _, t) in zip(weights, parts))
            out[row, h * d : (h + 1) * d] = sum(w * acc for w, (acc, _, _) in zip(weights, parts)) / total


def prompt_attention(qkv, caches, plan, n_head, out):
    """The SGEMM path: scores, causal softmax (norm.cu's, scaled), values."""
    n_embd = qkv.shape[1] // 3
    d = n_embd // n_head
    for s, row0, start, count in plan.prompts:
        k, v = caches[s]
        n_kv = start + count
        scores = np.zeros(n_head * count * n_kv)
        g_scores, g_values = cuda.prefill_gemms(count, n_kv, d, n_head, k.shape[1], row0)
        run_gemm(g_scores, k.reshape(-1), qkv.reshape(-1), scores)
        p = ops.softmax(scores.reshape(n_head, count, n_kv) / math.sqrt(d), causal=True)
        run_gemm(g_values, v.reshape(-1), p.reshape(-1).copy(), out.reshape(-1))


def test_the_attention_launch_plan_computes_the_reference_for_a_ragged_batch():
    """Decode rows, a short chunk, and prompts (one over several key splits)
    in one batch: the plan's kv_write, split and SGEMM paths give ops.attention."""
    n_head, d, capacity = 3, 8, 600
    n_embd = n_head * d
    starts, counts = [0, 5, 300, 0, 280], [1, 1, 20, 7, 300]
    caches = [(np.zeros((n_head, capacity, d)), np.zeros((n_head, capacity, d))) for _ in counts]
    for (k, v), start in zip(caches, starts):
        k[:, :start], v[:, :start] = randn(n_head, start, d), randn(n_head, start, d)
    want_caches = [(k.copy(), v.copy()) for k, v in caches]
    qkv = randn(sum(counts), 3 * n_embd)
    want = ops.attention_batch(qkv, n_head, attention_step(want_caches, starts, counts))

    addresses = [(id(k), id(v)) for k, v in caches]
    plan = cuda.attention_plan(addresses, [capacity] * len(counts), starts, counts)
    assert [p[0] for p in plan.prompts] == [2, 4] and plan.n_splits == cuda.split_count(capacity)
    assert len(plan.split_rows) == 1 + 1 + 7
    out = np.full((sum(counts), n_embd), np.nan)
    kv_write(qkv, caches, plan, n_head)
    split_attention(qkv, caches, plan, n_head, out)
    prompt_attention(qkv, caches, plan, n_head, out)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
    for (k, v), (wk, wv) in zip(caches, want_caches):
        np.testing.assert_array_equal(k, wk)
        np.testing.assert_array_equal(v, wv)


def test_the_attention_plan_checks_the_batch():
    with pytest.raises(ValueError, match="do not fit a cache of capacity 8"):
        cuda.attention_plan([(1, 2)], [8], [5], [4])
    with pytest.raises(ValueError, match="differ in length"):
        cuda.attention_plan([(1, 2)], [8], [0, 1], [1])
    plan = cuda.attention_plan([(10, 20), (30, 40)], [64, 1024], [3, 9], [1, 2])
    assert plan.seqs.tolist() == [[10, 20, 64, 0], [30, 40, 1024, 0]]
    assert plan.rows.tolist() == [[0, 3, 0], [1, 9, 1], [1, 10, 2]]
    assert plan.split_rows.tolist() == plan.rows.tolist() and plan.prompts == []
    assert plan.n_splits == 1024 // cuda.ATT_CHUNK


def test_graph_stable_geometry_and_small_helpers():
    assert [cuda.split_count(c) for c in (0, 1, cuda.ATT_CHUNK, cuda.ATT_CHUNK + 1)] == [1, 1, 1, 2]
    assert cuda.elementwise_grid(0) == 1 and cuda.elementwise_grid(cuda.EW_THREADS + 1) == 2
    assert cuda.elementwise_grid(10**12) == cuda.EW_MAX_BLOCKS
    assert cuda.check_ids([0, -1, 4], 5).tolist() == [0, 4, 4]
    with pytest.raises(IndexError):
        cuda.check_ids([5], 5)
    qkv = np.zeros((1, 6))
    assert cuda.slot_args("embedding", (None, [1])) == {1}
    assert cuda.slot_args("attention_batch", (qkv, 1, [], [7], [1])) == {2, 3}
    assert cuda.slot_args("attention_batch", (qkv, 1, [], [7], [cuda.PREFILL_GEMM_MIN])) == set()
    assert cuda.slot_args("attention", (qkv, 1, None, None, 3)) == {4}
    assert cuda.slot_args("linear", (qkv, None, None)) == set()


def test_packed_weights_say_which_products_the_gemv_kernels_take():
    w = randn(6, 4)
    lin = formats.encode(w, "int8", "linear")  # per-column scales
    table = formats.encode(w, "int8", "embedding")  # per-row scales
    pack = lambda s: cuda.Packed(s.fmt, s.data, s.scale, formats.channel_axis(s.role), s)  # noqa: E731
    assert pack(lin).fits_gemv(False) and not pack(lin).fits_gemv(True)
    assert pack(table).fits_gemv(True) and not pack(table).fits_gemv(False)
    half = formats.encode(w, "f16", "linear")
    assert pack(half).fits_gemv(True) and pack(half).fits_gemv(False) and pack(half).shape == (6, 4)


# -- the slot arena and the graph recorder, on a numpy "device" ------------------
class FakeRuntime:
    """A stream that records launches while capturing; a graph is the list."""

    def __init__(self, fail_capture_of=None):
        self.capturing = None
        self.fail_capture_of = fail_capture_of
        self.launched = 0

    def run(self, name, fn):
        if self.capturing is None:
            fn()
        elif name == self.fail_capture_of:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported")
        else:
            self.capturing.append(fn)

    def begin_capture(self):
        self.capturing = []

    def end_capture(self):
        graph, self.capturing = self.capturing, None
        return graph

    def launch(self, graph):
        self.launched += 1
        for fn in graph:
            fn()

    def capture_pool(self, on):
        pass


class FakeBackend:
    """The cuda backend's shape (impls with out/launch, integers through the
    arena, kernels reading the arena when they run), on numpy."""

    def __init__(self, graphs=True, max_graphs=2, **runtime):
        self.rt = FakeRuntime(**runtime)
        self.device_slots = np.zeros(64, dtype=np.int64)
        self.uploads = []

        def upload(a, b):
            self.uploads.append((a, b))
            host = self.arena.host[a:b].copy()  # a copy queued now, as cudaMemcpyAsync from pinned memory
            self.rt.run("upload", lambda: self.device_slots.__setitem__(slice(a, b), host))

        self.arena = cuda.SlotArena(np.zeros(64, dtype=np.int64), upload, drain=lambda: None)
        self.graphs = None
        if graphs:
            self.graphs = cuda.StepGraphs(self.rt, self.arena, cuda.slot_args, max_graphs=max_graphs)

        self.buffers = {}  # "device addresses" (ids) of the caches the kernels were given

    def _call(self, name, impl, args):
        return impl(*args) if self.graphs is None else self.graphs.call(name, impl, args)

    def begin_step(self, step):
        if self.graphs is not None:
            self.graphs.begin(cuda.step_key(step))

    def end_step(self):
        if self.graphs is not None:
            self.graphs.finish()

    def to_host(self, x):
        if self.graphs is not None:
            self.graphs.interrupt()
        self.arena.reset()
        return x.copy()

    def to_device(self, x):
        if self.graphs is not None:
            self.graphs.interrupt()
        return np.array(x, dtype=float)

    # ops
    def embedding(self, table, ids):
        return self._call("embedding", self._embedding, (table, ids))

    def add(self, a, b):
        return self._call("add", self._add, (a, b))

    def attention_batch(self, qkv, n_head, step):
        args = (qkv, n_head, step.caches, step.starts, step.counts)
        return self._call("attention_batch", self._attend, args)

    def _embedding(self, table, ids, out=None, launch=True):
        slot, n = self.arena.put(ids), len(ids)
        out = np.empty((n, table.shape[1])) if out is None else out
        if launch:
            ids = lambda: self.device_slots[slot : slot + n]  # noqa: E731  read when the kernel runs
            self.rt.run("embedding", lambda: np.take(table, ids(), axis=0, out=out))
        return out

    def _add(self, a, b, out=None, launch=True):
        out = np.empty(a.shape) if out is None else out
        if launch:
            self.rt.run("add", lambda: np.add(a, b, out=out))
        return out

    def _attend(self, x, n_head, caches, starts, counts, out=None, launch=True):
        """A toy attention: write x's rows into the cache at the start, return the
        running mean over the cache; the cache and its start are read from the
        arena when it runs, as the real kernels read addresses and lengths."""
        self.buffers.update((id(k), k) for k, _ in caches)
        n = len(counts)
        slot = self.arena.put([*starts, *(id(k) for k, _ in caches)])
        out = np.empty(x.shape) if out is None else out
        if launch:
            def kernel():
                row = 0
                for i, count in enumerate(counts):
                    start = int(self.device_slots[slot + i])
                    k = self.buffers[int(self.device_slots[slot + n + i])]
                    k[start : start + count] = x[row : row + count]
                    for j in range(count):
                        out[row + j] = k[: start + j + 1].mean(axis=0)
                    row += count
            self.rt.run("attention", kernel)
        return out


TABLE, WPE = randn(10, 3), randn(40, 3)


def toy_step(caches, starts, counts):
    """The step of the toy attention's caches ([capacity, n]: one layer, key and value one buffer)."""
    step = Step(tuple(starts), tuple(counts), tuple(c.shape[0] for c in caches))
    return step, step.layers([[(c, c)] for c in caches])[0]


def decode(be, caches, tokens, positions, counts=None):
    """A model-shaped step: begin, embeddings, add, attention, end, the logits back."""
    counts = counts or [1] * len(caches)
    starts, row = [], 0
    for c in counts:
        starts.append(positions[row])
        row += c
    step, layer = toy_step(caches, starts, counts)
    be.begin_step(step)
    x = be.add(be.embedding(TABLE, tokens), be.embedding(WPE, positions))
    out = be.attention_batch(x, 1, layer)
    be.end_step()
    return be.to_host(out)


def run_both(steps, **kwargs):
    """Run the same steps on an eager and a graph-recording fake; results must match."""
    eager, graphed = FakeBackend(graphs=False), FakeBackend(**kwargs)
    caches = {name: (np.zeros((40, 3)), np.zeros((40, 3))) for name in "ab"}
    for names, tokens, positions, *counts in steps:
        want = decode(eager, [caches[n][0] for n in names], tokens, positions, *counts)
        got = decode(graphed, [caches[n][1] for n in names], tokens, positions, *counts)
        np.testing.assert_array_equal(got, want)
    return graphed


def test_a_repeating_step_is_captured_then_replayed_with_new_positions():
    steps = [("a", [3, 4], [0, 1], [2])] + [("a", [t % 10], [t]) for t in range(2, 12)]
    be = run_both(steps)
    # the prompt and the first two decode steps run eagerly, the third is captured
    assert be.graphs.counts == {"eager": 3, "captured": 1, "replayed": 7}
    assert be.rt.launched == 8 and len(be.graphs.tapes) == 1


def test_each_batch_shape_gets_its_own_graph_and_stays_correct():
    """The step says its shape before its first op: a batch of two between decodes of
    one is not a guess gone wrong (no fallback), and each shape replays its own graph."""
    decode_a = [("a", [t % 10], [t]) for t in range(6)]
    both = [("ab", [1, 2], [6, 0]), ("ab", [3, 4], [7, 1])]
    back = [("a", [t % 10], [t]) for t in range(8, 12)]
    be = run_both(decode_a + both + back + both[:1] + [("ab", [5, 6], [12, 2])])
    assert be.graphs.counts == {"eager": 4, "captured": 2, "replayed": 8}, be.graphs.counts
    assert len(be.graphs.tapes) == 2


def test_a_graph_is_replayed_for_another_sequence_of_the_same_shape():
    """Cache addresses and lengths come from the slot arena: a new sequence whose cache
    has the shape of the captured one replays the graph, writing its own cache."""
    steps = [("a", [t % 10], [t]) for t in range(4)] + [("b", [t % 10], [t]) for t in range(3)]
    be = run_both(steps)
    assert be.graphs.counts == {"eager": 2, "captured": 1, "replayed": 4}, be.graphs.counts


def test_ops_outside_a_step_run_eagerly_and_are_not_recorded():
    be, cache = FakeBackend(), np.zeros((40, 3))
    for t in range(5):
        _, layer = toy_step([cache], [t], [1])
        x = be.add(be.embedding(TABLE, [t]), be.embedding(WPE, [t]))
        be.to_host(be.attention_batch(x, 1, layer))
    assert be.graphs.counts == {} and be.rt.launched == 0 and not be.graphs.tokens


def test_an_upload_mid_step_ends_the_graph_for_that_step():
    outs, caches = {}, {}
    for graphs in (False, True):
        be, cache = FakeBackend(graphs=graphs), np.zeros((40, 3))
        for t in range(7):
            step, layer = toy_step([cache], [t], [1])
            be.begin_step(step)
            x = be.add(be.embedding(TABLE, [t]), be.embedding(WPE, [t]))
            if t == 5:  # replaying by now: the upload ends the graph for this step
                x = be.add(x, be.to_device(np.ones((1, 3))))
            out = be.attention_batch(x, 1, layer)
            be.end_step()
            outs.setdefault(graphs, []).append(be.to_host(out))
        caches[graphs] = cache
    np.testing.assert_array_equal(outs[True], outs[False])
    np.testing.assert_array_equal(caches[True], caches[False])
    # the interrupted step kept the graph of its shape: the next step replays it
    assert be.graphs.counts["replayed"] == 3 and be.graphs.counts["fallbacks"] == 1
    assert len(be.graphs.tapes) == 1


def test_a_capture_that_fails_switches_graphs_off_and_the_step_still_runs():
    steps = [("a", [t % 10], [t]) for t in range(6)]
    be = run_both(steps, fail_capture_of="attention")
    assert not be.graphs.enabled
    assert "capturing attention_batch failed" in be.graphs.disabled_reason
    assert "captured" not in be.graphs.counts and not be.graphs.tapes


def test_a_genuine_op_error_is_raised_and_graphs_stay_on():
    be, cache = FakeBackend(), np.zeros((40, 3))
    for t in range(2):
        decode(be, [cache], [t], [t])
    be.begin_step(toy_step([cache], [2], [1])[0])  # the third step is being captured
    x = be.embedding(TABLE, [2])
    assert be.graphs.mode == cuda.CAPTURE

    def bad(*args, out=None, launch=True):
        raise ValueError("add: cannot broadcast shapes")

    with pytest.raises(ValueError, match="cannot broadcast"):  # raised again by the op run eagerly
        be.graphs.call("add", bad, (x, x))
    assert be.graphs.enabled and be.graphs.mode == cuda.EAGER
    be.end_step()
    np.testing.assert_array_equal(be.to_host(x), TABLE[[2]])  # the captured part was run for real


def test_least_recently_used_graphs_are_dropped():
    a = [("a", [t], [t]) for t in range(4)]
    ab = [("ab", [t, t], [4 + t, t]) for t in range(4)]  # another shape: two sequences
    be = run_both(a + ab, max_graphs=1)
    assert be.graphs.counts["captured"] == 2 and len(be.graphs.tapes) == 1
    assert list(be.graphs.tapes) == [((1, 1), (40, 40), None)]  # the two sequences', the most recent
    # back to one sequence: seen often enough, its next step is captured again at once
    be = run_both(a + ab + [("a", [9], [8]), ("a", [8], [9])], max_graphs=1)
    assert be.graphs.counts["captured"] == 3 and be.graphs.counts["replayed"] == 1 + 1 + 1
    be = run_both(a + ab + [("a", [9], [8]), ("a", [8], [9])], max_graphs=2)  # both kept: replayed
    assert be.graphs.counts["captured"] == 2 and be.graphs.counts["replayed"] == 1 + 1 + 2
    assert not be.graphs.counts["fallbacks"]


def test_the_arena_copies_at_once_or_when_flushed():
    uploads, drained = [], []
    arena = cuda.SlotArena(np.zeros(8, dtype=np.int64), lambda a, b: uploads.append((a, b)),
                           lambda: drained.append(1))
    assert arena.put([1, 2, 3]) == 0 and uploads == [(0, 3)]
    arena.deferred = True
    assert arena.put([4]) == 3 and arena.put([5, 6]) == 4 and uploads == [(0, 3)]
    arena.flush()
    assert uploads[-1] == (3, 6) and arena.host[:6].tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(cuda.SlotArenaFull):  # a capture cannot wait for the device
        arena.put(range(5))
    arena.deferred = False
    assert arena.put(range(5)) == 0 and drained == [1]  # eager: drain, then start over


# -- the backend itself, on a stand-in CuPy that emulates its kernels (tests/cuda_standin.py) ---
def standin(monkeypatch, **kwargs):
    from tests.cuda_standin import StandIn

    return StandIn(**kwargs).install(monkeypatch)


def test_the_probe_says_when_the_cuda_headers_are_missing(monkeypatch):
    """CuPy 14 compiles every kernel with cuda_runtime.h; a driver-only machine has none."""
    standin(monkeypatch, headers=False)
    got = probe()
    assert not got.available
    assert got.reason.startswith("the CUDA runtime headers are not installed")
    assert "pip install 'opswitch[cuda]'" in got.reason and "'opswitch[cuda13]'" in got.reason
    assert "CUDA_PATH" in got.reason
    standin(monkeypatch, headers=True)
    assert probe().available
    standin(monkeypatch, headers=False, version="13.6.0")  # CuPy 13 finds its headers its own way
    assert probe().available


def test_the_cuda_extras_bring_the_toolkit_wheels():
    """CuPy alone needs a CUDA toolkit on the machine; the [ctk] extra brings its wheels."""
    from pathlib import Path

    if sys.version_info < (3, 11):  # a Python version, not a dependency: skipped in CI too
        pytest.skip("tomllib is in the standard library from Python 3.11")
    import tomllib

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(r.startswith("cupy-cuda12x[ctk]") for r in extras["cuda"])
    assert any(r.startswith("cupy-cuda13x[ctk]") for r in extras["cuda13"])
    assert any(r.startswith("nvidia-cuda-runtime-cu12") for r in extras["cuda"])  # the headers
    assert any(r.startswith("nvidia-cuda-runtime>=13") for r in extras["cuda13"])


def test_prepared_in_a_worker_thread_it_still_multiplies_in_another(monkeypatch):
    """The registry prepares in a contained worker thread that then ends; CuPy's per-thread
    cuBLAS handle dies with it.  The backend's own handle works from any thread, runs on the
    backend's stream, and is destroyed with the backend."""
    import gc
    import threading

    si = standin(monkeypatch)
    backend = Registry(autoload=False).select("cuda").backend
    x, w, b = randn(20, 7), randn(7, 5), randn(5)  # 20 rows: cuBLAS
    want = (x.astype(np.float32) @ w.astype(np.float32)) + b.astype(np.float32)
    results = []

    def work(backend):
        args = [backend.to_device(a) for a in (x, w, b)]
        results.append(backend.to_host(backend.linear(*args)))

    work(backend)
    thread = threading.Thread(target=work, args=(backend,))
    thread.start()
    thread.join()
    for got in results:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert si.counts["sgemm"] == 2
    handle = si.handles[backend._handle]
    assert handle["stream"] == backend._stream.ptr and not handle["destroyed"]
    del backend
    gc.collect()
    assert handle["destroyed"]


def tiny_gpt2(n_layer=2, n_head=2, n_embd=32, vocab=64, n_positions=64):
    from opswitch.cli.benchmark import random_gpt2_params
    from opswitch.model.config import GPT2Config

    config = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head)  # fmt: skip
    return config, random_gpt2_params(config, seed=1)


def generate(model, prompt, n_new):
    """Greedy decode: every step's logits."""
    cache = model.new_cache()
    logits = [model.step([(prompt, cache)])]
    for _ in range(n_new):
        logits.append(model.step([([int(np.argmax(logits[-1][0]))], cache)]))
    return np.concatenate(logits)


@pytest.mark.parametrize("weights", ["f32", "int8"])
def test_decode_with_cuda_graphs_captures_every_step_and_matches_the_reference(monkeypatch, weights):
    """A prompt of 20 rows (cuBLAS, run eagerly), then decode steps: with
    OPSWITCH_CUDA_GRAPHS=1 the decode steps are captured once and replayed,
    with no cuBLAS call (CuPy raises NotImplementedError for one during a
    capture), and the logits are the naive backend's."""
    from opswitch.model.gpt2 import GPT2

    monkeypatch.setenv(cuda.ENV_GRAPHS, "1")
    si = standin(monkeypatch)
    registry = Registry(autoload=False)
    config, params = tiny_gpt2()
    prompt = list(range(3, 23))
    gpu = GPT2(config, params, registry.select("cuda").backend, weights=weights)
    naive = registry.select("naive:float32").backend
    want = generate(GPT2(config, params, naive, weights=weights), prompt, 8)
    before = si.counts["sgemm"]
    got = generate(gpu, prompt, 8)
    graphs = gpu.backend.graphs
    assert graphs.enabled, graphs.disabled_reason
    assert graphs.counts["captured"] == 1 and graphs.counts["replayed"] == 5, graphs.counts
    assert si.counts["graph_launch"] == 6
    assert si.counts["sgemm"] - before == 2 * (4 + 2)  # the prompt's: 4 products, 2 for attention, per layer
    # float32 throughout, different summation orders: a few float32 roundings of |logit| ~ 1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_repeated_cublas_step_runs_eagerly_and_graphs_stay_on(monkeypatch):
    """A step with cuBLAS in it (a prompt-sized product in a decode-shaped step) repeats:
    its capture is abandoned before cuBLAS is called, the step runs eagerly, and it is
    not tried again."""
    monkeypatch.setenv(cuda.ENV_GRAPHS, "1")
    si = standin(monkeypatch)
    backend = Registry(autoload=False).select("cuda").backend
    x, w, b = (backend.to_device(a) for a in (randn(20, 7), randn(7, 5), randn(5)))
    want = backend.to_host(backend.linear(x, w, b))
    step = Step((0,), (1,), (64,))
    for _ in range(5):
        backend.begin_step(step)
        out = backend.linear(x, w, b)
        backend.end_step()
        np.testing.assert_array_equal(backend.to_host(out), want)
    graphs = backend.graphs
    assert graphs.enabled and not graphs.tapes and graphs.counts["fallbacks"] == 1, graphs.counts
    assert graphs.counts["eager"] == 5 and cuda.step_key(step) in graphs.eager_keys
    assert si.counts["sgemm"] == 6 and si.counts["graph_launch"] == 0


def test_a_prompt_step_is_never_captured():
    """cuBLAS cannot be captured: a step of a prompt's size has no key, whatever it repeats."""
    assert cuda.step_key(Step((0,), (cuda.PREFILL_GEMM_MIN,), (64,))) is None
    assert cuda.step_key(Step((0,) * 9, (1,) * 9, (64,) * 9)) is None  # 9 rows: SGEMM products
    assert cuda.step_key(Step.last_rows((5, 0), (1, 3), (64, 128))) == ((1, 3), (64, 128), 2)


@pytest.fixture
def standin_backend(monkeypatch):
    si = standin(monkeypatch)
    return si, Registry(autoload=False).select("cuda").backend


def test_the_conformance_suite_passes_on_the_emulated_kernels(standin_backend):
    """Every op's host side (checks, launch geometry, arena slots, cuBLAS
    operands, to_host everywhere) through the conformance suite; the kernels
    are emulated, so this checks what the backend asks of them."""
    from opswitch.testing import test_conformance as suite
    from opswitch.testing.cases import CASES

    _, backend = standin_backend
    for case in CASES:
        suite.test_op_matches_reference(backend, case)
    suite.test_decoding_through_the_cache_equals_attending_at_once(backend, 70)
    suite.test_a_batch_equals_each_sequence_alone(backend)


def test_a_ragged_batch_of_decodes_chunks_and_prompts_through_the_backend(standin_backend):
    """The split kernels and the SGEMM path in one attention_batch call, on the device."""
    _, be = standin_backend
    n_head, d, capacity = 3, 8, 600
    starts, counts = [0, 5, 300, 0, 280], [1, 1, 20, 7, 300]
    host = [(np.zeros((n_head, capacity, d)), np.zeros((n_head, capacity, d))) for _ in counts]
    for (k, v), start in zip(host, starts):
        k[:, :start], v[:, :start] = randn(n_head, start, d), randn(n_head, start, d)
    qkv = randn(sum(counts), 3 * n_head * d).astype(np.float32)
    host = [(k.astype(np.float32), v.astype(np.float32)) for k, v in host]
    caches = [(be.to_device(k), be.to_device(v)) for k, v in host]
    wide = [(k.astype(np.float64), v.astype(np.float64)) for k, v in host]
    want = ops.attention_batch(qkv.astype(np.float64), n_head, attention_step(wide, starts, counts))
    got = be.to_host(be.attention_batch(be.to_device(qkv), n_head, attention_step(caches, starts, counts)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32 sums of <= 600 terms of |x| < 5


# GPT-2 small's depth and heads; the launch count does not depend on the width
GPT2_SMALL_DEPTH = {"n_layer": 12, "n_head": 12, "n_embd": 96, "vocab": 256}


def decode_counts(si, model, steps=4):
    """The stand-in's counters for the last of ``steps`` decode steps after a 20-token prompt."""
    cache = model.new_cache()
    model.step([(list(range(20)), cache)])
    for t in range(steps):
        si.counts.clear()
        model.step([([t], cache)])
    return Counter(si.counts)


@pytest.mark.parametrize("weights", ["f32", "int8"])
def test_kernel_launches_per_decode_token(monkeypatch, weights):
    """GPT-2 small's depth and heads, batch 1: per layer 4 GEMVs, with the bias
    in all, the residual add + layernorm before c_attn and c_fc in theirs (the
    first layer's add: the embeddings'), the cache write in c_attn's, the GELU
    in c_fc's; attn_split and attn_combine.  Then 2 embedding gathers, the
    final add + layernorm, the gather of the last row (take_rows) and the
    lm_head GEMV.  No cuBLAS; a
    slot-arena copy per gather and 2 per attention layer (its sequences, its
    rows).  Printed for the record."""
    from opswitch.model.gpt2 import GPT2

    si = standin(monkeypatch)
    config, params = tiny_gpt2(**GPT2_SMALL_DEPTH)
    model = GPT2(config, params, Registry(autoload=False).select("cuda").backend, weights=weights)
    counts = decode_counts(si, model)
    kernels = {k.split(":")[1]: n for k, n in counts.items() if k.startswith("kernel:")}
    total = counts["kernel"] + counts["sgemm"]
    print(f"\ncuda, {weights}, one decode token at GPT-2 small's depth: {total} kernel launches"
          f" ({', '.join(f'{n} {k}' for k, n in sorted(kernels.items()))}), {counts['memcpy']} host-to-device"
          f" copies")  # fmt: skip
    n_layer = config.n_layer
    assert counts["sgemm"] == 0
    assert counts["kernel:add_layernorm"] == 1 and not {"kernel:gelu", "kernel:kv_write"} & set(counts)
    assert total == 6 * n_layer + 5 and counts["memcpy"] == 2 * n_layer + 3


def test_a_replayed_decode_step_is_one_graph_launch_and_one_copy(monkeypatch):
    """With OPSWITCH_CUDA_GRAPHS=1 a decode step is one CUDA graph (its kernels
    inside) after one copy of the step's integers into the slot arena."""
    from opswitch.model.gpt2 import GPT2

    monkeypatch.setenv(cuda.ENV_GRAPHS, "1")
    si = standin(monkeypatch)
    config, params = tiny_gpt2(**GPT2_SMALL_DEPTH)
    model = GPT2(config, params, Registry(autoload=False).select("cuda").backend)
    counts = decode_counts(si, model, steps=5)
    print(f"\ncuda graphs, f32, a replayed decode token: {counts['issued']} host launches"
          f" ({counts['graph_launch']} graph of {counts['kernel']} kernels, {counts['memcpy']} copy)")
    assert counts["graph_launch"] == 1 and counts["memcpy"] == 1 and counts["issued"] == 2
    assert counts["kernel"] == 6 * config.n_layer + 5


def check_fused_pairs(be):
    """add -> layernorm and linear -> gelu, fused on the device: the fused op's result
    and the first op's output (still readable) are the reference's; other orders flush."""
    x, y = randn(3, 700).astype(np.float32), randn(3, 700).astype(np.float32)
    g, b = randn(700).astype(np.float32), randn(700).astype(np.float32)
    dx, dy, dg, db = (be.to_device(v) for v in (x, y, g, b))  # an upload between them would flush
    total = be.add(dx, dy)
    normed = be.layernorm(total, dg, db)
    want_total = x.astype(np.float64) + y
    np.testing.assert_allclose(be.to_host(normed), ops.layernorm(want_total, g, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(be.to_host(total), x + y)
    a, w, bias = (randn(*s).astype(np.float32) for s in ((3, 70), (70, 100), (100,)))
    for fmt in ("f32", "f16", "bf16", "int8"):
        stored = formats.encode(w, fmt, "linear")
        wide = formats.decode(stored).astype(np.float64)
        args = be.to_device(a), be.upload_weight(stored), be.to_device(bias)
        pre = be.linear(*args)
        act = be.gelu(pre)
        want_pre = a.astype(np.float64) @ wide + bias
        np.testing.assert_allclose(be.to_host(act), ops.gelu(want_pre), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(be.to_host(pre), want_pre, rtol=1e-5, atol=1e-5)
    # add -> layernorm -> linear -> gelu: one GEMV, which makes the layernorm's rows itself
    w2, b2 = randn(700, 50).astype(np.float32), randn(50).astype(np.float32)
    dw2, db2 = be.to_device(w2), be.to_device(b2)
    total2 = be.add(dx, dy)
    normed2 = be.layernorm(total2, dg, db)
    pre2 = be.linear(normed2, dw2, db2)
    act2 = be.gelu(pre2)
    want_normed = ops.layernorm(want_total, g, b)
    want_pre2 = want_normed @ w2 + b2
    np.testing.assert_allclose(be.to_host(act2), ops.gelu(want_pre2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(be.to_host(pre2), want_pre2, rtol=1e-4, atol=1e-4)  # sums of 700 |x| ~ 3
    np.testing.assert_allclose(be.to_host(normed2), want_normed, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(be.to_host(total2), x + y)
    other = be.gelu(be.add(dx, dy))  # not a fused pair: the add launches first
    np.testing.assert_allclose(be.to_host(other), ops.gelu(want_total), rtol=1e-5, atol=1e-5)
    # the qkv GEMV writes the new keys and values into the caches: 2 sequences, 3 new rows
    n_head, d, capacity, starts, counts = 2, 8, 300, [290, 4], [2, 1]
    e = n_head * d
    h, wq, bq = (randn(*s).astype(np.float32) for s in ((3, 40), (40, 3 * e), (3 * e,)))
    past = [(randn(n_head, capacity, d), randn(n_head, capacity, d)) for _ in counts]
    past = [(k.astype(np.float32), v.astype(np.float32)) for k, v in past]
    caches = [(be.to_device(k), be.to_device(v)) for k, v in past]
    args = be.to_device(h), be.to_device(wq), be.to_device(bq)
    qkv = be.linear(*args)
    att = be.attention_batch(qkv, n_head, attention_step(caches, starts, counts))
    want_qkv = h.astype(np.float64) @ wq + bq
    ref_caches = [(k.astype(np.float64), v.astype(np.float64)) for k, v in past]
    want_att = ops.attention_batch(want_qkv, n_head, attention_step(ref_caches, starts, counts))
    np.testing.assert_allclose(be.to_host(att), want_att, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(be.to_host(qkv), want_qkv, rtol=1e-5, atol=1e-5)
    for (k, v), (rk, rv) in zip(caches, ref_caches):
        np.testing.assert_allclose(be.to_host(k), rk, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(be.to_host(v), rv, rtol=1e-5, atol=1e-5)


def test_fused_pairs_keep_every_output(standin_backend):
    si, be = standin_backend
    si.counts.clear()  # prepare's own check ran an add
    check_fused_pairs(be)
    assert si.counts["kernel:add_layernorm"] == 1 and si.counts["kernel:add"] == 1
    assert si.counts["kernel:gelu"] == 1 and si.counts["kernel:gemv_n_f32"] == 3
    assert "kernel:kv_write" not in si.counts


def test_a_layernorm_prologue_too_big_for_shared_memory_is_not_fused(standin_backend):
    """8 rows of GPT-2 large (1280 wide) exceed the 48 KiB a launch gets: add_layernorm runs alone."""
    si, be = standin_backend
    x, g, w = randn(8, 1280).astype(np.float32), randn(1280).astype(np.float32), randn(1280, 4)
    dx, dg, dw = be.to_device(x), be.to_device(g), be.to_device(w.astype(np.float32))
    si.counts.clear()
    out = be.to_host(be.linear(be.layernorm(be.add(dx, dx), dg, dg), dw))
    want = ops.layernorm(2 * x.astype(np.float64), g, g) @ w.astype(np.float32)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    assert si.counts["kernel:add_layernorm"] == 1 and si.counts["kernel:gemv_n_f32"] == 1
