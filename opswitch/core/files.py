"""Read input files as untrusted: regular files only, of a bounded size, parsed safely.

A model directory comes from anywhere.  Where ``config.json`` should be there
may be a FIFO (reading blocks forever), a device such as ``/dev/zero``
(reading never ends), a directory or a dangling link; a tiny file may hold
JSON nested 10^5 deep or a 5000-digit number, which Python's parser answers
with RecursionError or ValueError.  Every file opswitch reads goes through
``open_regular`` / ``read_json`` / ``read_text``, so each of these is one
line naming the file and saying what to do, raised as the caller's own
``OpswitchError`` subclass (ConfigError, TokenizerError, WeightsError).
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from opswitch.core.errors import OpswitchError

MiB = 1 << 20
# Caps per kind of file, each far above any real one: GPT-2's config.json is 1 KB,
# an index naming every tensor of a 1000-layer model is under 1 MB, GPT-2's vocab.json
# is 1 MB and the largest tokenizer.json files on the hub are ~35 MB.
CONFIG_LIMIT = 1 * MiB
INDEX_LIMIT = 16 * MiB
TOKENIZER_LIMIT = 64 * MiB
# The files a model directory's tokenizer is read from, as sets, in the order the loader
# prefers them: opswitch.tokenizer.files decides with them, the hub downloads and checks them.
CHAR_TOKENIZER_FILE = "tokenizer_char.json"
TOKENIZER_SETS: tuple[tuple[str, ...], ...] = (
    ("vocab.json", "merges.txt"), ("tokenizer.json",), (CHAR_TOKENIZER_FILE,),
)
TOKENIZER_FILES: tuple[str, ...] = tuple(name for names in TOKENIZER_SETS for name in names)

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)

ErrorType = type[OpswitchError]


def not_a_file(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is when it is not a regular file (links followed), or None when it is one.

    "missing", "a dangling link", "a FIFO", "a directory", ... — for messages
    such as "config.json is a FIFO, not a file".
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling link" if os.path.islink(path) else "missing"
    except OSError as exc:  # a link loop, a name too long, a directory we may not enter
        return f"unreachable ({exc.strerror or exc})"
    return _kind(mode)


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike[str], error: ErrorType, missing: str = "check the path") -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file, else raise ``error``.

    ``missing`` says what to do when the file does not exist.  Never blocks:
    a FIFO is recognised before it is opened (and opened non-blocking, in case
    one replaced the file in between).
    """
    path = Path(path)
    kind = not_a_file(path)
    if kind == "missing":
        raise error(f"{path} does not exist; {missing}")
    if kind is not None:
        target = f" (to {os.readlink(path)})" if kind == "a dangling link" else ""
        raise error(f"{path} is {kind}{target}, not a file; replace it with the real file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
    kind = _kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise error(f"{path} is {kind}, not a file; replace it with the real file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(
    path: str | os.PathLike[str], *, what: str, limit: int, error: ErrorType, missing: str = "check the path"
) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes; ``what`` names its kind ("config")."""
    path = Path(path)
    with open_regular(path, error, missing) as f:
        size = os.fstat(f.fileno()).st_size
        chunks: list[bytes] = []
        total = 0
        try:  # in chunks, not read(limit): that would allocate the whole limit up front
            while size <= limit and total <= limit and (chunk := f.read(min(MiB, limit + 1 - total))):
                chunks.append(chunk)
                total += len(chunk)
        except OSError as exc:
            raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if size > limit or total > limit:
        raise error(
            f"{path} is {max(size, total):,} bytes, more than any {what} file "
            f"({limit // MiB} MiB at most); check that it is the right file"
        )
    return b"".join(chunks)


def read_text(
    path: str | os.PathLike[str], *, what: str, limit: int, error: ErrorType, missing: str = "check the path"
) -> str:
    """``read_bytes`` decoded as UTF-8; bad bytes are an error naming the offset."""
    data = read_bytes(path, what=what, limit=limit, error=error, missing=missing)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); re-download it") from None


def read_json(
    path: str | os.PathLike[str], *, what: str, limit: int, error: ErrorType, missing: str = "check the path"
) -> Any:
    """A JSON file read with ``read_text`` and parsed with ``parse_json``."""
    text = read_text(path, what=what, limit=limit, error=error, missing=missing)
    return parse_json(text, str(path), error)


def parse_json(text: str, source: str, error: ErrorType) -> Any:
    """``json.loads`` whose every failure is ``error`` naming ``source``.

    Strict JSON: NaN and Infinity, which Python's parser accepts, are refused.
    """
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise error(f"{source} nests JSON too deeply to be a real file; re-download or re-save it") from None
    except ValueError as exc:  # JSONDecodeError, and ints past Python's 4300-digit limit
        raise error(f"{source} is not valid JSON ({_first_line(exc)}); re-download or re-save it") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


_Mapped = TypeVar("_Mapped", bound="MappedFile")


class MappedFile:
    """A read-only memory map shared by the arrays a weights file hands out.

    ``close`` drops this object's hold; arrays still viewing the map keep it
    alive until they are collected (closing under them is refused quietly).
    """

    _mm: mmap.mmap | None = None

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            with suppress(BufferError):  # arrays still view it: they release it when collected
                mm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
