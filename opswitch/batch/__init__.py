"""Batch jobs: generation or scoring over a dataset, locally or on Ray.

    from opswitch.batch import JobSpec, Task, generation_settings, run_job
    task = Task("generate", field="prompt", generation=generation_settings(seed=1))
    run_job(JobSpec(task, Path("prompts.jsonl"), Path("out.jsonl")))

Modules: ``readers`` (input rows), ``work`` (what happens to a row),
``shards`` (atomic, checked shards and resume), ``writers`` (final files),
``paths`` (what a job may write: never its input or model), ``lock`` (one
job per output), ``local`` and ``ray_runner`` (who runs the rows), ``job``
(the whole job).
"""

from opswitch.batch.errors import BatchError, MissingExtraError
from opswitch.batch.job import Job, JobSpec, Summary, run_job
from opswitch.batch.ray_runner import RayOptions
from opswitch.batch.work import Task, generation_settings, row_seed

__all__ = [
    "BatchError", "Job", "JobSpec", "MissingExtraError", "RayOptions", "Summary", "Task",
    "generation_settings", "row_seed", "run_job",
]
