"""GPT-2 byte-level BPE that gives the same ids as Hugging Face's GPT2TokenizerFast.

Written in plain Python (the standard library's ``re`` included) so that opswitch
does not need the Rust ``tokenizers`` package; tests/test_tokenizer_reference.py
checks it id-for-id against transformers.
"""

from __future__ import annotations

import codecs
import heapq
import itertools
import operator
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opswitch.core.errors import TextTooLongError, TokenizerError, shown
from opswitch.core.files import TOKENIZER_LIMIT, read_json, read_text
from opswitch.tokenizer import unicode_classes as uc
from opswitch.tokenizer.bytes_to_unicode import LATIN1_TO_VOCAB, UNICODE_TO_BYTE

#: GPT-2's pre-tokenizer: splits text into the "words" BPE runs on.  HF runs it with the
#: Oniguruma engine inside ``tokenizers``, whose Unicode tables (uc.UNICODE_VERSION) are
#: neither Python's nor the ``regex`` package's; _PRETOKENIZER is this pattern with
#: Oniguruma's own classes spelled out.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _compile_pretokenizer() -> re.Pattern[str]:
    """GPT2_PATTERN for ``re``, with \\p{L}, \\p{N} and \\s taken from unicode_classes.

    So ids do not depend on the installed Python or ``regex`` version.  ``X+`` becomes
    ``(?:[X below U+10000]+|(?=astral)[X above U+FFFF]+)+``, which matches the same:
    ``re`` tests a bitmap for BMP characters but astral ranges one by one, and this
    way only astral characters pay for the ranges (plain classes encode 25% slower).
    """

    def run(bmp: str, astral: str) -> str:
        return rf"(?:[{bmp}]+|(?=[\U00010000-\U0010ffff])[{astral}]+)+"

    letters = run(uc.LETTERS_BMP, uc.LETTERS_ASTRAL)
    numbers = run(uc.NUMBERS_BMP, uc.NUMBERS_ASTRAL)
    others = run(rf"^{uc.SPACES}{uc.LETTERS_BMP}{uc.NUMBERS_BMP}\U00010000-\U0010ffff", uc.OTHER_ASTRAL)
    spaces = f"[{uc.SPACES}]+"
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?{letters}| ?{numbers}| ?{others}|{spaces}(?![^{uc.SPACES}])|{spaces}"
    )


_PRETOKENIZER = _compile_pretokenizer()
#: Whitespace as HF means it (Unicode White_Space); str.isspace() and ``re``'s \s also
#: count \x1c-\x1f.
_SPACES = re.compile(f"[{uc.SPACES}]*")


def _spaces_end(text: str, pos: int, endpos: int | None = None) -> int:
    """Where the run of spaces starting at ``pos`` ends (``_SPACES`` matches even empty)."""
    match = _SPACES.match(text, pos, len(text) if endpos is None else endpos)
    return match.end() if match else pos
EOT_TOKEN = "<|endoftext|>"

#: Words remembered per tokenizer, and the memory they may hold: bounded in both, so
#: a long-running server cannot grow forever, however long the words it is sent.
CACHE_SIZE = 100_000
CACHE_BYTES = 32 << 20
#: A word's cost in the cache: its text and ids plus the dict entry, tuple and str headers.
_ENTRY_BYTES, _ID_BYTES = 160, 8
#: encode_batch only starts processes for batches at least this long (in characters):
#: below it, starting the pool costs more than it saves.
PARALLEL_MIN_CHARS = 1_000_000
_CHUNKS_PER_WORKER = 4
#: Token ids may leave gaps, but the largest must stay below SPREAD * (ids defined) + SLACK.
MAX_ID_SPREAD = 2
MAX_ID_SLACK = 1024
#: Words longer than this use the O(n log n) merge loop instead of the simple one.
_LONG_WORD = 64


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the raw text before BPE runs (e.g. ``<|endoftext|>``)."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


class StreamDecoder:
    """Turns ids into text one at a time without splitting a UTF-8 character.

    A single emoji is often two or three GPT-2 tokens; printing each token's
    bytes as soon as it arrives would show U+FFFD garbage, so the incomplete
    tail is held back until the following ids complete it.
    """

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is complete so far (may be '')."""
        return self._decoder.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """Return what is still held back (as U+FFFD if it never completed)."""
        return self._decoder.decode(b"", final=True)


class BPETokenizer:
    """Byte-level BPE tokenizer (GPT-2, GPT-Neo, ...): text <-> token ids."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        added_tokens: Iterable[AddedToken] = (),
        *,
        add_prefix_space: bool = False,
        use_regex: bool = True,
        ignore_merges: bool = False,
        nfc: bool = False,
        source: str = "<memory>",
    ) -> None:
        """Build from an in-memory vocab and merge list; the loaders call this.

        ``source`` is only used in error messages.
        """
        self._source = source
        self._vocab = _check_vocab(vocab, source)
        bad = _find_bad_merge(merges, self._vocab)
        if bad is not None:
            index, missing = bad
            raise TokenizerError(
                f"{source}: merge #{index + 1} {' '.join(merges[index])!r} needs token "
                f"{missing!r}, which is not in the vocabulary; use merges and vocab "
                "of the same tokenizer"
            )
        # A pair listed twice keeps its last rank, like GPT-2 and HF do.
        self._ranks = {(a, b): rank for rank, (a, b) in enumerate(merges)}
        self._added = {tok.content: tok for tok in added_tokens}
        for tok in self._added.values():
            if not tok.content or _as_id(tok.id) is None:
                raise TokenizerError(
                    f"{source}: added token {shown(tok.content)} needs non-empty content "
                    f"and an id >= 0 (got {tok.id!r}); fix the tokenizer file"
                )
        self._add_prefix_space = add_prefix_space
        self._use_regex = use_regex
        self._ignore_merges = ignore_merges
        self._nfc = nfc
        # Longest first: a token that is a prefix of another must not hide it (HF matches
        # the longest one too).
        contents = sorted(self._added, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_bytes = 0
        self._build_id_tables()

    def _build_id_tables(self) -> None:
        """Precompute id -> token and id -> bytes so decoding is a list lookup."""
        size = _table_size(self._vocab, self._added.values(), self._source)
        self._tokens: list[str | None] = [None] * size
        for token, i in self._vocab.items():
            self._tokens[i] = token
        for tok in self._added.values():
            self._tokens[tok.id] = tok.content
        self._bytes: list[bytes | None] = [None if t is None else _token_to_bytes(t) for t in self._tokens]
        self._longest = max((len(b) for b in self._bytes if b is not None), default=1)
        eot = self._added.get(EOT_TOKEN)
        self._eot_id = eot.id if eot is not None else self._vocab.get(EOT_TOKEN)

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_files(
        cls, vocab_path: str | os.PathLike[str], merges_path: str | os.PathLike[str]
    ) -> BPETokenizer:
        """Load GPT-2's ``vocab.json`` + ``merges.txt`` (``<|endoftext|>`` is special)."""
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        vocab = _check_vocab(_read_json(vocab_path, "vocab.json"), str(vocab_path))
        merges, lines = _parse_merges_txt(_read_text(merges_path, "merges.txt"), merges_path)
        bad = _find_bad_merge(merges, vocab)
        if bad is not None:
            index, missing = bad
            raise TokenizerError(
                f"{merges_path} line {lines[index]}: merge {' '.join(merges[index])!r} needs "
                f"token {missing!r}, which is not in {vocab_path}; use the vocab.json and "
                "merges.txt of the same model"
            )
        added = [AddedToken(EOT_TOKEN, vocab[EOT_TOKEN])] if EOT_TOKEN in vocab else []
        return cls(vocab, merges, added, source=str(vocab_path))

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Load a Hugging Face ``tokenizer.json`` holding a byte-level BPE model."""
        path = Path(path)
        return cls._from_tokenizer_data(_read_json(path, "tokenizer.json"), path)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Load from a model directory: vocab.json + merges.txt, else tokenizer.json."""
        directory = Path(path)
        if not directory.is_dir():
            raise TokenizerError(f"{directory} is not a directory; pass the model directory")
        vocab, merges, tok_json = (
            directory / "vocab.json",
            directory / "merges.txt",
            directory / "tokenizer.json",
        )
        if present(vocab) and present(merges):
            return cls.from_files(vocab, merges)
        if present(tok_json):
            return cls.from_tokenizer_json(tok_json)
        hint = ""
        if present(vocab) != present(merges):
            there, absent = (vocab, merges) if present(vocab) else (merges, vocab)
            hint = f" ({there.name} is there but {absent.name} is missing)"
        raise TokenizerError(
            f"no BPE tokenizer in {directory}: looked for vocab.json + merges.txt and "
            f"tokenizer.json{hint}; copy the model's tokenizer files there"
        )

    @classmethod
    def _from_tokenizer_data(cls, data: Any, path: Path) -> BPETokenizer:
        """Build from an already parsed tokenizer.json (load_tokenizer sniffs first)."""
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict):
            raise TokenizerError(
                f'{path} is not a Hugging Face tokenizer.json (no "model" object); '
                "pass a tokenizer.json or a directory with vocab.json + merges.txt"
            )
        _require_supported(data, model, path)
        vocab = _check_vocab(model.get("vocab"), str(path), "model.vocab")
        merges = _parse_json_merges(model.get("merges", []), path)
        bad = _find_bad_merge(merges, vocab)
        if bad is not None:
            index, missing = bad
            raise TokenizerError(
                f"{path}: model.merges[{index}] {' '.join(merges[index])!r} needs token "
                f"{missing!r}, which is not in model.vocab; the file is inconsistent, "
                "re-download it"
            )
        pre = data["pre_tokenizer"]
        return cls(
            vocab,
            merges,
            _parse_added_tokens(data.get("added_tokens") or [], path),
            add_prefix_space=bool(pre.get("add_prefix_space", False)),
            use_regex=bool(pre.get("use_regex", True)),
            ignore_merges=bool(model.get("ignore_merges", False)),
            nfc=data.get("normalizer") is not None,
            source=str(path),
        )

    # ---------------------------------------------------------------- encoding

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Return the ids of ``text``, without adding BOS/EOS.

        With ``max_tokens``, raise TextTooLongError as soon as the text is known
        to need more ids than that, so a 10 MB prompt for a 1024-token context
        costs the work of ~1024 tokens, not of the whole text.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        limit = check_max_tokens(max_tokens)
        ids: list[int] = []
        for segment, added_id in self._split_added(text):
            if added_id is None:
                self._encode_segment(segment, ids, limit)
            else:
                ids.append(added_id)
            if limit is not None and len(ids) > limit:
                raise text_too_long(limit)
        return ids

    def encode_batch(self, texts: Sequence[str], workers: int | None = None) -> list[list[int]]:
        """Encode many texts, in order; uses processes when the batch is big enough.

        ``workers=None`` means one per CPU; ``workers=1`` forces a single process.
        """
        texts = list(texts)
        if workers is not None and workers < 1:
            raise TokenizerError(f"encode_batch() needs workers >= 1, got {workers}")
        n = min(workers or _cpu_count(), len(texts))
        if n < 2 or sum(map(len, texts)) < PARALLEL_MIN_CHARS:
            return [self.encode(t) for t in texts]
        size = -(-len(texts) // (n * _CHUNKS_PER_WORKER))
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        # The platform's default start method (fork on Linux before 3.14): it starts
        # fast and, unlike spawn, does not re-run an unguarded __main__ script.
        # Workers only run this pure-Python code, never torch.
        with ProcessPoolExecutor(n, initializer=_init_worker, initargs=(self,)) as pool:
            return [ids for chunk in pool.map(_encode_chunk, chunks) for ids in chunk]

    def _split_added(self, text: str) -> Iterable[tuple[str, int | None]]:
        """Yield (ordinary text, None) and ("", id) pieces, added tokens cut out."""
        if self._added_pattern is None:
            yield text, None
            return
        pos = 0
        for match in self._added_pattern.finditer(text):
            if match.start() < pos:  # swallowed by the previous token's rstrip
                continue
            token = self._added[match.group()]
            before = text[pos : match.start()]
            if token.lstrip:
                before = _strip_trailing_space(before)
            if before:
                yield before, None
            yield "", token.id
            pos = match.end()
            if token.rstrip:
                pos = _spaces_end(text, pos)
        if pos < len(text):
            yield text[pos:], None

    def _encode_segment(self, text: str, out: list[int], limit: int | None = None) -> None:
        """Append the ids of text that contains no added token (at most ``limit`` in ``out``)."""
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        if self._add_prefix_space and not text.startswith(" "):
            text = " " + text
        cache = self._cache
        if not self._use_regex:
            words: Iterable[str] = [text]
        elif limit is None:
            words = _PRETOKENIZER.findall(text)
        else:  # one word at a time: stop before pre-tokenizing (or merging) what cannot fit
            words = (m.group() for m in _PRETOKENIZER.finditer(text))
        for word in words:
            # Each id covers at most _longest bytes, so a word needs at least this many.
            if limit is not None and len(out) + -(-len(word) // self._longest) > limit:
                raise text_too_long(limit)
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe(word)
                cache = self._remember(word, ids)
            out.extend(ids)

    def _remember(self, word: str, ids: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Cache a word's ids within CACHE_SIZE entries and CACHE_BYTES; returns the cache."""
        cost = _entry_bytes(word, ids)
        if cost > CACHE_BYTES // 16:  # one huge word would evict everything useful
            return self._cache
        if len(self._cache) >= CACHE_SIZE or self._cache_bytes + cost > CACHE_BYTES:
            self._cache = _newest_half(self._cache)
            self._cache_bytes = sum(_entry_bytes(w, i) for w, i in self._cache.items())
        self._cache[word] = ids
        self._cache_bytes += cost
        return self._cache

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Apply the merges to one pre-tokenized word and return its ids."""
        try:
            raw = word.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TokenizerError(
                f"cannot encode {word!r}: it contains a lone surrogate "
                f"{word[exc.start]!r}, which is not valid Unicode text; fix how the text was read"
            ) from exc
        symbols = raw.decode("latin-1").translate(LATIN1_TO_VOCAB)
        if self._ignore_merges and symbols in self._vocab:
            return (self._vocab[symbols],)
        if len(symbols) > _LONG_WORD:
            parts = _merge_long(list(symbols), self._ranks)
        else:
            parts = _merge_short(list(symbols), self._ranks)
        try:
            return tuple(self._vocab[p] for p in parts)
        except KeyError as exc:
            raise TokenizerError(
                f"{self._source}: the vocabulary has no token {exc.args[0]!r}, so "
                f"{word!r} cannot be encoded; a byte-level vocab must contain all 256 bytes"
            ) from exc

    # ---------------------------------------------------------------- decoding

    def token_bytes(self, token_id: int) -> bytes:
        """Return the raw bytes one id stands for (may be part of a character)."""
        i = self._check_id(token_id)
        data = self._bytes[i]
        if data is None:
            raise TokenizerError(f"token id {i} is unused in this vocabulary (size {len(self._bytes)})")
        return data

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Return the exact bytes the ids stand for."""
        return b"".join([self.token_bytes(i) for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of ``ids``; invalid UTF-8 becomes U+FFFD (never raises for it)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """Return a fresh decoder for printing ids as they are generated."""
        return StreamDecoder(self.token_bytes)

    def _check_id(self, token_id: int) -> int:
        """Return token_id as an int, or raise naming the id and the vocab size."""
        i = _as_id(token_id)
        if i is not None and i < len(self._tokens):
            return i
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise TokenizerError(f"token id {token_id!r} is not an integer; pass int ids")
        raise TokenizerError(
            f"token id {token_id!r} is out of range for this tokenizer "
            f"(vocab size {len(self._tokens)}); the model and tokenizer do not match"
        )

    # ------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Largest id + 1, counting added tokens: the model's embedding rows must cover it."""
        return len(self._tokens)

    @property
    def unused_ids(self) -> list[int]:
        """Ids below vocab_size that stand for no token (gaps in the id table): never to be sampled."""
        return [i for i, b in enumerate(self._bytes) if b is None]

    @property
    def eot_id(self) -> int | None:
        """Id of ``<|endoftext|>``, where generation stops; None if there is none."""
        return self._eot_id

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special tokens (content -> id); a copy, so callers cannot break the tokenizer."""
        return {t.content: t.id for t in self._added.values() if t.special}

    def id_to_token(self, token_id: int) -> str:
        """Return the vocabulary string of an id (byte-level form, e.g. 'Ġhello')."""
        token = self._tokens[self._check_id(token_id)]
        if token is None:
            raise TokenizerError(f"token id {token_id} is unused in this vocabulary")
        return token

    def token_to_id(self, token: str) -> int | None:
        """Return the id of a vocabulary string, or None if it is not in the vocabulary."""
        added = self._added.get(token)
        return added.id if added is not None else self._vocab.get(token)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, source={self._source!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the word cache (sent to encode_batch workers)."""
        return {**self.__dict__, "_cache": {}, "_cache_bytes": 0}


# ------------------------------------------------------------------ BPE merging


def _merge_short(parts: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Repeatedly merge the best-ranked pair; quadratic, but fastest for short words."""
    while len(parts) > 1:
        best_rank, best = None, None
        for pair in itertools.pairwise(parts):
            rank = ranks.get(pair)
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best = rank, pair
        if best is None:
            break
        first, second = best
        merged: list[str] = []
        i = 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _merge_long(parts: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Same result as _merge_short in O(n log n): a heap of (rank, position) pairs.

    Stale heap entries (a side already merged away) are skipped when popped.
    Equal ranks pop left to right, which is the order _merge_short merges in.
    """
    n = len(parts)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap = [(ranks[pair], i) for i, pair in enumerate(itertools.pairwise(parts)) if pair in ranks]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = nxt[i] if parts[i] else n
        if j >= n or ranks.get((parts[i], parts[j])) != rank:
            continue
        parts[i] += parts[j]
        parts[j] = ""
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
        for left, right in ((prv[i], i), (i, nxt[i])):
            if left >= 0 and right < n:
                new_rank = ranks.get((parts[left], parts[right]))
                if new_rank is not None:
                    heapq.heappush(heap, (new_rank, left))
    return [p for p in parts if p]


def _strip_trailing_space(text: str) -> str:
    """Drop the whitespace an lstrip added token swallows (not str.rstrip: see _SPACES)."""
    end = len(text)
    while end and _spaces_end(text, end - 1, end) == end:
        end -= 1
    return text[:end]


def _entry_bytes(word: str, ids: tuple[int, ...]) -> int:
    """About what one cached word holds in memory (4 bytes a character at worst)."""
    return _ENTRY_BYTES + 4 * len(word) + _ID_BYTES * len(ids)


def _newest_half(cache: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Forget the older half of a full cache at once.

    (Deleting the oldest key one at a time makes ``next(iter(dict))`` scan ever
    more dead slots: 4x slower encoding once the cache is full.)
    """
    return dict(itertools.islice(cache.items(), len(cache) // 2, None))


# ---------------------------------------------------------- parsing and checks


def present(path: Path) -> bool:
    """Whether anything is at ``path``: a FIFO or a dangling link where a tokenizer file
    belongs is chosen, then refused with a message saying what it is, not skipped."""
    return os.path.lexists(path)


def _as_id(value: Any) -> int | None:
    """Return value as a non-negative int id, or None (bools and floats are not ids)."""
    if isinstance(value, bool):
        return None
    try:
        i = operator.index(value)  # accepts numpy / torch integer scalars
    except TypeError:
        return None
    return i if i >= 0 else None


def _token_to_bytes(token: str) -> bytes:
    """Bytes of a vocabulary string; tokens outside the byte alphabet are plain UTF-8.

    (Added tokens such as "<pad> x" are stored as text, not byte-level characters.)
    """
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8", errors="replace")


def _read_text(path: Path, what: str) -> str:
    """Read a UTF-8 tokenizer file (regular, size-capped); every problem is a one-line TokenizerError."""
    return read_text(path, what=what, limit=TOKENIZER_LIMIT, error=TokenizerError, missing=_MISSING)


def _read_json(path: Path, what: str) -> Any:
    """Read and parse a JSON tokenizer file; invalid JSON names the file."""
    return read_json(path, what=what, limit=TOKENIZER_LIMIT, error=TokenizerError, missing=_MISSING)


_MISSING = "check the path or re-download the tokenizer files"


def _check_vocab(vocab: Any, source: str, field: str = "vocabulary") -> dict[str, int]:
    """Validate a token -> id mapping: non-empty, str keys, unique non-negative int ids."""
    if not isinstance(vocab, Mapping):
        raise TokenizerError(
            f"{source}: {field} must be a JSON object mapping token strings to ids, "
            f"not {type(vocab).__name__}; is this really a GPT-2 vocab file?"
        )
    if not vocab:
        raise TokenizerError(f"{source}: {field} is empty; the file is truncated, re-download it")
    seen: dict[int, str] = {}
    for token, value in vocab.items():
        token_id = _as_id(value)
        if not isinstance(token, str) or token_id is None:
            raise TokenizerError(
                f"{source}: {field} entry {shown(token)}: {shown(value)} is not a token string mapped "
                "to an id >= 0; is this really a GPT-2 vocab file?"
            )
        if token_id in seen:
            raise TokenizerError(
                f"{source}: {field} gives id {token_id} to both {shown(seen[token_id])} and "
                f"{shown(token)}; ids must be unique, re-download the file"
            )
        seen[token_id] = token
    return {token: int(value) for token, value in vocab.items()}


def check_max_tokens(max_tokens: object) -> int | None:
    """``encode``'s max_tokens: None (no limit) or an int >= 0."""
    if max_tokens is None:
        return None
    limit = _as_id(max_tokens)
    if limit is None:
        raise TokenizerError(f"max_tokens must be an integer >= 0 or None, got {max_tokens!r}")
    return limit


def text_too_long(limit: int) -> TextTooLongError:
    return TextTooLongError(f"the text is more than {limit} tokens long; shorten it")


def _table_size(vocab: Mapping[str, int], added: Iterable[AddedToken], source: str) -> int:
    """Largest id + 1, refusing ids far beyond the number of tokens.

    The id tables are as long as the largest id, so one id of 10**8 in a small
    file would cost gigabytes.  Real vocabularies leave small gaps (padding,
    added tokens at round numbers), never more unused ids than used ones.
    """
    ids = {*vocab.values(), *(t.id for t in added)}
    top = max(ids)
    if top >= MAX_ID_SPREAD * len(ids) + MAX_ID_SLACK:
        token = next((t.content for t in added if t.id == top), None)
        token = token if token is not None else next(t for t, i in vocab.items() if i == top)
        raise TokenizerError(
            f"{source}: token {shown(token)} has id {top}, far beyond the {len(ids)} ids the file defines "
            "(ids must run from 0 with few gaps); the file is damaged, re-download it"
        )
    return top + 1


def _find_bad_merge(merges: Sequence[tuple[str, str]], vocab: Mapping[str, int]) -> tuple[int, str] | None:
    """Return (index, missing token) of the first merge the vocab cannot express."""
    for index, (first, second) in enumerate(merges):
        for token in (first, second, first + second):
            if token not in vocab:
                return index, token
    return None


def _parse_merges_txt(text: str, path: Path) -> tuple[list[tuple[str, str]], list[int]]:
    """Parse merges.txt into pairs plus their 1-based line numbers (for messages)."""
    merges: list[tuple[str, str]] = []
    lines: list[int] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(
                f"{path} line {number}: expected two tokens separated by one space, "
                f"got {shown(line)}; the merges file is damaged, re-download it"
            )
        merges.append((parts[0], parts[1]))
        lines.append(number)
    return merges, lines


def _parse_json_merges(raw: Any, path: Path) -> list[tuple[str, str]]:
    """Accept both tokenizer.json merge styles: "a b" strings and ["a", "b"] lists."""
    if not isinstance(raw, list):
        raise TokenizerError(f"{path}: model.merges must be a list; re-download the file")
    merges: list[tuple[str, str]] = []
    for index, item in enumerate(raw):
        parts = item.split(" ") if isinstance(item, str) else item
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise TokenizerError(
                f'{path}: model.merges[{index}] is {shown(item)}, expected "a b" or ["a", "b"]; '
                "the file is damaged, re-download it"
            )
        merges.append((parts[0], parts[1]))
    return merges


def _parse_added_tokens(raw: Any, path: Path) -> list[AddedToken]:
    """Read tokenizer.json's added_tokens list."""
    if not isinstance(raw, list):
        raise TokenizerError(f"{path}: added_tokens must be a list; re-download the file")
    tokens = []
    for index, item in enumerate(raw):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("content"), str)
            or not item["content"]
            or _as_id(item.get("id")) is None
        ):
            raise TokenizerError(
                f'{path}: added_tokens[{index}] needs a non-empty "content" string and an '
                '"id" >= 0; the file is damaged, re-download it'
            )
        tokens.append(
            AddedToken(
                item["content"],
                int(item["id"]),
                special=bool(item.get("special", False)),
                lstrip=bool(item.get("lstrip", False)),
                rstrip=bool(item.get("rstrip", False)),
            )
        )
    return tokens


def _require_supported(data: dict[str, Any], model: dict[str, Any], path: Path) -> None:
    """Refuse tokenizer.json features we would silently get wrong (wrong ids are worse)."""
    problems = []
    if model.get("type", "BPE") != "BPE":
        problems.append(f"model type {shown(model.get('type'))}")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            problems.append(f"model.{key} {shown(model[key])}")
    normalizer = data.get("normalizer")
    if normalizer is not None and (not isinstance(normalizer, dict) or normalizer.get("type") != "NFC"):
        kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        problems.append(f"normalizer {shown(kind)}")
    pre = data.get("pre_tokenizer")
    if not isinstance(pre, dict) or pre.get("type") != "ByteLevel":
        kind = pre.get("type") if isinstance(pre, dict) else pre
        problems.append(f"pre_tokenizer {shown(kind)}")
    if problems:
        raise TokenizerError(
            f"{path} uses {', '.join(problems)}; opswitch only supports GPT-2 style "
            "byte-level BPE (ByteLevel pre-tokenizer, no normalizer or NFC)"
        )


# ------------------------------------------------------------ process workers

_worker_tokenizer: BPETokenizer | None = None


def _cpu_count() -> int:
    """CPUs this process may run on (not the machine total, which can be far more)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _init_worker(tokenizer: BPETokenizer) -> None:
    """Receive the tokenizer once per worker instead of once per chunk."""
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    """Encode one chunk of an encode_batch call inside a worker process."""
    assert _worker_tokenizer is not None, "worker started without _init_worker"
    return [_worker_tokenizer.encode(t) for t in texts]
