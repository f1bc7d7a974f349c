"""The GPT-2 forward pass, written against the op table only.

Like picoGPT, each function is one screen at most, carries its shapes, and
takes weights as dicts named like the checkpoint (``c_attn``, ``ln_1``...).
``ops`` is the backend's resolved op table and every array here is the
backend's own, so the same code runs on numpy, BLAS, OpenCL or a plugin.

One forward advances a *ragged batch*: any number of sequences, each with
its own new tokens (a prompt, or one token) and its own KV cache.  The
row-wise ops see all rows at once; attention runs per sequence over its
cache.  One sequence is simply the batch of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from opswitch.core import formats
from opswitch.core.backend import Backend
from opswitch.core.errors import BackendError, ModelInputError, OpswitchError
from opswitch.core.registry import OpTable, failing_op, get_registry
from opswitch.model.config import GPT2Config
from opswitch.model.kvcache import CachePool, KVCache, new_cache
from opswitch.model.weights import release_pages


def linear(ops, x, p):  # [n_rows, n_in] -> [n_rows, n_out]
    return ops.linear(x, p["weight"], p["bias"])


def layernorm(ops, x, p, eps):  # [n_rows, n_embd] -> [n_rows, n_embd]
    return ops.layernorm(x, p["weight"], p["bias"], eps)


def mlp(ops, x, c_fc, c_proj):  # [n_rows, n_embd] -> [n_rows, n_embd]
    return linear(ops, ops.gelu(linear(ops, x, c_fc)), c_proj)


def mha(ops, x, c_attn, c_proj, *, n_head, kv, starts, counts):  # [n_rows, n_embd] -> [n_rows, n_embd]
    return linear(ops, ops.attention_batch(linear(ops, x, c_attn), n_head, kv, starts, counts), c_proj)


def transformer_block(ops, x, ln_1, attn, ln_2, mlp_, *, n_head, eps, kv, starts, counts):
    # [n_rows, n_embd] -> [n_rows, n_embd]; kv: this layer's (k, v) cache of each sequence
    x = ops.add(x, mha(ops, layernorm(ops, x, ln_1, eps), **attn, n_head=n_head, kv=kv, starts=starts,
                       counts=counts))
    return ops.add(x, mlp(ops, layernorm(ops, x, ln_2, eps), **mlp_))


def gpt2(ops, params, ids, positions, caches, starts, counts, *, n_head, eps, rows=None):
    # int [n_rows] (all sequences' new tokens, in order) -> logits [n_rows or len(rows), n_vocab]
    x = ops.add(ops.embedding(params["wte"], ids), ops.embedding(params["wpe"], positions))
    for layer, block in enumerate(params["h"]):
        kv = [cache.layers[layer] for cache in caches]
        x = transformer_block(ops, x, block["ln_1"], block["attn"], block["ln_2"], block["mlp"],
                              n_head=n_head, eps=eps, kv=kv, starts=starts, counts=counts)
    x = layernorm(ops, x, params["ln_f"], eps)
    if rows is not None:
        x = ops.take_rows(x, rows)
    return ops.matmul(x, params.get("lm_head", params["wte"]), transpose_b=True)


def weight_role(path: str) -> str:
    """The role of a checkpoint weight (``h.3.attn.c_attn.weight`` -> ``linear``)."""
    if path == "wte":
        return "embedding"  # also the tied lm_head
    if path == "lm_head":
        return "lm_head"
    if path.endswith(".weight") and (".attn." in path or ".mlp." in path):
        return "linear"
    return "vector"  # biases, layernorm gains, position embeddings: always float32


def _upload(backend: Backend, params: Any, fmt: str, path: str = "") -> Any:
    """Every weight to ``backend`` once, in ``fmt`` where the backend keeps it natively,
    else as the float32 values the format stands for (so all backends agree)."""
    if isinstance(params, dict):
        return {k: _upload(backend, v, fmt, f"{path}.{k}".lstrip(".")) for k, v in params.items()}
    if isinstance(params, list):
        return [_upload(backend, v, fmt, f"{path}.{i}") for i, v in enumerate(params)]
    stored = formats.encode(params, fmt, weight_role(path))
    if stored.fmt != "f32" and stored.fmt not in backend.weight_formats:
        stored = formats.Stored("f32", stored.role, formats.decode(stored))
    uploaded = backend.upload_weight(stored)
    if stored.fmt != "f32":  # the f32 file's pages of this tensor are no longer needed
        release_pages(params)
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

    def __init__(
        self, config: GPT2Config, params: dict, backend: Backend, weights: str = "f32", kv_cache: str = "f32"
    ) -> None:
        self.config = config
        self.host_params = params
        self.weights = formats.check_format(weights)
        self.kv_cache = formats.check_kv_format(kv_cache)
        self.bind(backend)

    def bind(self, backend: Backend) -> GPT2:
        """Upload the weights to ``backend`` and resolve its op table."""
        check_kv_support(backend, self.kv_cache)
        ops: OpTable = get_registry().bind(backend)
        with backend.lock:
            params = _upload(backend, self.host_params, self.weights)
        self.params, self.backend, self.ops = params, backend, ops
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
        ids, positions, caches, starts, counts = [], [], [], [], []
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
            positions.append(np.arange(cache.length, cache.length + new.size))
            caches.append(cache)
            starts.append(cache.length)
            counts.append(int(new.size))
        if len({id(c) for c in caches}) < len(caches):
            raise ModelInputError("one cache appears twice in a step: each sequence needs its own")
        rows = None if all_rows else list(np.cumsum(counts) - 1)
        logits = self._on_backend(lambda: self.backend.to_host(
            self._logits(ids, positions, caches, starts, counts, rows)))
        for cache, count in zip(caches, counts):
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

    def _logits(self, ids, positions, caches, starts, counts, rows) -> Any:
        """The forward pass; logits stay on the backend."""
        c = self.config
        return gpt2(
            self.ops, self.params, np.concatenate(ids), np.concatenate(positions), caches, starts, counts,
            n_head=c.n_head, eps=c.layer_norm_epsilon, rows=rows,
        )  # fmt: skip

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
            logits = self._logits([ids], [np.arange(n)], [cache], [0], [n], None)
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
