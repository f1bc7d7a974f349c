"""Sharded, atomic output: nothing lost, nothing twice.

Rows ``[k*S, (k+1)*S)`` of the input make shard ``k``.  A shard is written
only when every one of its rows has a record (a result or a row error), in
one go, with a checksum line at its end: to a temporary file with a name no other job uses, flushed to disk,
then renamed.  So a shard file is complete or absent, whatever kills the
process.  A shard file is still never taken on trust: on resume and again
before assembly, each one is read back and must hold exactly its rows, in
order, each once, as valid records; one that does not (truncated, edited,
corrupted on disk) is deleted with a note and its rows run again.
``job.json`` records what the shards were made from, so a resume with
another input, model or settings is refused instead of mixing two jobs in
one output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from opswitch.batch.errors import BatchError

MANIFEST = "job.json"
MANIFEST_LIMIT = 1 << 20  # job.json is ours and small; anything bigger is not ours
LINE_LIMIT = 64 << 20  # one row's record: a completion of a few thousand tokens is far less


def atomic_write(path: Path, write: Callable[[IO], Any], tmp_dir: Path | None = None,
                 binary: bool = False) -> None:
    """Call ``write(file)`` on a fresh temporary file (in ``tmp_dir``, default beside
    ``path``), sync it, rename it over ``path`` and sync the folder."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="\n")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)


def dumps(record: Any) -> str:
    """One JSON line; values JSON cannot hold (Parquet timestamps, bytes) become strings."""
    return json.dumps(record, ensure_ascii=False, default=str)


class ShardStore:
    """The shard directory of one job: which shards are sound, and writing the rest."""

    def __init__(self, directory: Path, n_rows: int, shard_size: int) -> None:
        self.directory, self.n_rows, self.shard_size = directory, n_rows, shard_size
        self.n_shards = -(-n_rows // shard_size)
        self.notes: list[str] = []  # one line per shard found damaged and dropped
        self.complete: set[int] = set()
        self._buffers: dict[int, dict[int, dict]] = {}
        self.verify()

    @classmethod
    def open(cls, directory: Path, manifest: dict[str, Any], resume: bool) -> ShardStore:
        """Start a fresh shard directory, or (``resume``) continue one made by the same job."""
        n_rows, shard_size = manifest["rows"], manifest["shard_size"]
        if directory.exists() and not resume:
            raise BatchError(
                f"{directory} holds the shards of an unfinished job: add --resume to finish it, "
                "or --overwrite to start again"
            )
        if directory.exists():
            check_same_job(directory, manifest)
            for stale in directory.glob("*.tmp"):  # a killed job's half-written files
                if not stale.is_dir() or stale.is_symlink():
                    stale.unlink()
        else:
            directory.mkdir()
            atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1) + "\n"))
        return cls(directory, n_rows, shard_size)

    def path(self, shard: int) -> Path:
        return self.directory / f"part-{shard:05d}.jsonl"

    def is_done(self, index: int) -> bool:
        return index // self.shard_size in self.complete

    def _rows_of(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.n_rows))

    def add(self, record: dict[str, Any]) -> None:
        """Keep one row's record (``{"index": i, ...}``); write its shard once it is whole."""
        shard = record["index"] // self.shard_size
        if shard in self.complete:  # a row delivered twice (a retried task): its shard has it once
            return
        buffer = self._buffers.setdefault(shard, {})
        buffer[record["index"]] = record
        if len(buffer) == len(self._rows_of(shard)):
            body = "".join(dumps(buffer[i]) + "\n" for i in sorted(buffer)).encode("utf-8")
            data = body + _trailer(body) + b"\n"
            atomic_write(self.path(shard), lambda f: f.write(data), tmp_dir=self.directory, binary=True)
            self.complete.add(shard)
            del self._buffers[shard]

    @property
    def finished(self) -> bool:
        return len(self.complete) == self.n_shards

    def verify(self) -> list[dict[str, Any]]:
        """Read every shard file back; drop (with a note) each that does not hold exactly
        its rows.  Returns the records of the sound ones, in input order."""
        records: list[dict[str, Any]] = []
        self.complete = set()
        for shard in range(self.n_shards):
            path = self.path(shard)
            if not os.path.lexists(path):
                continue
            got = self._read(shard)
            if isinstance(got, str):
                self.notes.append(f"shard {path.name} is damaged ({got}): its rows will run again")
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                continue
            self.complete.add(shard)
            records += got
        return records

    def _read(self, shard: int) -> list[dict[str, Any]] | str:
        """The shard's records, or why they cannot be trusted."""
        path, rows = self.path(shard), self._rows_of(shard)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return "not a regular file"
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                data = _read_lines(f, len(rows) + 1)
        except OSError as exc:
            return f"cannot be read: {exc.strerror or exc}"
        if data is None:
            return "more or longer lines than its rows can make"
        if not data.endswith(b"\n"):
            return "it ends in the middle of a line"
        body, _, trailer = data[:-1].rpartition(b"\n")
        body = body + b"\n" if body else b""
        if trailer != _trailer(body):
            return "its checksum does not match its content"
        lines = body.split(b"\n")[:-1]
        if len(lines) != len(rows):
            return f"{len(lines)} lines where {len(rows)} rows belong"
        records = []
        for number, (line, index) in enumerate(zip(lines, rows), start=1):
            try:
                record = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):
                return f"line {number} is not a valid JSON record"
            problem = _record_problem(record, index)
            if problem:
                return f"line {number} {problem}"
            records.append(record)
        return records

    def remove(self) -> None:
        shutil.rmtree(self.directory)


def _read_lines(f: IO[bytes], most: int) -> bytes | None:
    """At most ``most`` lines of at most LINE_LIMIT bytes each, or None: a huge file
    where a shard belongs costs nothing to refuse."""
    lines: list[bytes] = []
    while len(lines) <= most:
        line = f.readline(LINE_LIMIT + 1)
        if not line:
            return b"".join(lines)
        if len(line) > LINE_LIMIT:
            return None
        lines.append(line)
    return None


def _trailer(body: bytes) -> bytes:
    """A shard's last line: the SHA-256 of the lines above it, so that a flipped
    byte which still leaves valid JSON is caught as surely as a lost line."""
    return json.dumps({"sha256": hashlib.sha256(body).hexdigest()}).encode()


def _record_problem(record: Any, index: int) -> str | None:
    if not isinstance(record, dict):
        return "is not an object"
    if record.get("index") != index or type(record.get("index")) is not int:
        return f"should hold row {index}, not {str(record.get('index'))[:20]}"
    if set(record) == {"index", "result"} and isinstance(record["result"], dict):
        return None
    if set(record) == {"index", "error"} and isinstance(record["error"], str):
        return None
    return "is neither a result nor an error record"


def read_manifest(directory: Path) -> dict[str, Any]:
    """``job.json`` as a dict, or a one-line BatchError: it is read like any untrusted
    file (a regular file, bounded, valid JSON, an object)."""
    path = directory / MANIFEST
    cannot = (f"{directory} has no readable {MANIFEST}, so it cannot be resumed: "
              "use --overwrite to start again")
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MANIFEST_LIMIT:
            raise BatchError(cannot)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MANIFEST_LIMIT + 1)
        manifest = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        raise BatchError(cannot) from None
    if not isinstance(manifest, dict):
        raise BatchError(cannot)
    return manifest


def check_same_job(directory: Path, manifest: dict[str, Any]) -> None:
    """Refuse to resume shards that another job (other input, model, settings) made."""
    before = {"kv_cache": "f32", **read_manifest(directory)}  # jobs from before --kv-cache: f32
    changed = sorted(k for k in manifest.keys() | before.keys() if manifest.get(k) != before.get(k))
    if changed:
        known = [_WORDS.get(k, k) for k in changed if k in manifest]
        what = ", ".join(known) if known else f"fields ({len(changed)} not written by opswitch)"
        raise BatchError(
            f"cannot resume the job in {directory}: different {what} this time "
            "(use the same flags and input, or --overwrite to start again)"
        )


def _sync_folder(folder: Path) -> None:
    """Make a rename durable (where the platform allows syncing a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_WORDS = {"generation": "generation settings", "input_sha256": "input content", "rows": "row count",
          "kind": "kind of job", "field": "text field", "shard_size": "--shard-size", "input": "input file",
          "tokenizer": "--tokenizer", "revision": "--revision", "weights": "--weights",
          "kv_cache": "--kv-cache"}
