"""Every op of a backend against the float64 reference (see cases.py for bounds).

Besides the values, each op must return the backend's own array type in its
compute dtype, leave its inputs alone, and write exactly what the reference
writes into the arguments it changes in place (the caller-owned KV cache).

Every device array is read through the backend's ``to_host``, never handed to
numpy: a GPU array refuses implicit conversion, and comparing device arrays
with themselves would check nothing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from opswitch.core.backend import Backend
from opswitch.core.ops import CATALOGUE
from opswitch.core.optable import OpTable
from opswitch.core.step import LayerStep, attention_step
from opswitch.testing.cases import CASES, Case, attention_bound


def _is_float_array(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind == "f"


def _tree(fn, x):
    """Apply ``fn`` to every float array in ``x`` (lists/tuples of arrays: caches, parts;
    a step's caches)."""
    if isinstance(x, LayerStep):
        return x.with_caches(_tree(fn, x.caches))
    if isinstance(x, (list, tuple)):
        return type(x)(_tree(fn, v) for v in x)
    return fn(x) if _is_float_array(x) else x


def _leaves(x) -> list:
    if isinstance(x, LayerStep):
        return _leaves(x.caches)
    if isinstance(x, (list, tuple)):
        return [leaf for v in x for leaf in _leaves(v)]
    return [x]


def _host_leaves(backend, host_args, device_args) -> list:
    """Host copies of the device arrays among ``device_args`` (where ``host_args``, the same
    structure before ``to_device``, had float arrays), leaf by leaf; None for other leaves."""
    return [
        backend.to_host(d).copy() if _is_float_array(h) else None
        for h, d in zip(_leaves(host_args), _leaves(device_args))
    ]


def _device_type(backend) -> type:
    return type(backend.to_device(np.zeros((2, 2), dtype=backend.dtype)))


def _run(backend, case: Case, seed: int = 0):
    """Call the backend's op and the reference on the same (dtype-rounded) inputs."""
    args, kwargs = case.build(np.random.default_rng(seed))
    dtype = backend.dtype
    rounded = _tree(lambda a: a.astype(dtype).astype(np.float64), args)
    ref_args = copy.deepcopy(rounded)  # the reference writes its caches in place
    ref = CATALOGUE[case.op].reference(*ref_args, **kwargs)
    device_args = _tree(backend.to_device, args)
    before = [_host_leaves(backend, a, d) for a, d in zip(args, device_args)]
    out = getattr(OpTable(backend), case.op)(*device_args, **kwargs)
    backend.synchronize()
    return args, rounded, ref_args, ref, device_args, before, out


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.id}" for c in CASES])
def test_op_matches_reference(opswitch_backend: Backend, case: Case) -> None:
    backend = opswitch_backend
    args, rounded, ref_args, ref, device_args, before, out = _run(backend, case)
    native = case.op in type(backend).native_ops()
    if native:  # a fallback's output is the registry's doing, not the backend's
        expected = _device_type(backend)
        assert isinstance(out, expected), (
            f"{case.op} returned {type(out).__module__}.{type(out).__name__}, not the backend's own"
            f" array type {expected.__module__}.{expected.__name__}"
        )
    got = backend.to_host(out)
    assert isinstance(got, np.ndarray), f"to_host({case.op} output) is {type(got).__name__}, not numpy"
    assert got.dtype == backend.dtype, (
        f"{case.op} returned {got.dtype}, the backend computes in {backend.dtype}"
    )
    got = got.astype(np.float64)
    assert got.shape == ref.shape, f"shape {got.shape}, expected {ref.shape}"
    assert np.isfinite(got).all(), "the output contains NaN or inf"
    u = float(np.finfo(backend.dtype).eps) / 2
    bound = case.bound(rounded, ref, u)
    err = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert (err <= bound).all(), (
        f"|err| {err[worst]:.3g} > bound {np.broadcast_to(bound, err.shape)[worst]:.3g}"
        f" at {worst} (got {got[worst]:.9g}, reference {ref[worst]:.9g})"
    )
    writes = CATALOGUE[case.op].writes
    for i, (host, device, snapshot) in enumerate(zip(args, device_args, before)):
        now = _host_leaves(backend, host, device)
        if i in writes:  # the cache rows written are copies of k/v: exact, and nothing else moves
            for j, (a, r) in enumerate(zip(now, _leaves(ref_args[i]))):
                if a is not None:
                    np.testing.assert_array_equal(
                        a.astype(np.float64), r, err_msg=f"argument {i} (part {j}), written in place"
                    )
        else:
            for a, b in zip(now, snapshot):
                if a is not None:
                    assert np.array_equal(a, b), f"input {i} was modified by {case.op}"


def _alloc_cache(backend, n_head, capacity, d):
    return backend.alloc((n_head, capacity, d)), backend.alloc((n_head, capacity, d))


@pytest.mark.parametrize("n_steps", [1, 70])
def test_decoding_through_the_cache_equals_attending_at_once(opswitch_backend: Backend, n_steps: int) -> None:
    """A prompt, then one token per step through the caller-owned cache, equals
    attending over the whole sequence at once; the cache holds exactly the keys
    and values of every position."""
    backend = opswitch_backend
    ops = OpTable(backend)
    rng = np.random.default_rng(1)
    n_head, d, n_prompt = 3, 8, 5
    n_total = n_prompt + n_steps
    qkv = rng.standard_normal((n_total, 3 * n_head * d)).astype(backend.dtype)
    k_cache, v_cache = _alloc_cache(backend, n_head, n_total + 2, d)
    rows = [backend.to_host(ops.attention(backend.to_device(qkv[:n_prompt]), n_head, k_cache, v_cache, 0))]
    for t in range(n_prompt, n_total):
        out = ops.attention(backend.to_device(qkv[t : t + 1]), n_head, k_cache, v_cache, t)
        rows.append(backend.to_host(out))
    got = np.concatenate(rows).astype(np.float64)
    ref_k, ref_v = np.zeros((n_head, n_total + 2, d)), np.zeros((n_head, n_total + 2, d))
    wide = qkv.astype(np.float64)
    full = CATALOGUE["attention"].reference(wide, n_head, ref_k, ref_v, 0)
    u = float(np.finfo(backend.dtype).eps) / 2
    bound = attention_bound(wide, n_head, np.zeros_like(ref_k), np.zeros_like(ref_v), 0, u)
    assert np.isfinite(got).all()
    assert (np.abs(got - full) <= bound).all(), f"max |err| {np.abs(got - full).max():.3g}"
    np.testing.assert_array_equal(backend.to_host(k_cache).astype(np.float64), ref_k)
    np.testing.assert_array_equal(backend.to_host(v_cache).astype(np.float64), ref_v)


def test_a_batch_equals_each_sequence_alone(opswitch_backend: Backend) -> None:
    """``attention_batch`` over prompts and decodes of different lengths gives, row
    for row and bit for bit, what ``attention_batch`` gives each sequence alone."""
    backend = opswitch_backend
    ops = OpTable(backend)
    rng = np.random.default_rng(3)
    n_head, d = 2, 16
    seqs = [(4, 0), (1, 6), (7, 3), (1, 0)]  # (new rows, past length)
    parts, solo_caches, batch_caches = [], [], []
    for n_new, start in seqs:
        past_k = rng.standard_normal((n_head, start + n_new, d)).astype(backend.dtype)
        past_v = rng.standard_normal((n_head, start + n_new, d)).astype(backend.dtype)
        past_k[:, start:] = past_v[:, start:] = 0
        solo_caches.append((backend.to_device(past_k), backend.to_device(past_v)))
        batch_caches.append((backend.to_device(past_k), backend.to_device(past_v)))
        parts.append(rng.standard_normal((n_new, 3 * n_head * d)).astype(backend.dtype))
    starts, counts = [s for _, s in seqs], [n for n, _ in seqs]
    together = backend.to_host(ops.attention_batch(backend.to_device(np.concatenate(parts)), n_head,
                                                   attention_step(batch_caches, starts, counts)))
    alone = [
        backend.to_host(ops.attention_batch(backend.to_device(p), n_head, attention_step([c], [s], [n])))
        for p, c, s, n in zip(parts, solo_caches, starts, counts)
    ]
    np.testing.assert_array_equal(together, np.concatenate(alone))
    for (bk, bv), (sk, sv) in zip(batch_caches, solo_caches):
        np.testing.assert_array_equal(backend.to_host(bk), backend.to_host(sk))
        np.testing.assert_array_equal(backend.to_host(bv), backend.to_host(sv))


F16_U = 2.0**-11  # float16's unit roundoff: each cached key and value errs relatively by at most this


@pytest.mark.parametrize("n_prompt, n_steps, scale", [(5, 40, 1.0), (1, 3, 1.0), (33, 8, 30.0)])
def test_an_f16_kv_cache_holds_rounded_values_and_attends_within_their_bound(
    opswitch_backend, n_prompt: int, n_steps: int, scale: float
) -> None:
    """With ``kv_formats`` listing f16: the cache holds exactly the float16 rounding of every
    key and value, the output is within the float32 bound of attention over those rounded
    values, and within the derived f16 bound of attention over the exact ones:
    scores err by δ ≤ 2^-11·Σ_c|q_c k_jc|/√d, probabilities relatively by ≤ 2δ, and each value
    by 2^-11, so |Δout| ≤ (2δ + 2^-11)·Σ_j p_j|v_j| beside the float32 bound."""
    backend = opswitch_backend
    if "f16" not in backend.kv_formats:
        pytest.skip(f"{backend.spec} keeps its KV cache in {', '.join(backend.kv_formats)}")
    ops = OpTable(backend)
    rng = np.random.default_rng(5)
    n_head, d = 3, 16
    n_total = n_prompt + n_steps
    qkv = (scale * rng.standard_normal((n_total, 3 * n_head * d))).astype(backend.dtype)
    shape = (n_head, n_total + 3, d)
    k_cache, v_cache = backend.alloc_kv(shape, "f16"), backend.alloc_kv(shape, "f16")
    rows = [backend.to_host(ops.attention(backend.to_device(qkv[:n_prompt]), n_head, k_cache, v_cache, 0))]
    for t in range(n_prompt, n_total):
        out = ops.attention(backend.to_device(qkv[t : t + 1]), n_head, k_cache, v_cache, t)
        rows.append(backend.to_host(out))
    got = np.concatenate(rows).astype(np.float64)
    assert np.isfinite(got).all()

    n_embd = n_head * d
    rounded = qkv.astype(np.float64)
    rounded[:, n_embd:] = qkv[:, n_embd:].astype(np.float16)  # what the cache holds
    ref_k, ref_v = np.zeros(shape), np.zeros(shape)
    on_rounded = CATALOGUE["attention"].reference(rounded, n_head, ref_k, ref_v, 0)
    np.testing.assert_array_equal(backend.to_host(k_cache).astype(np.float64), ref_k)
    np.testing.assert_array_equal(backend.to_host(v_cache).astype(np.float64), ref_v)
    u = float(np.finfo(backend.dtype).eps) / 2
    zeros = np.zeros(shape)
    bound = attention_bound(rounded, n_head, zeros, zeros, 0, u)
    assert (np.abs(got - on_rounded) <= bound).all(), f"max |err| {np.abs(got - on_rounded).max():.3g}"

    exact = qkv.astype(np.float64)
    on_exact = CATALOGUE["attention"].reference(exact, n_head, np.zeros(shape), np.zeros(shape), 0)
    q, k, v = (exact[:, i * n_embd : (i + 1) * n_embd].reshape(n_total, n_head, d).transpose(1, 0, 2)
               for i in range(3))
    causal = np.tril(np.ones((n_total, n_total), bool))
    delta = F16_U * np.where(causal, np.abs(q) @ np.abs(k).transpose(0, 2, 1), 0).max(-1, keepdims=True)
    delta /= np.sqrt(d)
    scores = np.where(causal, q @ k.transpose(0, 2, 1) / np.sqrt(d), -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    f16_bound = ((2 * delta + F16_U) * (p @ np.abs(v))).transpose(1, 0, 2).reshape(n_total, n_embd)
    f16_bound = f16_bound * (1 + 4 * F16_U) + bound  # second-order terms (e^{2δ} - 1 - 2δ), float32
    err = np.abs(got - on_exact)
    assert (err <= f16_bound).all(), f"max |err| {err.max():.3g}"
    assert err.max() > 0 or n_total == 1  # the rounding is really there (an f32 cache would be exact-ish)


def test_an_f16_kv_cache_passes_nan_on(opswitch_backend) -> None:
    """A NaN written to an f16 cache must come back out as NaN, never as a finite value."""
    backend = opswitch_backend
    if "f16" not in backend.kv_formats:
        pytest.skip(f"{backend.spec} keeps its KV cache in {', '.join(backend.kv_formats)}")
    ops = OpTable(backend)
    n_head, d = 2, 8
    qkv = np.ones((4, 3 * n_head * d), dtype=backend.dtype)
    qkv[1, 2 * n_head * d] = np.nan  # a value of head 0 at position 1
    shape = (n_head, 5, d)
    k_cache, v_cache = backend.alloc_kv(shape, "f16"), backend.alloc_kv(shape, "f16")
    ops.attention(backend.to_device(qkv[:2]), n_head, k_cache, v_cache, 0)
    out = backend.to_host(ops.attention(backend.to_device(qkv[2:3]), n_head, k_cache, v_cache, 2))
    assert np.isnan(out[0, :d]).any()
