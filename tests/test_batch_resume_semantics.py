"""What --resume promises, seen from the output and from the rows the model is given:
a job without --seed resumes with the seed it started with, and a shard that was
complete (the last one included, short or not) is never run again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opswitch.batch import Job, JobSpec, Task, generation_settings, run_job
from opswitch.batch.job import Report
from opswitch.batch.local import run_local

PROMPTS = ["It is a truth", "Mr. Darcy", "Elizabeth could not", "The ball", "She had never", "In the morning"]
SHARD = 2


class Counting(Report):
    """Counts the rows a run hands to the model and gets back."""

    def __init__(self) -> None:
        self.to_run = self.done = 0

    def running(self, job, n_rows: int) -> None:
        self.to_run += n_rows

    def done_rows(self, n: int) -> None:
        self.done += n


def _input(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": PROMPTS[i % len(PROMPTS)]}) + "\n"
                            for i in range(n)))
    return path


def _task(seed: int | None) -> Task:
    # sampled, so a different seed gives different rows
    return Task("generate", "prompt", generation=generation_settings(max_new_tokens=3, temperature=1.0,
                                                                     top_k=0, top_p=1.0, seed=seed))


def _interrupted(lm, inp: Path, out: Path, task: Task, shards: set[int]) -> Job:
    """A job that completed only ``shards`` before it stopped."""
    job = Job(JobSpec(task, inp, out, shard_size=SHARD))
    items = [item for item in job.start() if item[0] // SHARD in shards]
    run_local(lm, job.task, items, job.add)
    assert not out.exists()
    job.close()  # the process that ran it is gone: its lock with it
    return job


def test_a_job_without_seed_resumes_with_its_own_seed(tmp_path, lm):
    inp, out = _input(tmp_path, 6), tmp_path / "out.jsonl"
    job = _interrupted(lm, inp, out, _task(None), {0})
    seed = job.task.generation["seed"]
    report = Counting()
    summary = run_job(JobSpec(_task(None), inp, out, shard_size=SHARD, resume=True), lm=lm, report=report)
    assert (summary.resumed, summary.ran, report.done) == (2, 4, 4)
    reference = tmp_path / "reference.jsonl"
    run_job(JobSpec(_task(seed), inp, reference, shard_size=SHARD), lm=lm)
    assert out.read_bytes() == reference.read_bytes()  # every row as one uninterrupted job gives it


@pytest.mark.parametrize("n_rows", [5, 6], ids=["short-last-shard", "full-last-shard"])
def test_a_complete_last_shard_is_not_run_again(tmp_path, lm, n_rows):
    inp, out = _input(tmp_path, n_rows), tmp_path / "out.jsonl"
    last = (n_rows - 1) // SHARD
    _interrupted(lm, inp, out, _task(7), {last})
    in_last = n_rows - last * SHARD
    report = Counting()
    summary = run_job(JobSpec(_task(7), inp, out, shard_size=SHARD, resume=True), lm=lm, report=report)
    ran = n_rows - in_last
    assert (summary.resumed, summary.ran, report.to_run, report.done) == (in_last, ran, ran, ran)
    reference = tmp_path / "reference.jsonl"
    run_job(JobSpec(_task(7), inp, reference, shard_size=SHARD), lm=lm)
    assert out.read_bytes() == reference.read_bytes()
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == list(range(n_rows))
