"""Conformance cases: awkward inputs for every op, and how close is close enough.

Each case builds float64 inputs from a seeded generator.  The reference runs
on those inputs *after rounding them to the backend's dtype*, so the
comparison measures the backend's arithmetic, not the rounding of its
inputs.  Tolerances are error bounds in units of the dtype's unit roundoff
``u`` (float32: 6.0e-8, float64: 1.1e-16); each states why it is enough.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from opswitch.core.step import attention_step


@dataclass(frozen=True)
class Case:
    """One op call: its inputs and the elementwise error bound it must meet."""

    op: str
    id: str
    build: Callable[[np.random.Generator], tuple[list, dict]]
    # bound(args, ref, u) -> array broadcastable to the output
    bound: Callable[[list, np.ndarray, float], np.ndarray]


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


def attention_bound(qkv: np.ndarray, n_head: int, k_cache: np.ndarray, v_cache: np.ndarray, start: int,
                    u: float) -> np.ndarray:
    """Error bound for the attention output of one sequence, per element.

    Score s_j = q·k_j/√d errs by δ ≤ (d+2)·u·Σ_c|q_c k_jc|/√d (Higham 3.5).
    A probability p_j = e^{s_j - m}/Σ errs relatively by ≤ 2·max δ plus the
    rounding of exp's argument (|s_j - m|·u) and of the normalising sum
    ((n_kv+8)·u).  The output Σ_j p_j v_j then errs by that relative error
    times Σ_j p_j|v_j|, plus its own summation error (n_kv+2)·u·Σ_j p_j|v_j|.
    So the bound scales with Σ p|v| — what the output is made of — not with
    max|v|: a 1 % error in the scale, or q/k/v rounded to float16, fail it.
    """
    n_new, n_embd = qkv.shape[0], qkv.shape[1] // 3
    d, end = n_embd // n_head, start + n_new
    heads = lambda t: t.reshape(n_new, n_head, d).transpose(1, 0, 2)  # noqa: E731
    q, k_new, v_new = (heads(qkv[:, i * n_embd : (i + 1) * n_embd]) for i in range(3))
    k = np.concatenate([k_cache[:, :start], k_new], axis=1)  # [h, end, d]
    v = np.concatenate([v_cache[:, :start], v_new], axis=1)
    scale = 1 / np.sqrt(d)
    scores = q @ k.transpose(0, 2, 1) * scale  # [h, n_new, end]
    mask = np.triu(np.ones((n_new, end), bool), k=start + 1)
    delta = (d + 2) * u * (np.abs(q) @ np.abs(k).transpose(0, 2, 1)).max(axis=-1, keepdims=True) * scale
    scores = np.where(mask, -np.inf, scores)
    top = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - top)
    p /= p.sum(axis=-1, keepdims=True)
    spread = np.minimum(np.where(mask, 0, top - scores).max(axis=-1, keepdims=True), 100)
    relative = 2 * delta + 2 * spread * u + (2 * end + 16) * u  # [h, n_new, 1]
    bound = relative * (p @ np.abs(v))  # [h, n_new, d]
    return bound.transpose(1, 0, 2).reshape(n_new, n_embd)


def _attention_case_bound(args, ref, u):
    qkv, n_head, k_cache, v_cache, start = args
    return attention_bound(qkv, n_head, k_cache, v_cache, start, u)


def _batch_bound(args, ref, u):
    qkv, n_head, step = args
    return np.concatenate([
        attention_bound(qkv[a:b], n_head, k_cache, v_cache, start, u)
        for (a, b), (k_cache, v_cache), start in zip(step.bounds, step.caches, step.starts)
    ])  # fmt: skip


def _cache(rng, n_head, capacity, d, filled):
    """A cache buffer: ``filled`` rows of random past, then zeros."""
    buf = np.zeros((n_head, capacity, d))
    buf[:, :filled] = _randn(rng, n_head, filled, d)
    return buf


# (n_new, n_head, head_dim, start, capacity slack): decode, prefill, chunked prefill
# (a prompt after a past), odd head sizes, and many keys (where a loose bound hides errors)
ATTENTION_SHAPES = [
    (1, 1, 1, 0, 0), (1, 3, 32, 0, 5), (5, 3, 32, 0, 0), (1, 3, 32, 17, 3), (7, 4, 16, 9, 0),
    (300, 2, 8, 0, 0), (1, 12, 64, 255, 0), (3, 5, 7, 63, 1), (2, 2, 8, 1, 0), (1, 2, 64, 1000, 24),
    (64, 2, 32, 700, 0), (33, 3, 16, 31, 2),
]  # fmt: skip


def _attention_cases() -> list[Case]:
    cases = []
    for n_new, n_head, d, start, slack in ATTENTION_SHAPES:
        def build(rng, n_new=n_new, n_head=n_head, d=d, start=start, slack=slack):
            capacity = start + n_new + slack
            e = n_head * d
            return [_randn(rng, n_new, 3 * e), n_head, _cache(rng, n_head, capacity, d, start),
                    _cache(rng, n_head, capacity, d, start), start], {}
        tag = f"new{n_new}-h{n_head}-d{d}" + (f"-past{start}" if start else "")
        cases.append(Case("attention", tag, build, _attention_case_bound))
    return cases


def _attention_batch_cases() -> list[Case]:
    def build(rng: np.random.Generator, n_head: int, d: int, seqs: list[tuple[int, ...]],
              ) -> tuple[list, dict[str, Any]]:
        e, rows, caches, starts, counts = n_head * d, [], [], [], []
        for n_new, start, *slack in seqs:
            capacity = start + n_new + (slack[0] if slack else 3)
            rows.append(_randn(rng, n_new, 3 * e))
            caches.append((_cache(rng, n_head, capacity, d, start), _cache(rng, n_head, capacity, d, start)))
            starts.append(start)
            counts.append(n_new)
        return [np.concatenate(rows), n_head, attention_step(caches, starts, counts)], {}

    specs: dict[str, tuple[int, int, list[tuple[int, ...]]]] = {
        "one-decode": (3, 8, [(1, 10)]),
        "decode-x4": (2, 16, [(1, 5), (1, 0), (1, 63), (1, 200)]),
        "prompts-and-decodes": (4, 8, [(6, 0), (1, 9), (5, 12), (1, 1), (17, 0)]),
        "chunked-prefill": (2, 32, [(9, 40), (1, 40)]),
        # (new rows, past, free positions after): caches filled to their last position
        "full-caches": (3, 8, [(1, 63, 0), (20, 0, 0), (1, 0, 0), (4, 11, 0), (1, 299, 1)]),
    }

    def case(tag: str, n_head: int, d: int, seqs: list[tuple[int, ...]]) -> Case:
        return Case("attention_batch", tag, lambda rng: build(rng, n_head, d, seqs), _batch_bound)

    return [case(tag, *spec) for tag, spec in specs.items()]


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


def _take_cases() -> list[Case]:
    def build(rng: np.random.Generator, shape: tuple[int, int], rows: list[int]) -> tuple[list, dict]:
        return [_randn(rng, *shape), np.array(rows, dtype=np.int64)], {}

    return [
        Case("take_rows", "last-rows", lambda rng: build(rng, (9, 33), [2, 5, 8]), _exact),
        Case("take_rows", "repeat", lambda rng: build(rng, (4, 7), [3, 3, 0]), _exact),
    ]


def _concat_cases() -> list[Case]:
    def build(rng, sizes, n):
        return [[_randn(rng, size, n) for size in sizes]], {}

    return [
        Case("concat_rows", "one", lambda rng: build(rng, [3], 5), _exact),
        Case("concat_rows", "ragged", lambda rng: build(rng, [1, 7, 2, 1], 33), _exact),
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
    the sum; the sum over V terms adds ~sqrt(V)·u (the rounding of a sum of V terms); log turns the
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
    *_attention_cases(), *_attention_batch_cases(), *_embedding_cases(),
    *_take_cases(), *_slice_cases(), *_concat_cases(),
    *_cross_entropy_cases(),
]
