"""Conformance cases: awkward inputs for every op, and how close is close enough.

Each case builds float64 inputs from a seeded generator.  The reference runs
on those inputs *after rounding them to the backend's dtype*, so the
comparison measures the backend's arithmetic, not the rounding of its
inputs.  Tolerances are error bounds in units of the dtype's unit roundoff
``u`` (float32: 6.0e-8, float64: 1.1e-16); each states why it is enough.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Case:
    """One op call: its inputs and the elementwise error bound it must meet."""

    op: str
    id: str
    build: Callable[[np.random.Generator], tuple[list, dict]]
    # bound(args, ref, u) -> array broadcastable to the output
    bound: Callable[[list, np.ndarray, float], np.ndarray]
    exact_outputs: tuple[int, ...] = field(default=())  # tuple outputs that must match exactly


def _randn(rng: np.random.Generator, *shape: int, scale: float = 1.0, offset: float = 0.0):
    return rng.standard_normal(shape) * scale + offset


def _gemm_bound(a, b, transpose_b=False):
    """|fl(a·b) - a·b| <= (k + 2)·u·(|a|·|b|) for any summation order (Higham 3.5)."""
    k = a.shape[-1]
    return (k + 2) * (np.abs(a) @ np.abs(b.T if transpose_b else b))


def _linear_bound(args, ref, u):
    x, w, b = args
    return u * (_gemm_bound(x, w) + 2 * np.abs(ref) + (0 if b is None else np.abs(b)))


def _matmul_bound(args, ref, u):
    a, b, *rest = args
    return u * _gemm_bound(a, b, bool(rest and rest[0]))


def _relative(n_u: float, floor: float = 1.0):
    """|err| <= n_u·u·max(|ref|, floor): elementwise ops accurate to a few ulp."""
    return lambda args, ref, u: n_u * u * np.maximum(np.abs(ref), floor)


def _linear_cases() -> list[Case]:
    shapes = [(1, 1, 1), (1, 7, 3), (3, 17, 33), (5, 65, 127), (1, 768, 2304), (33, 96, 97),
              (300, 64, 48), (2, 1, 9)]
    cases = []
    for n, k, m in shapes:
        def build(rng, n=n, k=k, m=m):
            return [_randn(rng, n, k), _randn(rng, k, m, scale=0.2), _randn(rng, m)], {}
        cases.append(Case("linear", f"{n}x{k}x{m}", build, _linear_bound))

    def no_bias(rng):
        return [_randn(rng, 4, 31), _randn(rng, 31, 17), None], {}
    cases.append(Case("linear", "no-bias-4x31x17", no_bias, _linear_bound))
    return cases


def _matmul_cases() -> list[Case]:
    cases = []
    for m, k, n in [(1, 7, 3), (3, 17, 33), (5, 65, 127), (1, 96, 1001), (64, 64, 64)]:
        for tb in (False, True):
            def build(rng, m=m, k=k, n=n, tb=tb):
                b = _randn(rng, n, k) if tb else _randn(rng, k, n)
                return [_randn(rng, m, k), b, tb], {}
            cases.append(Case("matmul", f"{m}x{k}x{n}{'-tb' if tb else ''}", build, _matmul_bound))
    return cases


def _add_cases() -> list[Case]:
    cases = []
    for shape in [(1, 1), (7, 33), (300, 96), (1, 2305)]:
        def build(rng, shape=shape):
            return [_randn(rng, *shape, scale=3), _randn(rng, *shape)], {}
        # one rounding of the exact sum: 1 ulp of the result
        cases.append(Case("add", "x".join(map(str, shape)), build, _relative(1, floor=0.0)))
    return cases


def _layernorm_bound(args, ref, u):
    """Mean and variance over n elements carry ~sqrt(n)·u relative error (blocked sums),
    relative to the row's magnitude max|x|; centring divides by σ, so an offset row
    (|x| >> σ) is ill-conditioned by max|x|/σ.  64·sqrt(n)·u leaves room for rsqrt and
    fused kernels; the output magnitude is |g|·|x̂| + |b|, so the bound scales with it."""
    x, g, b = args[:3]
    n = x.shape[-1]
    sigma = np.sqrt(x.var(axis=-1, keepdims=True) + 1e-5)  # the cases use eps=1e-5
    condition = np.abs(x).max(axis=-1, keepdims=True) / sigma
    xhat = np.abs(ref - b) / np.maximum(np.abs(g), 1e-30)
    return 64 * np.sqrt(n) * u * (np.abs(g) * (xhat + 1 + condition) + np.abs(b))


def _layernorm_cases() -> list[Case]:
    cases = []
    specs = [((1, 1), 1.0, 0.0), ((1, 7), 1.0, 0.0), ((3, 768), 1.0, 0.0), ((300, 96), 1.0, 0.0),
             ((5, 33), 1e4, 0.0), ((4, 65), 1.0, 1e3), ((2, 1601), 1e-3, 0.0)]
    for shape, scale, offset in specs:
        def build(rng, shape=shape, scale=scale, offset=offset):
            n = shape[-1]
            x = _randn(rng, *shape, scale=scale, offset=offset)
            return [x, _randn(rng, n, scale=0.5, offset=1.0), _randn(rng, n, scale=0.5)], {"eps": 1e-5}
        tag = "x".join(map(str, shape)) + (f"-scale{scale:g}" if scale != 1 else "")
        tag += f"-offset{offset:g}" if offset else ""
        cases.append(Case("layernorm", tag, build, _layernorm_bound))
    return cases


def _gelu_cases() -> list[Case]:
    cases = []
    for shape, scale in [((1,), 1.0), ((3, 17), 1.0), ((1, 3072), 3.0), ((1000,), 0.01), ((9, 9), 20.0)]:
        def build(rng, shape=shape, scale=scale):
            return [_randn(rng, *shape, scale=scale)], {}
        # tanh, cube and products each add a few ulp; device tanh may be 4 ulp (OpenCL spec)
        tag = "x".join(map(str, shape)) + (f"-scale{scale:g}" if scale != 1 else "")
        cases.append(Case("gelu", tag, build, lambda a, r, u: 32 * u * (np.abs(a[0]) + 1e-3)))
    return cases


def _softmax_bound(args, ref, u):
    """exp(x - max) has relative error ~|x - max|·u from rounding its argument plus
    a few ulp from exp; the normalising sum adds ~sqrt(n)·u.  Probabilities are
    in [0, 1], so an absolute bound of that size (at least 64·u) is enough."""
    x = args[0]
    spread = np.minimum(np.abs(x - x.max(axis=-1, keepdims=True)), 100)
    n = x.shape[-1]
    return u * (64 + 4 * np.sqrt(n) + 2 * spread) * np.maximum(ref, 1e-3)


def _softmax_cases() -> list[Case]:
    cases = []
    specs = [((1, 1), False, 1.0), ((3, 5), False, 1.0), ((2, 7, 7), True, 1.0),
             ((4, 3, 10), True, 1.0), ((1, 50257), False, 5.0), ((3, 33), False, 1e4),
             ((2, 17, 17), True, 1e4), ((1, 300, 300), True, 1.0)]
    for shape, causal, scale in specs:
        def build(rng, shape=shape, causal=causal, scale=scale):
            return [_randn(rng, *shape, scale=scale)], {"causal": causal}
        tag = "x".join(map(str, shape)) + ("-causal" if causal else "")
        tag += f"-scale{scale:g}" if scale != 1 else ""
        cases.append(Case("softmax", tag, build, _softmax_bound))
    return cases


def _attention_bound(args, ref, u):
    """Scores q·k/√d over d terms err by ≲ (d+2)·u·Σ|q||k|/√d; a score error δ moves
    each probability by a factor ≤ e^{2δ}, and the output is a convex mix of v rows,
    so |err| ≲ (4δ + 64·u·n_kv)·max|v|."""
    qkv, n_head = args[0], args[1]
    n_embd = qkv.shape[1] // 3
    d = n_embd // n_head
    v = qkv[:, 2 * n_embd:]
    if len(args) > 2 and args[2] is not None:
        v = np.concatenate([args[3], v])
    vmax = np.abs(v).max()
    delta = (d + 2) * u * np.abs(qkv[:, :n_embd]).max() * np.abs(qkv[:, n_embd:]).max() * np.sqrt(d)
    return (4 * delta + 64 * u * v.shape[0]) * max(vmax, 1e-30)


def _attention_cases() -> list[Case]:
    cases = []
    for n_seq, n_head, d, n_past in [(1, 1, 1, 0), (1, 3, 32, 0), (5, 3, 32, 0), (1, 3, 32, 17),
                                     (7, 4, 16, 9), (300, 2, 8, 0), (1, 12, 64, 255), (3, 5, 7, 63),
                                     (2, 2, 8, 1)]:
        def build(rng, n_seq=n_seq, n_head=n_head, d=d, n_past=n_past):
            e = n_head * d
            args = [_randn(rng, n_seq, 3 * e), n_head]
            if n_past:
                args += [_randn(rng, n_past, e), _randn(rng, n_past, e)]
            return args, {}
        tag = f"seq{n_seq}-h{n_head}-d{d}" + (f"-past{n_past}" if n_past else "")
        cases.append(Case("attention", tag, build, _attention_bound, exact_outputs=(1, 2)))
    return cases


def _exact(args, ref, u):
    return np.zeros(1)


def _embedding_cases() -> list[Case]:
    def build(rng, n_vocab, n, ids):
        return [_randn(rng, n_vocab, n), np.array(ids, dtype=np.int64)], {}

    return [
        Case("embedding", "1-row", lambda rng: build(rng, 1, 5, [0]), _exact),
        Case("embedding", "101x96-edges", lambda rng: build(rng, 101, 96, [0, 100, 5, 5, 99]), _exact),
        Case("embedding", "long", lambda rng: build(rng, 97, 33, list(range(97)) * 3), _exact),
    ]


def _slice_cases() -> list[Case]:
    def build(rng, shape, start, stop):
        return [_randn(rng, *shape), start, stop], {}

    return [
        Case("slice_rows", "last-of-7", lambda rng: build(rng, (7, 33), 6, 7), _exact),
        Case("slice_rows", "only-row", lambda rng: build(rng, (1, 5), 0, 1), _exact),
        Case("slice_rows", "middle", lambda rng: build(rng, (300, 17), 100, 201), _exact),
    ]


def _cross_entropy_bound(args, ref, u):
    """Per row, loss = m + log Σ exp(x - m) - x[t].  exp(x_j - m) carries relative error
    ~(|x_j - m| + 4)·u, which weighted by the probabilities p_j is (E_p|x - m| + 4)·u of
    the sum; the sum over V terms adds ~sqrt(V)·u (as in _softmax_bound); log turns the
    sum's relative error into an absolute one; m + log S and - x[t] each round once
    (2·(|m| + |lse| + |x[t]|)·u).  Rows are then summed: n·u·|total|.  64·u of slack
    covers log's and exp's own few ulp."""
    x, t = args[0], np.asarray(args[1])
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    p = e / e.sum(axis=-1, keepdims=True)
    lse = (m + np.log(e.sum(axis=-1, keepdims=True)))[:, 0]
    x_t = x[np.arange(t.size), t]
    spread = (p * np.abs(x - m)).sum(axis=-1)
    rows = 64 + 4 * np.sqrt(x.shape[-1]) + 2 * spread + 2 * (np.abs(m[:, 0]) + np.abs(lse) + np.abs(x_t))
    return u * (rows.sum() + t.size * np.abs(ref))


def _cross_entropy_cases() -> list[Case]:
    cases = []
    # (rows, vocab, scale, offset): a 1-token vocabulary (loss exactly 0), odd sizes, the demo
    # model's window, GPT-2's vocabulary, sharp (1e4) and offset (1e3: exp overflows unstabilised)
    specs = [(1, 1, 1.0, 0.0), (5, 7, 1.0, 0.0), (31, 1001, 3.0, 0.0), (256, 8192, 5.0, 0.0),
             (2, 50257, 5.0, 0.0), (3, 33, 1e4, 0.0), (4, 65, 1.0, 1e3)]
    for n, vocab, scale, offset in specs:
        def build(rng, n=n, vocab=vocab, scale=scale, offset=offset):
            targets = rng.integers(0, vocab, n).astype(np.int64)
            return [_randn(rng, n, vocab, scale=scale, offset=offset), targets], {}
        tag = f"{n}x{vocab}" + (f"-scale{scale:g}" if scale != 1 else "")
        tag += f"-offset{offset:g}" if offset else ""
        cases.append(Case("cross_entropy", tag, build, _cross_entropy_bound))
    return cases


CASES: list[Case] = [
    *_linear_cases(), *_matmul_cases(), *_add_cases(), *_layernorm_cases(), *_gelu_cases(),
    *_softmax_cases(), *_attention_cases(), *_embedding_cases(), *_slice_cases(),
    *_cross_entropy_cases(),
]
