"""The opencl backend's own paths (the conformance suite covers op semantics).

Device choice and probe reasons, the program cache, the GEMV/GEMM switch,
the caller-owned KV cache, and that activations never visit the host.  Skips
with the probe's reason where OpenCL is unavailable.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from support import require

from opswitch.backends import opencl
from opswitch.core import ops as ref
from opswitch.core.step import attention_step

ENV_VARS = (opencl.ENV_DEVICE, opencl.ENV_TUNING, "PYOPENCL_CTX")


@pytest.fixture(scope="module")
def be() -> opencl.OpenCLBackend:
    backend = opencl.OpenCLBackend()
    probe = backend.probe()
    if not probe.available:
        pytest.skip(probe.reason)
    backend.prepare()
    return backend


@pytest.fixture
def clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def fresh_probe():
    return opencl.OpenCLBackend().probe()


def close(got, want, k: int = 1) -> None:
    """float32 against the float64 reference: |err| / max(1, |ref|) within accumulation error."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / max(1.0, np.abs(want).max()) < 2e-6 * np.sqrt(k) + 1e-6


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    """float64 values that are exactly float32, so the reference sees what the device sees."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32).astype(np.float64)


# -- probing ---------------------------------------------------------------


def test_without_pyopencl_the_reason_says_how_to_install(clean_env):
    clean_env.setitem(sys.modules, "pyopencl", None)  # makes `import pyopencl` fail
    probe = fresh_probe()
    assert not probe.available
    assert probe.reason == opencl.INSTALL_HINT


def test_without_platforms_the_reason_says_what_to_install(clean_env):
    require("pyopencl")
    clean_env.setattr(opencl, "list_devices", lambda cl: [])
    probe = fresh_probe()
    assert not probe.available and "opswitch[opencl]" in probe.reason


def test_device_selected_by_index_and_by_name(be, clean_env):
    import pyopencl as cl

    devices = opencl.list_devices(cl)
    key, device = devices[-1]
    for spec in (key, device.name.strip().upper()[-12:]):
        clean_env.setenv(opencl.ENV_DEVICE, spec)
        probe = fresh_probe()
        assert probe.available, probe.reason
        assert device.name.strip() in probe.device


@pytest.mark.parametrize("spec", ["9:9", "no-such-device"])
def test_unknown_device_lists_the_devices_there_are(be, clean_env, spec):
    import pyopencl as cl

    clean_env.setenv(opencl.ENV_DEVICE, spec)
    probe = fresh_probe()
    assert not probe.available
    assert opencl.ENV_DEVICE in probe.reason and repr(spec) in probe.reason
    for index, (_, device) in enumerate(opencl.list_devices(cl)):
        assert f"opencl:{index}" in probe.reason and device.name.strip() in probe.reason


def test_a_spec_names_a_device_by_index(be, clean_env):
    import pyopencl as cl

    n = len(opencl.list_devices(cl))
    assert opencl.OpenCLBackend(device="0").probe().available
    missing = opencl.OpenCLBackend(device=str(n)).probe()
    assert not missing.available and f"no OpenCL device '{n}'" in missing.reason


def test_pyopencl_ctx_is_honoured(be, clean_env):
    clean_env.setenv("PYOPENCL_CTX", "0:0")
    assert fresh_probe().available
    clean_env.setenv("PYOPENCL_CTX", "77")
    probe = fresh_probe()
    assert not probe.available and "PYOPENCL_CTX" in probe.reason


def test_bad_tuning_value_is_a_reason(be, clean_env):
    clean_env.setenv(opencl.ENV_TUNING, "fpga")
    probe = fresh_probe()
    assert not probe.available and opencl.ENV_TUNING in probe.reason


def test_program_is_built_once_per_context_and_options(be, monkeypatch):
    import pyopencl as cl

    assert opencl.build_program(be.context, be.options) is opencl.build_program(be.context, be.options)
    builds = []
    real = cl.Program
    monkeypatch.setattr(cl, "Program", lambda *a: builds.append(a) or real(*a))
    context = cl.Context([be.device])  # a new context needs its own build, once
    first = opencl.build_program(context, be.options)
    assert opencl.build_program(context, be.options) is first
    assert opencl.build_program(be.context, be.options) is not first
    assert len(builds) == 1


# -- arrays ----------------------------------------------------------------


def test_arrays_cross_only_through_to_device_and_to_host(be):
    import pyopencl.array as cl_array

    host = np.arange(6, dtype=np.float64).reshape(2, 3)
    dev = be.to_device(host)
    assert isinstance(dev, cl_array.Array) and dev.dtype == np.float32
    assert be.to_device(np.arange(3)).dtype.kind == "i"  # ids stay integers
    assert be.to_host(host) is host  # the core's fallback path relies on this
    np.testing.assert_array_equal(be.to_host(dev), host)


# -- products --------------------------------------------------------------


@pytest.fixture
def kernel_calls(be, monkeypatch):
    """Names of the product kernels the ops launch."""
    calls: list[str] = []
    for name in ("gemm", "gemm_nt", "gemv", "gemv_t", "transpose"):
        kernel = getattr(be._k, name)
        monkeypatch.setattr(be._k, name, lambda *a, _n=name, _k=kernel: calls.append(_n) or _k(*a))
    return calls


@pytest.mark.parametrize("m", [1, 3, 17, 300])
@pytest.mark.parametrize(("k", "n"), [(33, 65), (127, 1), (768, 17)])
def test_products_take_gemv_for_one_row_and_gemm_otherwise(be, kernel_calls, m, k, n):
    x, w, b, wt = randn(m, k), randn(k, n, seed=1), randn(n, seed=2), randn(n, k, seed=3)
    dx, dw, db, dwt = map(be.to_device, (x, w, b, wt))
    close(be.to_host(be.linear(dx, dw, db)), ref.linear(x, w, b), k)
    close(be.to_host(be.matmul(dx, dw)), ref.matmul(x, w), k)
    close(be.to_host(be.matmul(dx, dwt, transpose_b=True)), ref.matmul(x, wt, True), k)
    if m == 1:
        assert kernel_calls == ["gemv", "gemv", "gemv_t"]
    elif be._t.NT_VIA_GEMM_M and m >= be._t.NT_VIA_GEMM_M:  # CPUs: many rows of x @ wᵀ
        assert kernel_calls == ["gemm", "gemm", "transpose", "gemm"]
    else:
        assert kernel_calls == ["gemm", "gemm", "gemm_nt"]


def test_tied_lm_head_with_the_gpt2_vocabulary(be):
    wte = randn(50257, 768, seed=4) * 0.02
    x = randn(3, 768)
    dwte = be.to_device(wte)
    for rows in (slice(2, 3), slice(0, 3)):  # decode (GEMV), then all positions (GEMM)
        got = be.to_host(be.matmul(be.to_device(x[rows]), dwte, transpose_b=True))
        close(got, ref.matmul(x[rows], wte, True), 768)


@pytest.mark.parametrize(
    "shapes",
    [opencl.TUNING["gpu"], {**opencl.TUNING["cpu"], **opencl.NARROW_CPU}],
    ids=["gpu", "avx2-cpu"],
)
def test_other_devices_kernel_shapes_compute_the_same(be, monkeypatch, shapes):
    """The float4 / 256-work-item GPU kernels and the 8-wide CPU ones, checked here without such a device."""
    monkeypatch.setattr(opencl, "tuning", lambda device, kind: dict(shapes))
    other = opencl.OpenCLBackend()
    if not other.probe().available:
        pytest.skip(other.probe().reason)
    other.prepare()
    for m, k, n in [(1, 67, 33), (1, 768, 2305), (5, 130, 67), (33, 300, 129)]:
        x, w, b = randn(m, k), randn(k, n, seed=1), randn(n, seed=2)
        close(other.to_host(other.linear(*map(other.to_device, (x, w, b)))), ref.linear(x, w, b), k)
        wt = other.to_device(w.T)
        close(other.to_host(other.matmul(other.to_device(x), wt, True)), ref.matmul(x, w), k)
    qkv = randn(9, 3 * 40)
    caches = [other.alloc((5, 12, 8)) for _ in range(2)]
    out = other.attention(other.to_device(qkv), 5, *caches, 0)
    close(other.to_host(out), ref.attention(qkv, 5, np.zeros((5, 12, 8)), np.zeros((5, 12, 8)), 0))
    s = randn(3, 7, 300) * 1e4
    g, bias = randn(300, seed=5), randn(300, seed=6)
    close(
        other.to_host(other.layernorm(*map(other.to_device, (s[0], g, bias)))), ref.layernorm(s[0], g, bias)
    )
    close(other.to_host(other.gelu(other.to_device(s[0] / 1e4))), ref.gelu(s[0] / 1e4))


# -- numerics the reference itself does not give ---------------------------


def test_embedding_checks_ids_on_the_host(be):
    table = randn(10, 5)
    np.testing.assert_array_equal(be.to_host(be.embedding(be.to_device(table), [9, -1])), table[[9, -1]])
    with pytest.raises(IndexError):
        be.embedding(be.to_device(table), [10])


# -- KV cache --------------------------------------------------------------


def test_attention_writes_the_callers_cache_in_place(be):
    """The cache buffers are the caller's: written where the positions say, never replaced."""
    n_head, d, capacity = 2, 8, 20
    qkv = randn(7, 3 * n_head * d)
    k_cache, v_cache = be.alloc((n_head, capacity, d)), be.alloc((n_head, capacity, d))
    k_ptr = k_cache.data.int_ptr
    be.attention(be.to_device(qkv[:4]), n_head, k_cache, v_cache, 0)
    be.attention_batch(be.to_device(qkv[4:7]), n_head, attention_step([(k_cache, v_cache)], [4], [3]))
    assert k_cache.data.int_ptr == k_ptr
    want_k = np.zeros((n_head, capacity, d))
    want_k[:, :7] = qkv[:, n_head * d : 2 * n_head * d].reshape(7, n_head, d).transpose(1, 0, 2)
    np.testing.assert_array_equal(be.to_host(k_cache), want_k.astype(np.float32))


# -- activations stay on the device ----------------------------------------


def test_a_transformer_block_never_reads_back_to_the_host(be, monkeypatch):
    import pyopencl as cl
    import pyopencl.array as cl_array

    e, n_head, n_vocab, n_seq = 48, 4, 101, 7
    host = {
        "wte": randn(n_vocab, e), "wpe": randn(16, e, seed=1), "g": randn(e, seed=2), "b": randn(e, seed=3),
        "w_attn": randn(e, 3 * e, seed=4) * 0.1, "b_attn": randn(3 * e, seed=5),
        "w_proj": randn(e, e, seed=6) * 0.1, "w_fc": randn(e, 4 * e, seed=7) * 0.1,
        "w_out": randn(4 * e, e, seed=8) * 0.1,
    }  # fmt: skip
    p = {name: be.to_device(a) for name, a in host.items()}
    ids = np.arange(n_seq) * 13 % n_vocab

    def forward(ops, p, ids, cache, start):  # a one-block GPT-2, written against ops only
        x = ops.add(ops.embedding(p["wte"], ids), ops.embedding(p["wpe"], np.arange(len(ids))))
        a = ops.attention(
            ops.linear(ops.layernorm(x, p["g"], p["b"]), p["w_attn"], p["b_attn"]), n_head, *cache, start
        )
        x = ops.add(x, ops.linear(a, p["w_proj"], p["b"]))
        h = ops.gelu(ops.linear(ops.layernorm(x, p["g"], p["b"], 1e-5), p["w_fc"]))
        x = ops.add(x, ops.linear(h, p["w_out"]))
        x = ops.slice_rows(x, len(ids) - 1, len(ids))
        return ops.matmul(x, p["wte"], transpose_b=True)

    real_copy = cl.enqueue_copy

    def no_download(queue, dest, src, **kw):
        assert not isinstance(dest, np.ndarray), "an op copied device memory to the host"
        return real_copy(queue, dest, src, **kw)

    cache = (be.alloc((n_head, 16, e // n_head)), be.alloc((n_head, 16, e // n_head)))
    monkeypatch.setattr(cl, "enqueue_copy", no_download)
    monkeypatch.setattr(cl_array.Array, "get", lambda *a, **k: pytest.fail("an op called Array.get"))
    logits = forward(be, p, ids, cache, 0)
    step = forward(be, p, ids[-1:], cache, n_seq)  # a decode step through the cache (wrong positions: fine)
    assert all(isinstance(a, cl_array.Array) for a in (logits, step))
    monkeypatch.undo()
    ref_cache = (np.zeros((n_head, 16, e // n_head)), np.zeros((n_head, 16, e // n_head)))
    want = forward(ref, host, ids, ref_cache, 0)
    close(be.to_host(logits), want, 4 * e)
