"""The GPT-2 forward pass, written against the op table only.

Like picoGPT, each function is one screen at most, carries its shapes, and
takes weights as dicts named like the checkpoint (``c_attn``, ``ln_1``...).
``ops`` is the backend's resolved op table and every array here is the
backend's own, so the same code runs on numpy, BLAS, OpenCL or a plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from opswitch.core.backend import Backend
from opswitch.core.errors import GenerationError
from opswitch.core.registry import get_registry
from opswitch.model.config import GPT2Config


def linear(ops, x, p):  # [n_seq, n_in] -> [n_seq, n_out]
    return ops.linear(x, p["weight"], p["bias"])


def layernorm(ops, x, p, eps):  # [n_seq, n_embd] -> [n_seq, n_embd]
    return ops.layernorm(x, p["weight"], p["bias"], eps)


def mlp(ops, x, c_fc, c_proj):  # [n_seq, n_embd] -> [n_seq, n_embd]
    return linear(ops, ops.gelu(linear(ops, x, c_fc)), c_proj)


def mha(ops, x, c_attn, c_proj, n_head, past):  # [n_seq, n_embd] -> [n_seq, n_embd], (k, v)
    out, k, v = ops.attention(linear(ops, x, c_attn), n_head, *past)
    return linear(ops, out, c_proj), (k, v)


def transformer_block(ops, x, ln_1, attn, ln_2, mlp_, *, n_head, eps, past):
    # [n_seq, n_embd] -> [n_seq, n_embd], (k, v) for this layer's cache
    a, kv = mha(ops, layernorm(ops, x, ln_1, eps), **attn, n_head=n_head, past=past)
    x = ops.add(x, a)
    x = ops.add(x, mlp(ops, layernorm(ops, x, ln_2, eps), **mlp_))
    return x, kv


def gpt2(ops, params, ids, *, start, past, n_head, eps, last_only):
    # int [n_seq] -> logits [n_seq or 1, n_vocab], new per-layer (k, v)
    positions = np.arange(start, start + len(ids))
    x = ops.add(ops.embedding(params["wte"], ids), ops.embedding(params["wpe"], positions))
    new_past = []
    for block, layer_past in zip(params["h"], past):
        x, kv = transformer_block(
            ops, x, block["ln_1"], block["attn"], block["ln_2"], block["mlp"],
            n_head=n_head, eps=eps, past=layer_past,
        )
        new_past.append(kv)
    x = layernorm(ops, x, params["ln_f"], eps)
    if last_only:
        x = ops.slice_rows(x, len(ids) - 1, len(ids))
    return ops.matmul(x, params.get("lm_head", params["wte"]), transpose_b=True), new_past


@dataclass
class KVCache:
    """Per-layer keys and values (backend arrays) for the tokens seen so far."""

    n_layer: int
    layers: list[tuple[Any, Any]] = field(default_factory=list)
    length: int = 0

    def past(self) -> list[tuple[Any, Any]]:
        return self.layers or [(None, None)] * self.n_layer


def _tree_map(fn, tree):
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_tree_map(fn, v) for v in tree]
    return fn(tree)


class GPT2:
    """GPT-2 weights bound to a backend: uploaded once, ops resolved once.

    The host weights are kept (memory-mapped where the file allows), so
    ``to()`` moves the model to another backend without re-reading files.
    """

    def __init__(
        self, config: GPT2Config, params: dict, backend: str | Backend | None = None, dtype: str = "float32"
    ) -> None:
        self.config = config
        self.host_params = params
        self.selection_reason = ""
        self.to(backend, dtype)

    def to(self, backend: str | Backend | None = None, dtype: str = "float32") -> GPT2:
        """Bind to ``backend`` (a name, ``a,b,c`` list, ``auto``, or an instance)."""
        if isinstance(backend, Backend):
            chosen, self.selection_reason = backend, f"{backend.name}: given"
        else:
            selection = get_registry().select(backend, dtype)
            chosen, self.selection_reason = selection.backend, selection.reason
        ops = get_registry().bind(chosen)
        self.params = _tree_map(chosen.to_device, self.host_params)
        self.backend, self.ops = chosen, ops
        return self

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """Ops this backend lacks, computed by the host reference instead."""
        return self.ops.fallbacks

    def _check(self, ids, start: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise GenerationError("no input tokens: the prompt is empty")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.config.vocab_size)][0])
            raise GenerationError(
                f"token id {bad} is outside the model's vocabulary (0..{self.config.vocab_size - 1}):"
                " is the tokenizer the model's own?"
            )
        if start + ids.size > self.config.n_positions:
            raise GenerationError(
                f"{start + ids.size} tokens exceed the model's context of {self.config.n_positions}"
                " positions: shorten the prompt or generate fewer tokens"
            )
        return ids

    def forward(self, ids) -> np.ndarray:
        """Logits for every position of ``ids``: float32 ``[n_seq, n_vocab]`` on the host."""
        ids = self._check(ids, 0)
        logits, _ = self._run(ids, 0, KVCache(self.config.n_layer), last_only=False)
        return self.backend.to_host(logits).astype(np.float32, copy=False)

    def next_logits(self, ids, cache: KVCache | None = None) -> np.ndarray:
        """Logits after the last of ``ids`` ([n_vocab], host), extending ``cache``.

        With a cache, ``ids`` are the tokens not yet seen (the prompt, then
        one token per step); without one, the whole sequence each time.
        """
        start = cache.length if cache is not None else 0
        ids = self._check(ids, start)
        logits, new_past = self._run(ids, start, cache or KVCache(self.config.n_layer), last_only=True)
        if cache is not None:
            cache.layers, cache.length = new_past, start + ids.size
        return self.backend.to_host(logits)[0]

    def _run(self, ids, start, cache, last_only):
        return gpt2(
            self.ops, self.params, ids, start=start, past=cache.past(),
            n_head=self.config.n_head, eps=self.config.layer_norm_epsilon, last_only=last_only,
        )

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer)
