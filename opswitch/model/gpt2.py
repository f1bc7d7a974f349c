"""The GPT-2 forward pass, written against the op table only.

Like picoGPT, each function is one screen at most, carries its shapes, and
takes weights as dicts named like the checkpoint (``c_attn``, ``ln_1``...).
``ops`` is the backend's resolved op table and every array here is the
backend's own, so the same code runs on numpy, BLAS, OpenCL or a plugin.

One forward advances a *ragged batch*: any number of sequences, each with
its own new tokens (a prompt, or one token) and its own KV cache.  A
``core.step.Step`` describes it (each sequence's start, count and rows,
validated once); the row-wise ops see all rows at once and attention gets
each layer's ``LayerStep``.  One sequence is simply the batch of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from opswitch.core import formats
from opswitch.core.backend import Backend
from opswitch.core.errors import BackendError, ModelInputError, OpswitchError
from opswitch.core.optable import OpTable, failing_op
from opswitch.core.registry import get_registry
from opswitch.core.step import Step
from opswitch.model.config import GPT2Config
from opswitch.model.kvcache import CachePool, KVCache, new_cache
from opswitch.model.weights import release_pages


def linear(ops, x, weight, bias):  # [n_rows, n_in] -> [n_rows, n_out]
    return ops.linear(x, weight, bias)


def layernorm(ops, x, weight, bias, eps):  # [n_rows, n_embd] -> [n_rows, n_embd]
    return ops.layernorm(x, weight, bias, eps)


def ffn(ops, x, c_fc, c_proj):  # [n_rows, n_embd] -> [n_rows, n_embd]
    return linear(ops, ops.gelu(linear(ops, x, **c_fc)), **c_proj)


def mha(ops, x, c_attn, c_proj, n_head, step):  # [n_rows, n_embd] -> [n_rows, n_embd]
    return linear(ops, ops.attention_batch(linear(ops, x, **c_attn), n_head, step), **c_proj)


def transformer_block(ops, x, mlp, attn, ln_1, ln_2, n_head, eps, step):
    # [n_rows, n_embd] -> [n_rows, n_embd]; step: this layer's caches of the step's sequences
    x = ops.add(x, mha(ops, layernorm(ops, x, **ln_1, eps=eps), **attn, n_head=n_head, step=step))
    return ops.add(x, ffn(ops, layernorm(ops, x, **ln_2, eps=eps), **mlp))


def gpt2(ops, ids, wte, wpe, h, ln_f, n_head, eps, step, kv, lm_head=None):
    # int [n_rows] (the step's new tokens, in order) -> logits [len(step.logit_rows) or n_rows, n_vocab]
    layers = step.layers(kv)  # kv[sequence][layer]: each cache's (k, v) buffers
    x = ops.add(ops.embedding(wte, ids), ops.embedding(wpe, step.positions()))
    for block, layer in zip(h, layers):
        x = transformer_block(ops, x, **block, n_head=n_head, eps=eps, step=layer)
    x = layernorm(ops, x, **ln_f, eps=eps)
    if step.logit_rows is not None:
        x = ops.take_rows(x, step.logit_rows)
    return ops.matmul(x, wte if lm_head is None else lm_head, transpose_b=True)


def weight_role(path: str) -> str:
    """The role of a checkpoint weight (``h.3.attn.c_attn.weight`` -> ``linear``)."""
    if path == "wte":
        return "embedding"  # also the tied lm_head
    if path == "lm_head":
        return "lm_head"
    if path.endswith(".weight") and (".attn." in path or ".mlp." in path):
        return "linear"
    return "vector"  # biases, layernorm gains, position embeddings: always float32


def _upload(backend: Backend, params: Any, fmt: str | None, path: str = "", kept: dict | None = None) -> Any:
    """Every weight to ``backend`` once, in ``fmt`` where the backend keeps it natively,
    else as the float32 values the format stands for (so all backends agree).
    ``fmt=None`` keeps each weight as the host params hold it (arrays as f32).
    ``kept`` counts the matrices per format they were stored in (a block format
    leaves the matrices it cannot hold in another)."""
    if isinstance(params, dict):
        return {k: _upload(backend, v, fmt, f"{path}.{k}".lstrip("."), kept) for k, v in params.items()}
    if isinstance(params, list):
        return [_upload(backend, v, fmt, f"{path}.{i}", kept) for i, v in enumerate(params)]
    if isinstance(params, formats.Stored):  # kept as the file stores it (a GGUF's f16, q8_0...)
        if fmt is None or fmt == params.fmt:
            stored = params
        else:  # --weights says otherwise: re-encoded from the values it stands for
            stored = formats.encode(formats.decode(params), fmt, params.role)
    else:
        stored = formats.encode(params, fmt or "f32", weight_role(path))
    if kept is not None and stored.role in formats.MATRIX_ROLES:
        kept[stored.fmt] = kept.get(stored.fmt, 0) + 1
    if stored.fmt != "f32" and stored.fmt not in backend.weight_formats:
        stored = formats.Stored("f32", stored.role, formats.decode(stored))
    uploaded = backend.upload_weight(stored)
    if stored.fmt != "f32" and stored is not params:  # re-encoded: the source's file pages are not needed
        release_pages(params.data if isinstance(params, formats.Stored) else params)
    return uploaded


def check_kv_support(backend: Backend, fmt: str) -> None:
    """Refuse, in one line, a KV-cache format the backend's attention does not read."""
    if fmt not in backend.kv_formats:
        raise BackendError(
            f"backend {backend.spec!r} keeps its KV cache in {', '.join(backend.kv_formats)} only, not {fmt}:"
            f" use --kv-cache f32, or a backend that reads {fmt} caches (cpu, blas, naive)"
        )


def as_ids(ids: Any, n_vocab: int, what: str = "token ids") -> np.ndarray:
    """``ids`` as int64 [n], checked: integers (Python or numpy), each in 0..n_vocab-1."""
    array = np.asarray(ids)
    if array.size == 0 and array.ndim == 1:
        return np.zeros(0, dtype=np.int64)
    if array.dtype == object or array.dtype.kind not in "iu" or array.ndim > 1:
        if array.ndim == 0 and array.dtype.kind in "iu":
            array = array.reshape(1)
        else:
            raise ModelInputError(
                f"{what} must be a sequence of integers, got {_describe(ids)}"
            )
    array = array.reshape(-1).astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= n_vocab):
        bad = int(array[(array < 0) | (array >= n_vocab)][0])
        raise ModelInputError(
            f"token id {bad} is outside the model's vocabulary (0..{n_vocab - 1}):"
            " is the tokenizer the model's own?"
        )
    return array


def _describe(x: Any) -> str:
    if isinstance(x, (list, tuple)) and x:
        return f"a {type(x).__name__} holding {type(x[0]).__name__} ({x[0]!r})"
    return f"{type(x).__name__} {x!r}"[:120]


class GPT2:
    """GPT-2 weights bound to a backend: uploaded once, ops resolved once.

    The host weights are kept (memory-mapped where the file allows), so
    ``bind()`` moves the model to another backend without re-reading files.
    Selection (which backend, and why) is the registry's business: this
    class is given a backend instance.
    """

    def __init__(self, config: GPT2Config, params: dict, backend: Backend,
                 weights: str | None = "f32", kv_cache: str = "f32") -> None:
        self.config = config
        self.host_params = params
        # None: as the host params hold each weight (a GGUF's own types); else re-encoded
        self.weights = None if weights is None else formats.check_format(weights)
        self.kv_cache = formats.check_kv_format(kv_cache)
        self.bind(backend)

    def bind(self, backend: Backend) -> GPT2:
        """Upload the weights to ``backend`` and resolve its op table."""
        check_kv_support(backend, self.kv_cache)
        ops: OpTable = get_registry().bind(backend)
        kept: dict[str, int] = {}
        with backend.lock:
            params = _upload(backend, self.host_params, self.weights, kept=kept)
        self.params, self.backend, self.ops = params, backend, ops
        self.stored_formats = kept  # matrices per storage format, e.g. {"q8_0": 48, "int8": 1}
        # a one-position cache in the model's format, at once: a backend may load that format's
        # attention kernels on its first allocation (cpu), so the first prompt does not
        self.new_cache(1)
        return self

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """Ops this backend lacks, computed by the host reference instead."""
        return self.ops.fallbacks

    # -- caches ------------------------------------------------------------
    def new_cache(self, n_tokens: int | None = None) -> KVCache:
        """A cache for one sequence of up to ``n_tokens`` (default: the whole context)."""
        c = self.config
        capacity = c.n_positions if n_tokens is None else min(max(int(n_tokens), 1), c.n_positions)
        return new_cache(self.backend, c.n_layer, c.n_head, c.head_dim, capacity, self.kv_cache)

    def cache_pool(self, budget_bytes: int) -> CachePool:
        """Caches for many sequences within ``budget_bytes`` of backend memory."""
        c = self.config
        return CachePool(self.backend, c.n_layer, c.n_head, c.head_dim, c.n_positions, budget_bytes,
                         self.kv_cache)

    # -- forward -----------------------------------------------------------
    def step(self, batch: Sequence[tuple[Any, KVCache]], all_rows: bool = False) -> np.ndarray:
        """Advance each ``(new_ids, cache)`` of ``batch`` by its new tokens.

        Returns float32 host logits: each sequence's last position
        (``[len(batch), n_vocab]``), or every new position in order with
        ``all_rows``.  Each cache's length grows by its number of new ids.
        """
        if not batch:
            raise ModelInputError("a forward step needs at least one sequence")
        ids, caches = [], []
        for new_ids, cache in batch:
            new = as_ids(new_ids, self.config.vocab_size)
            if new.size == 0:
                raise ModelInputError("no input tokens: a sequence in the step has none")
            if cache.length + new.size > cache.capacity:
                raise ModelInputError(
                    f"{cache.length + new.size} positions exceed the cache's capacity of {cache.capacity}"
                    f" (the model's context is {self.config.n_positions})"
                )
            ids.append(new)
            caches.append(cache)
        starts, counts = tuple(c.length for c in caches), tuple(int(i.size) for i in ids)
        capacities = tuple(c.capacity for c in caches)
        step = Step(starts, counts, capacities) if all_rows else Step.last_rows(starts, counts, capacities)
        tokens = np.concatenate(ids)
        logits = self._on_backend(lambda: self.backend.to_host(self._logits(tokens, step, caches)))
        for cache, count in zip(caches, step.counts):
            cache.length += count
        return np.asarray(logits, dtype=np.float32)

    def _on_backend(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` (op calls) under the backend's lock if its ops are not thread-safe,
        and report a backend's bug as the backend's, naming the op."""
        try:
            if self.backend.thread_safe:
                return work()
            with self.backend.lock:
                return work()
        except OpswitchError:
            raise
        except Exception as exc:
            op = failing_op(exc)
            where = f"in op {op!r}" if op else "while computing"
            raise BackendError(
                f"backend {self.backend.spec!r} failed {where}: {type(exc).__name__}: {exc}"
            ) from exc

    def _logits(self, ids: np.ndarray, step: Step, caches: Sequence[KVCache]) -> Any:
        """The forward pass, between the backend's ``begin_step`` and ``end_step``;
        the logits stay on the backend."""
        c = self.config
        self.backend.begin_step(step)
        try:
            return gpt2(self.ops, ids, **self.params, n_head=c.n_head, eps=c.layer_norm_epsilon, step=step,
                        kv=[cache.layers for cache in caches])  # fmt: skip
        finally:
            self.backend.end_step()

    def nll(self, ids: Any, first: int = 1) -> float:
        """Summed next-token loss (nats) of ``ids[first:]``, each given the ids before it.

        The logits stay on the backend; its ``cross_entropy`` sends back one
        number, not ``[n, n_vocab]`` floats.
        """
        ids = self._checked(ids)
        if not 1 <= first < ids.size:
            raise ModelInputError(f"nothing to score: first={first} of {ids.size} tokens (1 <= first < n)")
        n = int(ids.size)
        cache = self.new_cache(n)

        def work() -> Any:
            logits = self._logits(ids, Step((0,), (n,), (cache.capacity,)), [cache])
            rows = self.ops.slice_rows(logits, first - 1, n - 1)
            return self.backend.to_host(self.ops.cross_entropy(rows, ids[first:]))

        return float(np.asarray(self._on_backend(work), dtype=np.float64).reshape(-1)[0])

    def _checked(self, ids: Any) -> np.ndarray:
        ids = as_ids(ids, self.config.vocab_size)
        if ids.size == 0:
            raise ModelInputError("no input tokens: give at least one token id")
        if ids.size > self.config.n_positions:
            raise ModelInputError(
                f"{ids.size} tokens exceed the model's context of {self.config.n_positions} positions"
            )
        return ids

    def forward(self, ids: Any) -> np.ndarray:
        """Logits for every position of ``ids``: float32 ``[n, n_vocab]`` on the host."""
        ids = self._checked(ids)
        return self.step([(ids, self.new_cache(ids.size))], all_rows=True)

    def next_logits(self, ids: Any, cache: KVCache) -> np.ndarray:
        """Logits after the last of ``ids`` ([n_vocab], host), extending ``cache``."""
        return self.step([(ids, cache)])[0]
