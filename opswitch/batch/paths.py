"""Where a job writes, and the proof that none of it touches what the user gave it.

A job writes, replaces or removes exactly these paths, all named after its
output: the output, ``OUTPUT.errors.jsonl``, ``OUTPUT.lock`` and the folder
``OUTPUT.shards/`` with everything in it.  Before anything is written (and
before a model is loaded), each of them is compared with the input and the
model's files, by resolved path (the same, inside, or holding one another)
and by ``(st_dev, st_ino)``, so that no spelling — a symlink, a hard link,
``..`` — can make ``--overwrite`` replace or delete the data the job reads.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from opswitch.batch.errors import BatchError


@dataclass(frozen=True)
class JobPaths:
    """Every path a job on ``output`` may write or remove."""

    output: Path
    errors: Path
    shards: Path
    lock: Path

    @classmethod
    def of(cls, output: Path) -> JobPaths:
        name = output.name
        return cls(output, output.with_name(name + ".errors.jsonl"), output.with_name(name + ".shards"),
                   output.with_name(name + ".lock"))

    def named(self) -> list[tuple[str, Path]]:
        return [("the output", self.output), ("the errors file", self.errors),
                ("the shard folder", self.shards), ("the lock file", self.lock)]


def check_kinds(paths: JobPaths) -> None:
    """The output files must be files (or absent), the shard folder a real folder (or absent):
    a directory where the output goes, or a symlinked shard folder, is refused now, not
    after every row has run."""
    for role, path in [("the output", paths.output), ("the errors file", paths.errors),
                       ("the lock file", paths.lock)]:
        info = _lstat(path)
        if info is None or stat.S_ISREG(info.st_mode):
            continue
        if stat.S_ISLNK(info.st_mode):
            target = _stat(path)
            if target is None or stat.S_ISREG(target.st_mode):
                continue  # a link is replaced, never written through
            info = target
        raise BatchError(f"{role} {path} is {_kind(info.st_mode)}, not a file: give another --output")
    info = _lstat(paths.shards)
    if info is not None and not stat.S_ISDIR(info.st_mode):
        what = "a symlink" if stat.S_ISLNK(info.st_mode) else _kind(info.st_mode)
        raise BatchError(f"the shard folder {paths.shards} is {what}, not a folder this job made: "
                         "move it away, or give another --output")


def protected_paths(input_path: Path, model: str | None, paths: JobPaths,
                    tokenizer: str | None = None) -> list[tuple[str, Path]]:
    """What a job must never write or remove: the input, and a local model's (or tokenizer's)
    directory and files (an output may sit in the model's folder, as long as it is not one of
    its files; what an earlier job on the same output left there is this job's, not the model's)."""
    protected = [("the input", input_path)]
    for what, ref in (("the model", model), ("the tokenizer", tokenizer)):
        path = Path(ref) if ref is not None else None
        if path is not None and path.exists():
            protected.append((what, path))
            if path.is_dir():
                # the job's own files are named, not followed: an output that is a link to a
                # model file must not make that file "ours"
                ours = {_entry(p) for _, p in paths.named()}
                with os.scandir(path) as entries:
                    protected += [(f"a file of {what}", Path(e.path)) for e in entries
                                  if _entry(Path(e.path)) not in ours]
    return protected


def check_disjoint(paths: JobPaths, protected: list[tuple[str, Path]]) -> None:
    """Refuse when any path the job writes is, holds or lies inside a protected file (for a
    protected folder: is or holds it), or is the same file by inode (a hard link, a symlink)."""
    shard_entries = []
    if paths.shards.is_dir() and not paths.shards.is_symlink():
        with os.scandir(paths.shards) as entries:
            shard_entries = [("a file in the shard folder", Path(e.path)) for e in entries]
    written = paths.named() + shard_entries
    for what, guarded in protected:
        g_path, g_id = _identity(guarded)
        inside_is_fine = what in ("the model", "the tokenizer") and g_path.is_dir()
        for role, path in written:
            w_path, w_id = _identity(path)
            clash = (w_path == g_path or w_path in g_path.parents
                     or (g_path in w_path.parents and not inside_is_fine)
                     or (w_id is not None and w_id == g_id))
            if clash:
                raise BatchError(f"{role} {path} would overwrite or remove {what} {guarded}: "
                                 "give another --output")


def _entry(path: Path) -> Path:
    """A directory entry's own name under its resolved folder (the entry itself, not its target)."""
    return path.absolute().parent.resolve() / path.name


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    """The resolved path and the (device, inode) of what it names, if it exists."""
    info = _stat(path)
    return path.resolve(), (info.st_dev, info.st_ino) if info is not None else None


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (OSError, ValueError):
        return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISLNK(mode):
        return "a dangling symlink"
    return "a device or socket"
