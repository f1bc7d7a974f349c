"""A batch job from start to finish: check everything, run the missing rows, assemble.

The order matters to the user: every flag, the input file and the output
location are checked and the job's lock taken (``Job(spec)``) before a model
is loaded or a worker started, so a mistake costs a second, not a model
load; then the shards (``start``), the rows (``add``, from either runner),
a read-back of every shard (``check``: a damaged one is run again), and the
final files (``finish``).  ``close`` lets go of the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opswitch.batch.errors import BatchError, require_pyarrow
from opswitch.batch.lock import JobLock
from opswitch.batch.paths import JobPaths, check_disjoint, check_kinds, protected_paths
from opswitch.batch.readers import Row, data_format, read_rows
from opswitch.batch.shards import MANIFEST, ShardStore, check_same_job, read_manifest
from opswitch.batch.work import MAX_CACHE_MIB, Item, Task, model_ref
from opswitch.batch.writers import check_output_schema, write_jsonl, write_output

if TYPE_CHECKING:
    from opswitch.api import LanguageModel

FORMAT_VERSION = 2  # 2: shards end with a checksum line
MAX_ROUNDS = 3  # runs of the rows of damaged shards before the job gives up


@dataclass(frozen=True)
class JobSpec:
    """What to run on which file, and how to treat what is already there."""

    task: Task
    input: Path
    output: Path
    shard_size: int = 100
    batch_size: int = 8
    resume: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class Summary:
    rows: int  # in the input
    resumed: int  # already in complete shards when this run started
    ran: int  # rows this run gave the model (a damaged shard's rows count again)
    errors: int  # bad rows in the errors file, over the whole job
    written: int  # rows in the output file: with ``errors``, exactly ``rows``
    seconds: float
    output: Path
    errors_file: Path


class Job:
    """A checked job; construct it before loading anything."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.paths = JobPaths.of(spec.output)
        self.output, self.errors_file = self.paths.output, self.paths.errors
        self.shard_dir = self.paths.shards
        _check_flags(spec)
        task = replace(spec.task, model=model_ref(spec.task.model), tokenizer=model_ref(spec.task.tokenizer))
        _check_output(self, task)
        self.lock = JobLock(self.paths.lock, spec.output)
        try:
            protected = protected_paths(spec.input, task.model, self.paths, task.tokenizer)
            check_disjoint(self.paths, protected)  # under the lock
            self.rows: list[Row] = read_rows(spec.input, spec.task.field, spec.task.columns,
                                             stop_field=spec.task.kind == "generate")
            self.task = _with_seed(task, self.shard_dir if spec.resume else None)
            if data_format(spec.output, "the output file") == "parquet":
                check_output_schema(self.rows, self.task)
            self.manifest = {
                "version": FORMAT_VERSION,
                "kind": self.task.kind,
                "field": self.task.field,
                "model": self.task.model,
                "backend": self.task.backend,
                "tokenizer": self.task.tokenizer,
                "revision": self.task.revision,
                "weights": self.task.weights,
                "kv_cache": self.task.kv_cache,
                "generation": dict(self.task.generation),
                "input": str(spec.input.resolve()),
                "input_sha256": _sha256(spec.input),
                "rows": len(self.rows),
                "shard_size": spec.shard_size,
            }
            if spec.resume and self.shard_dir.exists():  # a resume that cannot be is known now
                check_same_job(self.shard_dir, self.manifest)
        except BaseException:
            self.close()
            raise
        self.store: ShardStore | None = None
        self.resumed = 0  # rows in sound shards at start()
        self.pending = 0  # rows given to the model, over every round
        self._records: list[dict[str, Any]] | None = None

    def close(self) -> None:
        """Let go of the job's lock (a killed process lets go of it too)."""
        self.lock.release()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> list[Item]:
        """Open the shards (a fresh set, or the interrupted job's, each read back), file the
        bad rows found while reading, and return the ``(index, text[, stop])`` rows still to run."""
        if self.spec.overwrite and self.shard_dir.exists():
            shutil.rmtree(self.shard_dir)
        self.store = ShardStore.open(self.shard_dir, self.manifest, resume=self.spec.resume)
        self._started = time.perf_counter()
        items = self._pending()
        self.resumed = len(self.rows) - sum(1 for row in self.rows if not self.store.is_done(row.index))
        return items

    def check(self) -> list[Item]:
        """Read every shard back: the rows of any that is damaged are returned, to run again
        (an empty list: every shard is sound, and ``finish`` may assemble them)."""
        assert self.store is not None, "start() first"
        self._records = self.store.verify()
        return [] if self.store.finished else self._pending()

    @property
    def notes(self) -> list[str]:
        """Lines for the user (a damaged shard), each given once."""
        if self.store is None:
            return []
        notes, self.store.notes = self.store.notes, []
        return notes

    def _pending(self) -> list[Item]:
        assert self.store is not None
        pending = [row for row in self.rows if not self.store.is_done(row.index)]
        for row in pending:
            if row.error is not None:
                self.store.add({"index": row.index, "error": row.error})
        items = [(row.index, row.text, *((row.stop,) if row.stop else ())) for row in pending
                 if row.error is None]
        self.pending += len(items)
        return items

    def add(self, records: list[dict[str, Any]]) -> None:
        """Take the runner's records (``{"index", "result" | "error"}``) into the shards."""
        assert self.store is not None, "start() first"
        for record in records:
            self.store.add(record)

    def finish(self) -> Summary:
        """Write the output (in input order) and the errors file from the shards read back by
        ``check``, make sure they hold every input row exactly once, then drop the shards."""
        assert self.store is not None and self._records is not None and self.store.finished, "check() first"
        rows, errors = [], []
        for record in self._records:
            i = record["index"]
            if "error" in record:
                errors.append({"index": i, "id": self.rows[i].id, "reason": record["error"]})
            else:
                rows.append({**self.rows[i].fields, "index": i, **record["result"]})
        seen = sorted([r["index"] for r in rows] + [e["index"] for e in errors])
        if seen != list(range(len(self.rows))):  # a bug, never the user's: keep the shards to look at
            raise BatchError(f"internal error: the shards in {self.shard_dir} do not hold every input row "
                             "exactly once; they are kept, and nothing was written")
        tmp = self.shard_dir  # temporary files there go with the shards, even after a crash
        write_jsonl(self.errors_file, errors, tmp_dir=tmp)
        write_output(self.output, rows, tmp_dir=tmp)  # last: an existing output is a finished job
        self.store.remove()
        return Summary(
            rows=len(self.rows), resumed=self.resumed, ran=self.pending, errors=len(errors),
            written=len(rows), seconds=time.perf_counter() - self._started, output=self.output,
            errors_file=self.errors_file,
        )


class Report:
    """What a job tells its caller as it goes (the CLI prints it; the default is silence)."""

    def checked(self, job: Job) -> None:
        """Flags, input and output checked; the input read."""

    def loading(self, task: Task) -> contextlib.AbstractContextManager:
        """Around loading the model in this process (local mode)."""
        return contextlib.nullcontext()

    def loaded(self, lm: LanguageModel) -> None:
        """The model is loaded (local mode)."""

    def running(self, job: Job, n_rows: int) -> None:
        """``n_rows`` rows are about to run (the rest were done before or are bad)."""

    def done_rows(self, n: int) -> None:
        """``n`` more rows are finished."""

    def note(self, line: str) -> None:
        """Something the user should know (a damaged shard that is run again)."""


def run_job(spec: JobSpec, ray=None, lm: LanguageModel | None = None,
            report: Report | None = None) -> Summary:
    """Run a whole job: locally (on ``lm`` if given, else the task's model, loaded
    once), or on Ray when ``ray`` (a ``RayOptions``) is given."""
    from opswitch.batch.local import load_lm, run_local
    from opswitch.batch.work import check_model

    report = report or Report()
    if ray is not None:
        from opswitch.batch.ray_runner import import_ray, run_ray

        ray.validate()
        import_ray()
    with Job(spec) as job:
        report.checked(job)
        if ray is None:
            if lm is None:
                with report.loading(job.task):
                    lm = load_lm(job.task)
                report.loaded(lm)
            else:
                check_model(lm, job.task)
            if lm.source:  # the files it came from (a hub snapshot, the demo model)
                check_disjoint(job.paths, protected_paths(spec.input, lm.source, job.paths))
        items = job.start()
        report.running(job, len(items))

        def sink(records: list[dict[str, Any]]) -> None:
            job.add(records)
            report.done_rows(len(records))

        for _ in range(MAX_ROUNDS):
            for line in job.notes:
                report.note(line)
            if ray is not None:
                run_ray(job.task, items, sink, ray, spec.batch_size)
            else:
                assert lm is not None  # loaded above
                run_local(lm, job.task, items, sink, spec.batch_size)
            items = job.check()
            if not items and job.store.finished:  # type: ignore[union-attr]
                for line in job.notes:
                    report.note(line)
                return job.finish()
        raise BatchError(f"the shards in {job.shard_dir} were damaged {MAX_ROUNDS} times while the job ran: "
                         "is something else writing there, or is the disk failing?")


def _check_flags(spec: JobSpec) -> None:
    if spec.shard_size < 1:
        raise BatchError(f"--shard-size must be at least 1, got {spec.shard_size}")
    if spec.batch_size < 1:
        raise BatchError(f"--batch-size must be at least 1, got {spec.batch_size}")
    if not spec.task.field:
        raise BatchError("the text field's name is empty")
    if spec.resume and spec.overwrite:
        raise BatchError("--resume and --overwrite contradict each other: pick one")
    if not isinstance(spec.task.prefill_chunk, int) or spec.task.prefill_chunk < 0:
        raise BatchError(f"--prefill-chunk must be a number of tokens >= 0 (0 = off),"
                         f" got {spec.task.prefill_chunk}")
    budget = spec.task.cache_mib
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and 0 < budget <= MAX_CACHE_MIB):
        raise BatchError(f"--cache-mib must be a number of MiB in (0, {MAX_CACHE_MIB}], got {budget}")
    data_format(spec.input, "the input file")
    if data_format(spec.output, "the output file") == "parquet":
        require_pyarrow("writing Parquet")


def _check_output(job: Job, task: Task) -> None:
    spec = job.spec
    if not spec.output.parent.is_dir():
        raise BatchError(f"the output's folder {spec.output.parent} does not exist")
    check_kinds(job.paths)
    check_disjoint(job.paths, protected_paths(spec.input, task.model, job.paths, task.tokenizer))
    if spec.overwrite:
        return
    if spec.output.exists() and not (spec.resume and job.shard_dir.exists()):
        # (with shards, the output is an older one that an interrupted --overwrite job will replace)
        more = " (the job already finished)" if spec.resume else ""
        raise BatchError(f"{spec.output} exists{more}: pass --overwrite to replace it")
    if job.errors_file.exists() and not job.shard_dir.exists():
        raise BatchError(f"{job.errors_file} exists: pass --overwrite to replace it")


def _with_seed(task: Task, shard_dir: Path | None) -> Task:
    """Generation needs a job seed: the one given, the interrupted job's, or a fresh one."""
    if task.kind != "generate" or task.generation.get("seed") is not None:
        return task
    seed = None
    if shard_dir is not None and (shard_dir / MANIFEST).exists():
        with contextlib.suppress(BatchError, KeyError, TypeError, AttributeError):
            seed = read_manifest(shard_dir)["generation"]["seed"]
        if not (type(seed) is int and 0 <= seed < 2**63):  # else: a fresh seed, and the resume is refused
            seed = None
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    return replace(task, generation={**task.generation, "seed": seed})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
