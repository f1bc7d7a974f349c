"""Tokenizers: GPT-2 byte-level BPE and a char-level one for tiny test models.

Use load_tokenizer(path) and program against the Tokenizer protocol; which
class comes back depends only on the files found.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from opswitch.core.errors import TokenizerError
from opswitch.tokenizer.bpe import BPETokenizer, StreamDecoder, _read_json, present
from opswitch.tokenizer.char import CharTokenizer
from opswitch.tokenizer.files import CHAR_FILE, TOKENIZER_FILES, has_tokenizer_files, tokenizer_set

__all__ = ["CHAR_FILE", "TOKENIZER_FILES", "BPETokenizer", "CharTokenizer", "StreamDecoder", "Tokenizer",
           "has_tokenizer_files", "load_tokenizer", "tokenizer_set"]


@runtime_checkable
class Tokenizer(Protocol):
    """What generation and the CLI need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> int | None: ...

    @property
    def special_tokens(self) -> dict[str, int]: ...

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], workers: int | None = None) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...

    def stream_decoder(self) -> StreamDecoder: ...

    def id_to_token(self, token_id: int) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


def load_tokenizer(path: str | os.PathLike[str]) -> BPETokenizer | CharTokenizer:
    """Load whatever tokenizer is at ``path`` (a model directory or a tokenizer file).

    Directory: vocab.json + merges.txt, else tokenizer.json, else tokenizer_char.json.
    File: a tokenizer.json, a char tokenizer JSON, or vocab.json / merges.txt with
    its partner beside it.
    """
    path = Path(path)
    if path.is_dir():
        return _load_dir(path)
    if not present(path):
        raise TokenizerError(
            f"tokenizer path {path} does not exist; pass a model directory or tokenizer file"
        )
    if path.suffix == ".txt":  # merges.txt: its vocab.json must be beside it
        return BPETokenizer.from_files(_partner(path, "vocab.json"), path)
    data = _read_json(path, "tokenizer")
    if isinstance(data, dict) and data.get("type") == "char":
        return CharTokenizer._from_data(data, path)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return BPETokenizer._from_tokenizer_data(data, path)
    if isinstance(data, dict):  # a plain token -> id mapping: GPT-2 vocab.json
        return BPETokenizer.from_files(path, _partner(path, "merges.txt"))
    raise TokenizerError(
        f"{path} is not a tokenizer file (expected tokenizer.json, vocab.json or a char "
        "tokenizer JSON object)"
    )


def _load_dir(directory: Path) -> BPETokenizer | CharTokenizer:
    """Pick the tokenizer files in a model directory, BPE first (``tokenizer_set`` decides)."""
    names = tokenizer_set(directory)
    if names == (CHAR_FILE,):
        return CharTokenizer.load(directory / CHAR_FILE)
    if names is not None:
        return BPETokenizer.from_dir(directory)
    found = sorted(p.name for p in directory.iterdir())[:8]
    raise TokenizerError(
        f"no tokenizer in {directory}: looked for vocab.json + merges.txt, tokenizer.json "
        f"and {CHAR_FILE} (found: {', '.join(found) or 'nothing'}); copy the model's "
        "tokenizer files there"
    )


def _partner(path: Path, name: str) -> Path:
    """The file that must sit beside ``path`` (vocab.json <-> merges.txt)."""
    partner = path.with_name(name)
    if not present(partner):
        raise TokenizerError(f"{path} needs {name} beside it, but {partner} does not exist")
    return partner
