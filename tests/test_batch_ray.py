"""opswitch batch on Ray: a local Ray instance (one for the module), 2 actors,
output byte for byte the local mode's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli
from support import require

from opswitch.batch import Job, JobSpec, RayOptions, Task, generation_settings, run_job
from opswitch.batch.local import run_local
from opswitch.batch.ray_runner import RowsActor, actor_threads
from opswitch.cli.main import main

pytestmark = pytest.mark.ray

ROWS = [
    {"id": 0, "prompt": "It is a truth universally acknowledged"},
    {"id": 1, "prompt": "Mr. Darcy"},
    {"id": 2, "text": "no prompt"},
    {"id": 3, "prompt": "Elizabeth could not help"},
    {"id": 4, "prompt": "The ball at Netherfield"},
    {"id": 5, "prompt": "She had never seen"},
    {"id": 6, "prompt": "In the morning"},
    {"id": 7, "prompt": "“Oh! my dear,”"},
]


@pytest.fixture(scope="module")
def ray_instance():
    """One Ray instance for this module, shut down before the rest of the suite runs."""
    ray = require("ray")
    require("ray.data")
    # Ray's worker processes inherit this environment, so they import the same opswitch, and
    # keep a fixed thread count: the busy-machine governor would otherwise change an actor's
    # BLAS threads between calls, and a loss's last bits with them (docs/batch.md)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OPSWITCH_ADAPT_THREADS", "0")
        ray.init(num_cpus=2, include_dashboard=False)
        yield ray
        ray.shutdown()


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "not json\n")
    return path


def one_blas_thread():
    """What Ray gives an actor with one CPU (OMP_NUM_THREADS=1).  OpenBLAS's sums
    depend on its thread count, in the last bits, so the local reference runs alike."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def both(tmp_path: Path, task: Task, inp: Path, lm) -> tuple[Path, Path]:
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    with one_blas_thread():
        run_job(JobSpec(task, inp, local, shard_size=3, batch_size=2), lm=lm)
    run_job(JobSpec(task, inp, on_ray, shard_size=3, batch_size=2), ray=RayOptions(actors=2))
    return local, on_ray


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_generate_on_ray_is_byte_identical_to_local(ray_instance, tmp_path, lm, prompts, temperature):
    task = Task("generate", "prompt", generation=generation_settings(
        max_new_tokens=10, temperature=temperature, seed=3))
    local, on_ray = both(tmp_path, task, prompts, lm)
    assert on_ray.read_bytes() == local.read_bytes()
    assert Path(f"{on_ray}.errors.jsonl").read_bytes() == Path(f"{local}.errors.jsonl").read_bytes()
    assert len(local.read_text().splitlines()) == 7


def test_eval_on_ray_is_byte_identical_to_local(ray_instance, tmp_path):
    """A loss carries the last bits of OpenBLAS's sums, which depend on its thread count,
    and the local backend may change its count while it runs (busy-machine adaptation):
    so the local reference runs as docs/batch.md says a matching run does, with one
    thread (``--threads 1``, as Ray's one-CPU actors), in its own process."""
    inp = tmp_path / "texts.jsonl"
    inp.write_text("".join(json.dumps({"text": r.get("prompt", "a")}) + "\n" for r in ROWS))
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    done = run_cli("batch", "eval", "--input", inp, "--output", local, "--shard-size", 3, "--batch-size", 2,
                   "--threads", 1, "--quiet", env={"OPSWITCH_ADAPT_THREADS": "0"})
    assert done.returncode == 0, done.stderr
    run_job(JobSpec(Task("eval", "text"), inp, on_ray, shard_size=3, batch_size=2), ray=RayOptions(actors=2))
    assert on_ray.read_bytes() == local.read_bytes()


def test_cli_ray_auto_finishes_a_job_started_locally(ray_instance, tmp_path, lm, prompts, capsys):
    """Shards do not care who wrote them: a job stopped locally can be resumed on Ray."""
    args = ["batch", "generate", "--input", str(prompts), "--max-tokens", "6", "--seed", "9",
            "--shard-size", "2", "--quiet"]
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    task = Task("generate", "prompt", generation=generation_settings(max_new_tokens=6, seed=9))
    job = Job(JobSpec(task, prompts, out, shard_size=2))
    with one_blas_thread():
        assert main([*args, "--output", str(reference)]) == 0
        run_local(lm, job.task, job.start()[:2], job.add)  # rows 0 and 1, then a "crash"
    job.close()  # (a crash lets go of the job's lock)
    assert main([*args[:-1], "--output", str(out), "--resume", "--ray", "auto", "--actors", "2"]) == 0
    err = capsys.readouterr().err
    # rows 0-1 and the last shard (row 8, invalid JSON, filed at the start) were complete
    assert "Resuming: 3 rows in complete shards are done, 5 to go" in err
    assert "Running 5 rows on Ray (2 actors, 1 CPU and 1 compute thread each)" in err
    assert "ray-project/ray#53727" in err  # Ray's own error-marked notice is explained
    assert out.read_bytes() == reference.read_bytes()


def test_an_actor_computes_on_the_cpus_it_reserves(ray_instance, monkeypatch):
    """numba sizes its pool by the machine's CPUs when it starts: an actor given one CPU of a
    shared node must start it with one thread (on a one-CPU machine this cannot fail)."""
    monkeypatch.delenv("OPSWITCH_NUM_THREADS", raising=False)
    assert actor_threads(RayOptions(cpus_per_actor=1)) == 1
    assert actor_threads(RayOptions(cpus_per_actor=2.5)) == 2
    assert actor_threads(RayOptions(cpus_per_actor=0.5)) == 1
    monkeypatch.setenv("OPSWITCH_NUM_THREADS", "3")  # --threads / the variable, when given, wins
    assert actor_threads(RayOptions(cpus_per_actor=1)) == 3

    class ThreadsActor(RowsActor):
        def threads(self):
            import numba

            return self.fatal, self.lm.backend.name, numba.get_num_threads()

    task = Task("eval", "text", backend="cpu")
    actor = ray_instance.remote(num_cpus=1)(ThreadsActor).remote(task, threads=1)
    assert ray_instance.get(actor.threads.remote()) == (None, "cpu", 1)
    ray_instance.kill(actor)


def test_a_model_that_does_not_load_on_the_actors_is_one_line(ray_instance, tmp_path, prompts, capsys):
    code = main(["batch", "eval", "--model", str(tmp_path / "no-model"), "--input", str(prompts),
                 "--output", str(tmp_path / "o.jsonl"), "--ray", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"opswitch: error: on a Ray actor: no such model directory: {tmp_path / 'no-model'} " \
        "(check the path)"
