"""Every op of a backend against the float64 reference (see cases.py for bounds)."""

from __future__ import annotations

import numpy as np
import pytest

from opswitch.core.ops import CATALOGUE
from opswitch.core.registry import OpTable
from opswitch.testing.cases import CASES, Case


def _is_float_array(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind == "f"


def _run(backend, case: Case, seed: int = 0):
    """Call the backend's op and the reference on the same (dtype-rounded) inputs."""
    args, kwargs = case.build(np.random.default_rng(seed))
    dtype = backend.dtype
    rounded = [a.astype(dtype).astype(np.float64) if _is_float_array(a) else a for a in args]
    ref = CATALOGUE[case.op].reference(*rounded, **kwargs)
    device_args = [backend.to_device(a) if _is_float_array(a) else a for a in args]
    before = [
        backend.to_host(d).copy() if _is_float_array(a) else None for a, d in zip(args, device_args)
    ]
    out = getattr(OpTable(backend), case.op)(*device_args, **kwargs)
    backend.synchronize()
    after = [backend.to_host(d) if b is not None else None for d, b in zip(device_args, before)]
    return rounded, ref, out, before, after


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.id}" for c in CASES])
def test_op_matches_reference(opswitch_backend, case: Case) -> None:
    backend = opswitch_backend
    rounded, ref, out, before, after = _run(backend, case)
    refs = ref if isinstance(ref, tuple) else (ref,)
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(refs), f"{case.op} returned {len(outs)} outputs, expected {len(refs)}"
    u = float(np.finfo(backend.dtype).eps) / 2
    for i, (o, r) in enumerate(zip(outs, refs)):
        got = np.asarray(backend.to_host(o), dtype=np.float64)
        assert got.shape == r.shape, f"output {i}: shape {got.shape}, expected {r.shape}"
        assert np.isfinite(got).all(), f"output {i} contains NaN or inf"
        bound = 0.0 if i in case.exact_outputs else case.bound(rounded, r, u)
        err = np.abs(got - r)
        worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
        assert (err <= bound).all(), (
            f"output {i}: |err| {err[worst]:.3g} > bound {np.broadcast_to(bound, err.shape)[worst]:.3g}"
            f" at {worst} (got {got[worst]:.9g}, reference {r[worst]:.9g})"
        )
    for i, (b, a) in enumerate(zip(before, after)):
        if b is not None:
            assert np.array_equal(a, b), f"input {i} was modified by {case.op}"


@pytest.mark.parametrize("n_steps", [1, 70])
def test_attention_cache_grows_consistently(opswitch_backend, n_steps: int) -> None:
    """Decoding token by token through the cache equals attending over everything at once."""
    backend = opswitch_backend
    ops = OpTable(backend)
    rng = np.random.default_rng(1)
    n_head, d, n_prompt = 3, 8, 5
    qkv = rng.standard_normal((n_prompt + n_steps, 3 * n_head * d)).astype(backend.dtype)
    full, _, _ = CATALOGUE["attention"].reference(qkv.astype(np.float64), n_head)
    out, k, v = ops.attention(backend.to_device(qkv[:n_prompt]), n_head)
    rows = [backend.to_host(out)]
    for t in range(n_prompt, n_prompt + n_steps):
        out, k, v = ops.attention(backend.to_device(qkv[t : t + 1]), n_head, k, v)
        rows.append(backend.to_host(out))
    got = np.concatenate(rows)
    assert np.isfinite(got).all()
    tol = 1e-4 if backend.dtype == np.float32 else 1e-12  # float32: see _attention_bound
    np.testing.assert_allclose(got, full, rtol=tol, atol=tol)
    assert backend.to_host(k).shape == (n_prompt + n_steps, n_head * d)


def test_reusing_an_old_cache_does_not_corrupt_the_new_one(opswitch_backend) -> None:
    """Two continuations of one prefix (as in a REPL retry) must not overwrite each other."""
    backend = opswitch_backend
    ops = OpTable(backend)
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((6, 3 * 16)).astype(backend.dtype)
    _, k0, v0 = ops.attention(backend.to_device(qkv[:4]), 2)
    _, k1, _ = ops.attention(backend.to_device(qkv[4:5]), 2, k0, v0)
    snapshot = backend.to_host(k1).copy()
    _, k2, _ = ops.attention(backend.to_device(qkv[5:6]), 2, k0, v0)
    np.testing.assert_array_equal(backend.to_host(k1), snapshot)
    np.testing.assert_array_equal(backend.to_host(k2)[4], qkv[5, 16:32])
