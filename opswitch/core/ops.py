"""The op catalogue: every op the model may call, with its reference semantics.

Each reference is plain numpy, written to be read, and computes in the dtype
of its inputs (float64 in, float64 out), which is what makes it the yardstick
for every backend.  Shapes follow picoGPT: activations are ``[n_rows,
n_embd]``; weights use the GPT-2 checkpoint layout (``Conv1D``: ``w`` is
``[n_in, n_out]``).

Rows may belong to several sequences (a *ragged batch*): the row-wise ops
never care, and ``attention_batch`` splits the rows as its step descriptor
says (``core.step``), each sequence attending over its own cache.  One
sequence is the batch of one.

The KV cache belongs to the caller (``core.step.CacheLayout``): per layer a
key and a value buffer of shape ``[n_head, capacity, head_dim]`` (head-major,
so one head's keys are contiguous), allocated with ``Backend.alloc``.  ``attention`` writes the new
keys and values at ``start ..`` and reads rows ``0 .. start + n_new``; no op
keeps hidden state between calls.

A backend implements any subset of these names as methods with the same
signature; the registry falls back to the function here for the rest.
Arrays in and out of a backend's ops are the backend's own (opaque to the
model); index arrays (``ids``, ``rows``) and scalars always arrive as host
values.  Ops listed in ``OpSpec.writes`` change those arguments in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from opswitch.core.step import LayerStep

Array = Any  # a backend's own array (numpy on the host backends), opaque above the core
Host = np.ndarray  # the references compute on host numpy arrays

_GELU_C = math.sqrt(2.0 / math.pi)  # a Python float, so float32 stays float32


def matmul(a: Host, b: Host, transpose_b: bool = False) -> Host:  # [m, k] @ [k, n] (or [n, k]ᵀ) -> [m, n]
    return a @ (b.T if transpose_b else b)


def linear(x: Host, w: Host, b: Host | None = None) -> Host:  # [n, in], [in, out], [out] -> [n, out]
    y = x @ w
    return y if b is None else y + b


def add(a: Host, b: Host) -> Host:  # [...], [...] -> [...]   (residual connection)
    return a + b


def layernorm(x: Host, g: Host, b: Host, eps: float = 1e-5) -> Host:  # [n_rows, n], [n], [n] -> [n_rows, n]
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(var + eps) + b


def gelu(x: Host) -> Host:  # [...] -> [...]   tanh approximation, as GPT-2 ("gelu_new")
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x**3)))


def softmax(x: Host, causal: bool = False) -> Host:  # [..., n_q, n_k] -> [..., n_q, n_k]
    """Softmax over the last axis; ``causal`` hides keys after each query.

    Not an op (the model never calls it alone; backends fuse it into
    ``attention``): the reference attention's helper, and a yardstick for tests.

    With ``n_k >= n_q`` the queries are the *last* ``n_q`` positions, so
    query ``i`` sees keys ``0 .. n_k - n_q + i`` (the KV-cache case).
    """
    if causal:
        n_q, n_k = x.shape[-2:]
        hidden = np.triu(np.ones((n_q, n_k), dtype=bool), k=n_k - n_q + 1)
        x = np.where(hidden, -np.inf, x)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(qkv: Host, n_head: int, k_cache: Host, v_cache: Host, start: int) -> Host:
    """Causal multi-head attention of one sequence over its cache.

    qkv: [n_new, 3 * n_embd], the fused ``c_attn`` output of the sequence's
    new tokens, at positions ``start .. start + n_new``.  k_cache, v_cache:
    [n_head, capacity, head_dim]; rows ``0 .. start`` hold the past.  Writes
    this call's keys and values into rows ``start .. start + n_new`` (in
    place), then returns out: [n_new, n_embd].
    """
    n_new, n_embd = qkv.shape[0], qkv.shape[1] // 3
    d = n_embd // n_head
    heads = lambda t: t.reshape(n_new, n_head, d).transpose(1, 0, 2)  # noqa: E731  [n_head, n_new, d]
    q, k, v = (heads(qkv[:, i * n_embd : (i + 1) * n_embd]) for i in range(3))
    end = start + n_new
    k_cache[:, start:end], v_cache[:, start:end] = k, v
    scores = q @ k_cache[:, :end].transpose(0, 2, 1) / math.sqrt(d)  # [n_head, n_new, end]
    out = softmax(scores, causal=True) @ v_cache[:, :end]  # [n_head, n_new, d]
    return out.transpose(1, 0, 2).reshape(n_new, n_embd)


def attention_batch(qkv: Host, n_head: int, step: LayerStep) -> Host:
    """``attention`` for a ragged batch: ``step`` (a ``core.step.LayerStep``) says
    which rows of qkv [step.n_rows, 3 * n_embd] are whose (``bounds``), where each
    sequence starts in its cache (``starts``) and this layer's ``(k_cache, v_cache)``
    of each (``caches``).  Returns out: [step.n_rows, n_embd], rows in qkv's order."""
    return np.concatenate([
        attention(qkv[a:b], n_head, k_cache, v_cache, start)
        for (a, b), (k_cache, v_cache), start in zip(step.bounds, step.caches, step.starts)
    ])  # fmt: skip


def embedding(table: Host, ids: Host) -> Host:  # [n_vocab, n], int [n_rows] -> [n_rows, n]
    return table[np.asarray(ids)]


def take_rows(x: Host, rows: Host) -> Host:  # [n_rows, n], int [k] -> [k, n]   (each sequence's last row)
    return x[np.asarray(rows)]


def slice_rows(x: Host, start: int, stop: int) -> Host:  # [n_rows, n] -> [stop - start, n]
    return x[start:stop]


def concat_rows(parts: Sequence[Host]) -> Host:  # list of [n_i, n] -> [sum n_i, n]
    return np.concatenate(parts)


def cross_entropy(logits: Host, targets: Host) -> Host:  # [n, n_vocab], int [n] -> [1]
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
    """One catalogue entry: the op's name, its reference, and what it does.

    ``writes`` names the arguments (by position) the op changes in place: a
    fallback copies them back to the device after running the reference.
    """

    name: str
    reference: Callable[..., Any]
    summary: str
    writes: tuple[int, ...] = ()


CATALOGUE: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("matmul", matmul, "a @ b (optionally b transposed): the tied lm_head"),
        OpSpec("linear", linear, "x @ w + b in GPT-2 Conv1D layout"),
        OpSpec("add", add, "elementwise sum: residual connections"),
        OpSpec("layernorm", layernorm, "layer normalisation over the last axis"),
        OpSpec("gelu", gelu, "GELU, tanh approximation"),
        OpSpec("attention", attention, "causal attention of one sequence over its caller-owned cache",
               writes=(2, 3)),
        OpSpec("attention_batch", attention_batch, "attention for a ragged batch of sequences",
               writes=(2,)),
        OpSpec("embedding", embedding, "row gather from an embedding table"),
        OpSpec("take_rows", take_rows, "gather rows by index (each sequence's last row)"),
        OpSpec("slice_rows", slice_rows, "rows start:stop of a 2-D array"),
        OpSpec("concat_rows", concat_rows, "stack 2-D arrays along rows"),
        OpSpec("cross_entropy", cross_entropy, "summed -log softmax at the targets: the loss"),
    )
}
OP_NAMES: tuple[str, ...] = tuple(CATALOGUE)


class BackendOps(Protocol):
    """Every op a backend may provide, as a method: the catalogue as a type.

    A backend implements any subset (the registry fills in the rest with the
    references above), so a Backend subclass is not declared against this;
    an ``OpTable`` (every op resolved) is what satisfies all of it.  Arrays
    are the backend's own; ``ids``, ``rows``, ``targets``, ``starts`` and
    ``counts`` arrive as host values.
    """

    def matmul(self, a: Array, b: Array, transpose_b: bool = False) -> Array: ...  # [m, k] @ [k, n] -> [m, n]
    def linear(self, x: Array, w: Array, b: Array | None = None) -> Array: ...  # [n, in] -> [n, out]
    def add(self, a: Array, b: Array) -> Array: ...  # [...], [...] -> [...]
    def layernorm(self, x: Array, g: Array, b: Array, eps: float = 1e-5) -> Array: ...  # [n, e] -> [n, e]
    def gelu(self, x: Array) -> Array: ...  # [...] -> [...]
    def attention(self, qkv: Array, n_head: int, k_cache: Array, v_cache: Array, start: int) -> Array: ...
    def attention_batch(self, qkv: Array, n_head: int, step: LayerStep) -> Array: ...  # [n, 3e] -> [n, e]
    def embedding(self, table: Array, ids: np.ndarray) -> Array: ...  # [n_vocab, e], int [n] -> [n, e]
    def take_rows(self, x: Array, rows: np.ndarray) -> Array: ...  # [n, e], int [k] -> [k, e]
    def slice_rows(self, x: Array, start: int, stop: int) -> Array: ...  # [n, e] -> [stop - start, e]
    def concat_rows(self, parts: Sequence[Array]) -> Array: ...  # list of [n_i, e] -> [sum n_i, e]
    def cross_entropy(self, logits: Array, targets: np.ndarray) -> Array: ...  # [n, n_vocab], int [n] -> [1]

