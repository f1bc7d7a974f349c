"""Sharded, atomic output: nothing lost, nothing twice.

Rows ``[k*S, (k+1)*S)`` of the input make shard ``k``.  A shard is written
only when every one of its rows has a record (a result or a row error), in
one go: to ``part-0000k.jsonl.tmp``, flushed to disk, then renamed.  So a
shard file is either complete or absent, whatever kills the process, and
``--resume`` redoes exactly the rows of the missing shards.  ``job.json``
records what the shards were made from, so a resume with another input,
model or settings is refused instead of mixing two jobs in one output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opswitch.batch.errors import BatchError

MANIFEST = "job.json"


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, sync it, rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dumps(record: Any) -> str:
    """One JSON line; values JSON cannot hold (Parquet timestamps, bytes) become strings."""
    return json.dumps(record, ensure_ascii=False, default=str)


class ShardStore:
    """The shard directory of one job: which shards are done, and writing the rest."""

    def __init__(self, directory: Path, n_rows: int, shard_size: int) -> None:
        self.directory, self.n_rows, self.shard_size = directory, n_rows, shard_size
        self.n_shards = -(-n_rows // shard_size)
        self.complete = {k for k in range(self.n_shards) if self.path(k).exists()}
        self._buffers: dict[int, dict[int, dict]] = {}

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
            _check_same_job(directory, manifest)
            for stale in directory.glob("*.tmp"):
                stale.unlink()
        else:
            directory.mkdir(parents=True)
            atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1) + "\n"))
        return cls(directory, n_rows, shard_size)

    def path(self, shard: int) -> Path:
        return self.directory / f"part-{shard:05d}.jsonl"

    def is_done(self, index: int) -> bool:
        return index // self.shard_size in self.complete

    def _expected(self, shard: int) -> int:
        return min(self.shard_size, self.n_rows - shard * self.shard_size)

    def add(self, record: dict[str, Any]) -> None:
        """Keep one row's record (``{"index": i, ...}``); write its shard once it is whole."""
        shard = record["index"] // self.shard_size
        if shard in self.complete:  # a row delivered twice (a retried task): its shard has it once
            return
        buffer = self._buffers.setdefault(shard, {})
        buffer[record["index"]] = record
        if len(buffer) == self._expected(shard):
            lines = [dumps(buffer[i]) + "\n" for i in sorted(buffer)]
            atomic_write(self.path(shard), lambda f: f.writelines(lines))
            self.complete.add(shard)
            del self._buffers[shard]

    @property
    def finished(self) -> bool:
        return len(self.complete) == self.n_shards

    def records(self) -> Iterator[dict[str, Any]]:
        """Every row's record, in input order (all shards must be complete)."""
        for shard in range(self.n_shards):
            with open(self.path(shard), encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

    def remove(self) -> None:
        shutil.rmtree(self.directory)


def _check_same_job(directory: Path, manifest: dict[str, Any]) -> None:
    try:
        before = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise BatchError(
            f"{directory} has no readable {MANIFEST}, so it cannot be resumed: use --overwrite to start again"
        ) from None
    changed = sorted(k for k in manifest.keys() | before.keys() if manifest.get(k) != before.get(k))
    if changed:
        what = ", ".join(_WORDS.get(k, k) for k in changed)
        raise BatchError(
            f"cannot resume the job in {directory}: different {what} this time "
            "(use the same flags and input, or --overwrite to start again)"
        )


_WORDS = {"generation": "generation settings", "input_sha256": "input content", "rows": "row count",
          "kind": "kind of job", "field": "text field", "shard_size": "--shard-size", "input": "input file"}
