"""The public Python API: load a model by path or name, run it, generate.

    >>> import opswitch
    >>> lm = opswitch.load_model("path/to/gpt2", backend="blas")
    >>> lm.generate("The meaning of life is", max_new_tokens=20, temperature=0)
    >>> for piece in lm.stream("Once upon a time", seed=1):
    ...     print(piece, end="", flush=True)

``load_model`` is the one way to get a model: the CLI, the REPL, the server
and batch jobs all call it, so every check lives here once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opswitch.core.backend import ENV_THREADS, Backend
from opswitch.core.errors import (
    GenerationError,
    ModelInputError,
    OpswitchError,
    TextTooLongError,
    TokenizerError,
)
from opswitch.core.registry import get_registry
from opswitch.generation import (
    DEFAULT_PREFILL_CHUNK,
    Engine,
    GenerationConfig,
    GenerationResult,
    run_batch,
    run_stream,
)
from opswitch.generation.loop import context_message
from opswitch.model.config import GPT2Config
from opswitch.model.gpt2 import GPT2, as_ids, check_kv_support
from opswitch.model.hub import resolve_model
from opswitch.model.kvcache import sequence_positions
from opswitch.model.weights import load_gpt2
from opswitch.tokenizer import Tokenizer, has_tokenizer_files, load_tokenizer

# the variable a backend reads for its thread count when it starts its pools (before the first
# model loads in a process): re-exported for the layers above, which import only this module
THREADS_VARIABLE = ENV_THREADS


class LanguageModel:
    """A GPT-2 on a backend, with its tokenizer: text in, text out.

    Safe to share between threads for generation; ``to()`` refuses while
    generations are running rather than pulling weights from under them.
    """

    def __init__(self, model: GPT2, tokenizer: Tokenizer | None = None, source: str = "",
                 selection_reason: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.selection_reason = selection_reason or f"{model.backend.spec}: given"
        self.notes: list[str] = []  # things the user should know once (e.g. a padded vocabulary)
        self.load_seconds = 0.0
        self._active = 0
        self._lock = threading.Lock()
        self.n_vocab_allowed = self._check_tokenizer()
        # gaps in the tokenizer's id table: ids with no text are never sampled (like a padded tail)
        self.unused_ids: tuple[int, ...] = tuple(getattr(tokenizer, "unused_ids", ()))

    def _check_tokenizer(self) -> int | None:
        """The tokenizer must fit the model; a larger (padded) model vocabulary is masked."""
        if self.tokenizer is None:
            return None
        n_tok, n_model = self.tokenizer.vocab_size, self.config.vocab_size
        if n_tok > n_model:
            raise TokenizerError(
                f"the tokenizer has {n_tok} tokens but the model only {n_model}:"
                " pass the model's own tokenizer (tokenizer=PATH, --tokenizer PATH)"
            )
        if n_tok < n_model:
            self.notes.append(
                f"the model's vocabulary ({n_model}) is larger than its tokenizer's ({n_tok}):"
                f" ids {n_tok}..{n_model - 1} have no text and are never sampled"
            )
            return n_tok
        return None

    @property
    def config(self) -> GPT2Config:
        return self.model.config

    @property
    def backend(self) -> Backend:
        return self.model.backend

    @property
    def fallbacks(self) -> tuple[str, ...]:
        return self.model.fallbacks

    def to(self, backend: str | Backend | None, dtype: str = "float32") -> LanguageModel:
        """Rebind the loaded weights to another backend (files are not re-read)."""
        chosen, reason = _select(backend, dtype)
        with self._lock:
            if self._active:
                raise OpswitchError(
                    f"cannot move the model while {self._active} generation(s) are running on it;"
                    " wait for them to finish"
                )
            self._active = -1  # moving: generations wait for nothing, they are refused
        try:
            self.model.bind(chosen)
            self.selection_reason = reason
        finally:
            with self._lock:
                self._active = 0
        return self

    # -- text ----------------------------------------------------------------
    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerError(
                f"{self.source or 'this model'} has no tokenizer files: pass tokenizer=PATH to load_model"
            )
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes text (str), got {type(text).__name__}")
        return self.require_tokenizer().encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.require_tokenizer().decode([int(i) for i in as_ids(ids, self.config.vocab_size)])

    def encode_prompt(self, text: str) -> list[int]:
        """``encode`` for text that must fit the context: a text too long for it is
        refused after encoding about a context's worth of it, in bounded memory."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes text (str), got {type(text).__name__}")
        n_ctx = self.config.n_positions
        try:
            return self.require_tokenizer().encode(text, max_tokens=n_ctx)
        except TextTooLongError:
            raise GenerationError(context_message(f"more than {n_ctx}", n_ctx)) from None

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.encode_prompt(prompt)
        return [int(t) for t in as_ids(prompt, self.config.vocab_size)]

    # -- scoring ---------------------------------------------------------------
    def forward(self, prompt: str | Sequence[int]) -> np.ndarray:
        """Logits for every position: float32 ``[n_seq, n_vocab]``."""
        with self._using():
            return self.model.forward(self._ids(prompt))

    def loss(self, text: str | Sequence[int]) -> float:
        """Mean next-token cross-entropy (nats/token) of ``text`` under the model, as
        HF's ``model(ids, labels=ids).loss``; ``exp(loss)`` is the perplexity.  The text
        must fit the context (``opswitch eval`` slides a window over longer ones)."""
        ids = self._ids(text)
        if len(ids) < 2:
            raise ModelInputError("the loss needs at least two tokens")
        with self._using():
            return self.model.nll(ids, 1) / (len(ids) - 1)

    def perplexity(self, text: str | Sequence[int]) -> float:
        return float(np.exp(self.loss(text)))

    # -- generation ------------------------------------------------------------
    def engine(
        self, cache_bytes: int | None = None, *, max_batch: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefix_cache: bool = True,
    ) -> Engine:
        """The generation engine over this model: what ``generate_batch``, the server and batch
        jobs run on.  ``cache_bytes`` bounds the KV caches (unbounded without it)."""
        pool = self.model.cache_pool(cache_bytes) if cache_bytes is not None else None
        return Engine(self.model, pool, tokenizer=self.tokenizer, max_batch=max_batch,
                      prefill_chunk=prefill_chunk, prefix_cache=prefix_cache,
                      n_vocab_allowed=self.n_vocab_allowed, unused_ids=self.unused_ids)

    def kv_cache_bytes(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """The KV-cache memory one request takes from a pool (its prompt and new tokens)."""
        n = sequence_positions(prompt_tokens, max_new_tokens, self.config.n_positions)
        return self.model.cache_pool(0).bytes_for(n)

    def using(self) -> _Using:
        """Hold while generating on an engine of this model: ``to()`` waits for nobody, it refuses."""
        return _Using(self)

    def generate_ids(self, prompt: str | Sequence[int], **settings: Any) -> GenerationResult:
        """Generate and return the ids with the stop reason, the text and timings."""
        config = self.settings(**settings)
        ids = self._ids(prompt)
        result = GenerationResult(list(ids))
        with self._using():
            for _ in run_stream(self.engine(), ids, config, result):
                pass
        return result

    def generate(self, prompt: str | Sequence[int], **settings: Any) -> str:
        """The generated continuation (without the prompt) as text."""
        return "".join(self.stream(prompt, **settings))

    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        settings: Sequence[dict] | dict | None = None,
        cache_bytes: int | None = None,
        *,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefix_cache: bool = True,
        **common: Any,
    ) -> list[GenerationResult]:
        """Generate for several prompts in one batched loop: the same ids as one by one.

        ``settings`` is one dict per prompt (or one for all), merged over ``common``.
        With ``cache_bytes``, the KV caches of the running prompts stay within that
        budget (the rest wait their turn), so a large batch cannot take unbounded memory.
        ``prefill_chunk`` and ``prefix_cache`` are the engine's (see ``engine``)."""
        if isinstance(settings, dict) or settings is None:
            settings = [settings or {}] * len(prompts)
        if len(settings) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(settings)} settings")
        configs = [self.settings(**{**common, **s}) for s in settings]
        ids = [self._ids(p) for p in prompts]
        with self._using():
            engine = self.engine(cache_bytes, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache)
            return run_batch(engine, ids, configs)

    def stream(
        self, prompt: str | Sequence[int], result: GenerationResult | None = None, **settings: Any
    ) -> Iterator[str]:
        """Yield text as tokens are generated (a character split across tokens is held
        back until complete, and so is text that may begin a stop string).  Pass
        ``result`` to read timings after."""
        config = self.settings(**settings)
        ids = self._ids(prompt)
        self.require_tokenizer()
        with self._using():
            for out in run_stream(self.engine(), ids, config, result):
                if out.text:
                    yield out.text

    @staticmethod
    def settings(config: GenerationConfig | None = None, **changes: Any) -> GenerationConfig:
        """A validated GenerationConfig: ``config`` (or the defaults) with ``changes``."""
        base = config or GenerationConfig()
        if config is not None and not isinstance(config, GenerationConfig):
            raise GenerationError(f"config must be a GenerationConfig, got {type(config).__name__}")
        unknown = sorted(set(changes) - set(GenerationConfig.__dataclass_fields__))
        if unknown:
            raise GenerationError(
                f"unknown generation setting {unknown[0]!r}; settings are:"
                f" {', '.join(GenerationConfig.__dataclass_fields__)}"
            )
        return base.replace(**changes) if changes else base

    def _using(self) -> _Using:
        return _Using(self)


class _Using:
    """Counts a running generation, so ``to()`` can refuse to move the weights meanwhile."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm

    def __enter__(self) -> None:
        with self.lm._lock:
            if self.lm._active < 0:
                raise OpswitchError("the model is being moved to another backend; try again when it is done")
            self.lm._active += 1

    def __exit__(self, *exc: object) -> None:
        with self.lm._lock:
            self.lm._active -= 1


def _select(backend: str | Backend | None, dtype: str) -> tuple[Backend, str]:
    """The backend to bind (selection happens here, in the registry) and why."""
    if isinstance(backend, Backend):
        return backend, f"{backend.spec}: given"
    if backend is not None and not isinstance(backend, str):
        raise OpswitchError(
            f"backend must be a name such as 'blas' or 'opencl:1', a comma list, 'auto' or a Backend,"
            f" got {type(backend).__name__} {backend!r}"
        )
    if not isinstance(dtype, str):
        raise OpswitchError(f"dtype must be a string such as 'float32', got {dtype!r}")
    selection = get_registry().select(backend, dtype)
    return selection.backend, selection.reason


def load_model(
    path_or_id: str | Path | None = None,
    backend: str | Backend | None = None,
    *,
    tokenizer: str | Path | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    weights: str | None = None,
    kv_cache: str = "f32",
) -> LanguageModel:
    """Load a GPT-2 from a directory or a Hugging Face hub id (cache first).

    ``None`` loads the small demo model shipped with opswitch.  ``backend`` is
    a spec ``name[:device][:dtype]``, a comma list or ``auto`` (default:
    $OPSWITCH_BACKEND or auto).  ``weights`` is the storage format of the
    matrices on the backend (``f32``, ``f16``, ``bf16``, ``int8``...), apart
    from ``dtype``, the precision the backend computes in; ``None`` keeps the
    file's own (float32 for safetensors and ONNX, each tensor's type for GGUF).
    A ``.gguf`` file brings its own tokenizer.  ``kv_cache`` is the KV cache's
    format: ``f32``, or ``f16`` (half the bytes decode reads; cpu, blas and
    naive backends).
    """
    started = time.perf_counter()
    from opswitch.core.formats import check_format, check_kv_format

    if weights is not None:
        check_format(weights)
    check_kv_format(kv_cache)
    chosen, reason = _select(backend, dtype)  # fail fast, before reading weights
    check_kv_support(chosen, kv_cache)
    notes: list[str] = []
    if _is_onnx(path_or_id):
        source, config, params, tok = _read_onnx(Path(path_or_id), tokenizer, revision)  # type: ignore[arg-type]
    elif _is_gguf(path_or_id):
        source, config, params, tok, notes = _read_gguf(Path(str(path_or_id)), tokenizer, revision)
    else:
        directory = resolve_model(path_or_id, revision=revision)
        config, params = load_gpt2(directory)
        tok = load_tokenizer(tokenizer or directory) if tokenizer or has_tokenizer_files(directory) else None
        source = str(directory)
    lm = LanguageModel(GPT2(config, params, chosen, weights, kv_cache), tok, source, reason)
    lm.notes[:0] = notes
    lm.load_seconds = time.perf_counter() - started
    return lm


def _is_onnx(path_or_id) -> bool:
    from opswitch.onnx import is_onnx_path

    return is_onnx_path(path_or_id)


def _read_onnx(path: Path, tokenizer, revision):
    """An ONNX GPT-2's (source, config, params, tokenizer) (see ``opswitch.onnx.importer``);
    it carries no tokenizer, so text needs ``tokenizer=``."""
    from opswitch.core.errors import ModelNotFoundError
    from opswitch.onnx.importer import load_onnx

    if revision:
        raise ModelNotFoundError(f"{path} is a local file, which has no revisions: drop --revision")
    config, params = load_onnx(path.expanduser())
    tok = load_tokenizer(tokenizer) if tokenizer else None
    return str(path), config, params, tok


def _is_gguf(path_or_id) -> bool:
    return isinstance(path_or_id, (str, Path)) and str(path_or_id).lower().endswith(".gguf")


def _read_gguf(path: Path, tokenizer, revision):
    """A GGUF's (source, config, params, tokenizer, notes) (see ``opswitch.model.gguf_load``).

    Its own tokenizer is used unless ``tokenizer=`` names one; a tokenizer of
    another kind than GPT-2's BPE leaves the model without one (token ids work),
    said in a note."""
    from opswitch.core.errors import ModelNotFoundError
    from opswitch.model.gguf_load import load_gguf
    from opswitch.tokenizer.ggml_vocab import from_ggml_vocab

    if revision:
        raise ModelNotFoundError(f"{path} is a local file, which has no revisions: drop --revision")
    path = path.expanduser()
    model = load_gguf(path)
    notes = list(model.notes)
    tok = None
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    elif "tokenizer.ggml.model" in model.vocab:
        try:
            tok = from_ggml_vocab(model.vocab, str(path))
        except TokenizerError as e:
            notes.append(f"no tokenizer: {e}")
    return str(path), model.config, model.params, tok, notes
