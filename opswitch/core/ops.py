"""The op catalogue: every op the model may call, with its reference semantics.

Each reference is plain numpy, written to be read, and computes in the dtype
of its inputs (float64 in, float64 out), which is what makes it the yardstick
for every backend.  Shapes follow picoGPT: one sequence at a time, activations
are ``[n_seq, n_embd]``; weights use the GPT-2 checkpoint layout (``Conv1D``:
``w`` is ``[n_in, n_out]``).

A backend implements any subset of these names as methods with the same
signature; the registry falls back to the function here for the rest.
Arrays in and out of a backend's ops are the backend's own (opaque to the
model); index arrays (``ids``) and scalars always arrive as host values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_GELU_C = math.sqrt(2.0 / math.pi)  # a Python float, so float32 stays float32


def matmul(a, b, transpose_b=False):  # [m, k] @ [k, n] (or [n, k]ᵀ) -> [m, n]
    return a @ (b.T if transpose_b else b)


def linear(x, w, b=None):  # [n_seq, n_in], [n_in, n_out], [n_out] -> [n_seq, n_out]
    y = x @ w
    return y if b is None else y + b


def add(a, b):  # [...], [...] -> [...]   (residual connection)
    return a + b


def layernorm(x, g, b, eps=1e-5):  # [n_seq, n], [n], [n] -> [n_seq, n]
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(var + eps) + b


def gelu(x):  # [...] -> [...]   tanh approximation, as GPT-2 ("gelu_new")
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x**3)))


def softmax(x, causal=False):  # [..., n_q, n_k] -> [..., n_q, n_k]
    """Softmax over the last axis; ``causal`` hides keys after each query.

    With ``n_k >= n_q`` the queries are the *last* ``n_q`` positions, so
    query ``i`` sees keys ``0 .. n_k - n_q + i`` (the KV-cache case).
    """
    if causal:
        n_q, n_k = x.shape[-2:]
        hidden = np.triu(np.ones((n_q, n_k), dtype=bool), k=n_k - n_q + 1)
        x = np.where(hidden, -np.inf, x)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(qkv, n_head, past_k=None, past_v=None):
    """Causal multi-head attention over the fused GPT-2 ``c_attn`` output.

    qkv: [n_seq, 3 * n_embd]; past_k, past_v: [n_past, n_embd] or None.
    Returns (out [n_seq, n_embd], k [n_past + n_seq, n_embd], v [...]): the
    returned k/v are the cache to pass as ``past_*`` on the next call.  A
    backend may grow the cache in place beyond the visible end of ``past_*``
    (so callers must not reuse an old ``past_*`` after passing it on), but
    must never change the elements ``past_*`` shows.
    """
    n_seq, n_embd = qkv.shape[0], qkv.shape[1] // 3
    q, k, v = qkv[:, :n_embd], qkv[:, n_embd : 2 * n_embd], qkv[:, 2 * n_embd :]
    if past_k is not None:
        k, v = np.concatenate([past_k, k]), np.concatenate([past_v, v])
    d = n_embd // n_head
    heads = lambda t: t.reshape(t.shape[0], n_head, d).transpose(1, 0, 2)  # noqa: E731
    scores = heads(q) @ heads(k).transpose(0, 2, 1) / math.sqrt(d)  # [n_head, n_seq, n_kv]
    out = softmax(scores, causal=True) @ heads(v)  # [n_head, n_seq, d]
    return out.transpose(1, 0, 2).reshape(n_seq, n_embd), k, v


def embedding(table, ids):  # [n_vocab, n], int [n_seq] -> [n_seq, n]
    return table[np.asarray(ids)]


def slice_rows(x, start, stop):  # [n_seq, n] -> [stop - start, n]   (e.g. the last position)
    return x[start:stop]


def cross_entropy(logits, targets):  # [n, n_vocab], int [n] -> [1]
    """Summed next-token loss ``Σ_i -log softmax(logits[i])[targets[i]]`` (nats).

    A sum, not a mean, so windows of any length add up exactly; one number
    per call, so a backend can keep the ``[n, n_vocab]`` logits on the device.
    Stable (log-sum-exp after subtracting each row's max) and accumulated in
    float64 whatever the input dtype; returned as a 1-element array in the
    logits' dtype.
    """
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    m = x.max(axis=-1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))
    return np.array([(lse - x[np.arange(t.size), t]).sum()], dtype=np.asarray(logits).dtype)


@dataclass(frozen=True)
class OpSpec:
    """One catalogue entry: the op's name, its reference, and what it does."""

    name: str
    reference: Callable
    summary: str


CATALOGUE: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("matmul", matmul, "a @ b (optionally b transposed): the tied lm_head"),
        OpSpec("linear", linear, "x @ w + b in GPT-2 Conv1D layout"),
        OpSpec("add", add, "elementwise sum: residual connections"),
        OpSpec("layernorm", layernorm, "layer normalisation over the last axis"),
        OpSpec("gelu", gelu, "GELU, tanh approximation"),
        OpSpec("softmax", softmax, "stable softmax over the last axis, optional causal mask"),
        OpSpec("attention", attention, "causal multi-head attention with KV-cache append"),
        OpSpec("embedding", embedding, "row gather from an embedding table"),
        OpSpec("slice_rows", slice_rows, "rows start:stop of a 2-D array"),
        OpSpec("cross_entropy", cross_entropy, "summed -log softmax at the targets: the loss"),
    )
}
OP_NAMES: tuple[str, ...] = tuple(CATALOGUE)
