"""The public Python API: load a model by path or name, run it, generate.

    >>> import opswitch
    >>> lm = opswitch.load_model("path/to/gpt2", backend="blas")
    >>> lm.generate("The meaning of life is", max_new_tokens=20, temperature=0)
    >>> for piece in lm.stream("Once upon a time", seed=1):
    ...     print(piece, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from opswitch.core.backend import Backend
from opswitch.core.errors import TokenizerError
from opswitch.generation import GenerationConfig, GenerationResult, generate_ids, stream_ids
from opswitch.model.gpt2 import GPT2
from opswitch.model.hub import resolve_model
from opswitch.model.weights import load_gpt2
from opswitch.tokenizer import load_tokenizer


class LanguageModel:
    """A GPT-2 on a backend, with its tokenizer: text in, text out."""

    def __init__(self, model: GPT2, tokenizer=None, source: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source

    @property
    def config(self):
        return self.model.config

    @property
    def backend(self) -> Backend:
        return self.model.backend

    def to(self, backend: str | Backend | None, dtype: str = "float32") -> LanguageModel:
        """Rebind the loaded weights to another backend (files are not re-read)."""
        self.model.to(backend, dtype)
        return self

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise TokenizerError(
                f"{self.source or 'this model'} has no tokenizer files: pass tokenizer=PATH to load_model"
            )
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._require_tokenizer().encode(text)

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def forward(self, prompt: str | Sequence[int]) -> np.ndarray:
        """Logits for every position: float32 ``[n_seq, n_vocab]``."""
        return self.model.forward(self._ids(prompt))

    def loss(self, text: str | Sequence[int]) -> float:
        """Mean next-token cross-entropy (nats/token) of ``text`` under the model.

        Computed in float64 from the logits of one forward pass, as HF's
        ``model(ids, labels=ids).loss`` does; ``exp(loss)`` is the perplexity.
        """
        ids = self._ids(text)
        if len(ids) < 2:
            raise TokenizerError("the loss needs at least two tokens of text")
        logits = self.model.forward(ids[:-1]).astype(np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())

    def perplexity(self, text: str | Sequence[int]) -> float:
        return float(np.exp(self.loss(text)))

    def generate_ids(self, prompt: str | Sequence[int], **settings) -> GenerationResult:
        """Generate and return the ids with the stop reason and timings."""
        return generate_ids(self.model, self._ids(prompt), self._settings(settings))

    def generate(self, prompt: str | Sequence[int], **settings) -> str:
        """The generated continuation (without the prompt) as text."""
        return "".join(self.stream(prompt, **settings))

    def stream(
        self, prompt: str | Sequence[int], result: GenerationResult | None = None, **settings
    ) -> Iterator[str]:
        """Yield text as tokens are generated (a character split across tokens
        is held back until complete).  Pass ``result`` to read timings after."""
        ids = self._ids(prompt)
        config = self._settings(settings)
        result = result if result is not None else GenerationResult(ids)
        decoder = self._require_tokenizer().stream_decoder()
        for token in stream_ids(self.model, ids, config, result):
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    @staticmethod
    def _settings(settings: dict) -> GenerationConfig:
        config = settings.pop("config", None) or GenerationConfig()
        return config.replace(**settings) if settings else config


def load_model(
    path_or_id: str | Path | None = None,
    backend: str | Backend | None = None,
    *,
    tokenizer: str | Path | None = None,
    revision: str | None = None,
    dtype: str = "float32",
) -> LanguageModel:
    """Load a GPT-2 from a directory or a Hugging Face hub id (cache first).

    ``None`` loads the small demo model shipped with opswitch.  ``backend`` is
    a name, a comma list, ``auto`` (default: $OPSWITCH_BACKEND or auto).
    """
    if _is_onnx(path_or_id):
        return _load_onnx(Path(path_or_id), backend, tokenizer, revision, dtype)
    directory = resolve_model(path_or_id, revision=revision)
    config, params = load_gpt2(directory)
    tok = load_tokenizer(tokenizer or directory) if tokenizer or _has_tokenizer(directory) else None
    model = GPT2(config, params, backend, dtype)
    return LanguageModel(model, tok, str(directory))


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).exists() for name in ("vocab.json", "tokenizer.json"))


def _is_onnx(path_or_id) -> bool:
    from opswitch.onnx import is_onnx_path

    return is_onnx_path(path_or_id)


def _load_onnx(path: Path, backend, tokenizer, revision, dtype: str) -> LanguageModel:
    """An ONNX GPT-2 (see ``opswitch.onnx.importer``); it carries no tokenizer, so text
    needs ``tokenizer=``."""
    from opswitch.core.errors import ModelNotFoundError
    from opswitch.onnx.importer import load_onnx

    if revision:
        raise ModelNotFoundError(f"{path} is a local file, which has no revisions: drop --revision")
    config, params = load_onnx(path.expanduser())
    tok = load_tokenizer(tokenizer) if tokenizer else None
    return LanguageModel(GPT2(config, params, backend, dtype), tok, str(path))
