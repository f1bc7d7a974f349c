"""Character-level tokenizer for tiny test models trained from scratch.

One id per character keeps test models small and their files human-readable;
it offers the same interface as BPETokenizer so the rest of opswitch does not
care which one it got.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from opswitch.core.errors import TokenizerError
from opswitch.tokenizer.bpe import StreamDecoder, _as_id, _read_json, check_max_tokens, text_too_long

CHAR_TYPE = "char"


class CharTokenizer:
    """Maps each character of a fixed alphabet to its index in that alphabet."""

    def __init__(self, chars: Sequence[str], *, source: str = "<memory>") -> None:
        """Build from the alphabet; ``source`` is only used in error messages."""
        if isinstance(chars, str) or not isinstance(chars, Sequence):
            raise TokenizerError(f"{source}: chars must be a list of characters")
        if not chars:
            raise TokenizerError(f"{source}: the character list is empty; rebuild it from a corpus")
        self._ids: dict[str, int] = {}
        for i, char in enumerate(chars):
            if not isinstance(char, str) or len(char) != 1:
                raise TokenizerError(f"{source}: chars[{i}] is {char!r}, not a single character")
            if 0xD800 <= ord(char) <= 0xDFFF:
                raise TokenizerError(
                    f"{source}: chars[{i}] is a lone surrogate {char!r}, which UTF-8 cannot store"
                )
            if char in self._ids:
                raise TokenizerError(f"{source}: character {char!r} is listed twice")
            self._ids[char] = i
        self._chars = list(chars)
        self._source = source

    @classmethod
    def from_text(cls, corpus: str) -> CharTokenizer:
        """Alphabet = the sorted distinct characters of corpus (stable across runs)."""
        return cls(sorted(set(corpus)), source="<corpus>")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CharTokenizer:
        """Read a file written by save()."""
        path = Path(path)
        return cls._from_data(_read_json(path, "char tokenizer"), path)

    @classmethod
    def _from_data(cls, data: Any, path: Path) -> CharTokenizer:
        """Build from already parsed JSON (load_tokenizer sniffs the type first)."""
        if not isinstance(data, dict) or data.get("type") != CHAR_TYPE:
            raise TokenizerError(
                f'{path} is not a char tokenizer file (expected {{"type": "char", '
                '"chars": [...]}); create one with CharTokenizer.save()'
            )
        return cls(data.get("chars"), source=str(path))  # type: ignore[arg-type]  # __init__ checks it

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``{"type": "char", "chars": [...]}`` (ASCII-escaped JSON)."""
        text = json.dumps({"type": CHAR_TYPE, "chars": self._chars})
        try:
            Path(path).write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            raise TokenizerError(f"cannot write char tokenizer to {path}: {exc.strerror}") from exc

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Return one id per character; unknown characters are an error, not dropped.

        With ``max_tokens``, a longer text is a TextTooLongError before any work.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        limit = check_max_tokens(max_tokens)
        if limit is not None and len(text) > limit:
            raise text_too_long(limit)
        try:
            return [self._ids[c] for c in text]
        except KeyError as exc:
            char = exc.args[0]
            raise TokenizerError(
                f"character {char!r} (U+{ord(char):04X}) at position {text.index(char)} is not "
                f"in the tokenizer's alphabet of {len(self._chars)} characters ({self._source})"
            ) from exc

    def encode_batch(self, texts: Sequence[str], workers: int | None = None) -> list[list[int]]:
        """Encode each text; ``workers`` is accepted for parity but this is always serial."""
        return [self.encode(t) for t in texts]

    def id_to_token(self, token_id: int) -> str:
        """Return the character of an id."""
        i = _as_id(token_id)
        if i is None or i >= len(self._chars):
            raise TokenizerError(
                f"token id {token_id!r} is out of range for this tokenizer "
                f"(vocab size {len(self._chars)}); the model and tokenizer do not match"
            )
        return self._chars[i]

    def token_to_id(self, token: str) -> int | None:
        """Return the id of a character, or None if it is not in the alphabet."""
        return self._ids.get(token)

    def token_bytes(self, token_id: int) -> bytes:
        """UTF-8 bytes of one id's character."""
        return self.id_to_token(token_id).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of ``ids``."""
        return "".join([self.id_to_token(i) for i in ids])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Return the UTF-8 bytes of the text of ``ids``."""
        return self.decode(ids).encode("utf-8")

    def stream_decoder(self) -> StreamDecoder:
        """Return a fresh incremental decoder (same interface as BPETokenizer's)."""
        return StreamDecoder(self.token_bytes)

    @property
    def vocab_size(self) -> int:
        """Number of characters in the alphabet."""
        return len(self._chars)

    @property
    def eot_id(self) -> int | None:
        """Always None: char models have no end-of-text token and stop on length."""
        return None

    @property
    def special_tokens(self) -> dict[str, int]:
        """Always empty: every id is an ordinary character."""
        return {}

    @property
    def chars(self) -> list[str]:
        """The alphabet, in id order (a copy)."""
        return list(self._chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, source={self._source!r})"
