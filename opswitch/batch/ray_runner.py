"""The Ray runner: the same rows, through Ray Data's ``map_batches`` on a pool of actors.

Each actor loads the model once and runs ``work.run_rows``, the local
runner's code, so a row's record does not depend on where it ran.  The
records stream back to this process, which writes them through the same
shard store as a local job: one writer keeps the shard/resume guarantees and
makes the output byte for byte the one a local run makes.  (Generated text
is small beside the compute that makes it, so gathering it costs little.)
Ray starts, schedules, retries and scales the actors; nothing here manages a
cluster.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opswitch.api import THREADS_VARIABLE as ENV_THREADS
from opswitch.batch.errors import BatchError, MissingExtraError
from opswitch.batch.work import Item, Task, run_rows
from opswitch.core.errors import OpswitchError


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: ``address`` is ``auto``, ``local`` or a cluster's address."""

    address: str = "auto"
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0

    def validate(self) -> None:
        if self.actors < 1:
            raise BatchError(f"--actors must be at least 1, got {self.actors}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise BatchError("--cpus-per-actor and --gpus-per-actor must not be negative")


def import_ray():
    """Ray with Ray Data, or an error naming the extra that installs it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingExtraError("--ray", "ray[data]", "ray") from None
    return ray


class RowsActor:
    """A Ray actor: the model loaded once, then batches of ``index``/``text`` columns.

    A problem of the job (a model that will not load, a backend missing on
    this node) is not raised here, where Ray would bury it in a remote
    traceback, but returned as a ``fatal`` record that the driver raises as
    one line.
    """

    def __init__(self, task: Task, threads: int = 1) -> None:
        from opswitch.batch.local import load_lm

        # before the backend starts its pools (numba's is sized once, by the machine's CPUs):
        # an actor computes on the CPUs Ray gave it, not on every core of a shared node
        os.environ[ENV_THREADS] = str(threads)
        self.task, self.lm, self.fatal = task, None, None
        try:
            self.lm = load_lm(task)
        except OpswitchError as exc:
            self.fatal = str(exc)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        items = [(index, text, *((tuple(json.loads(stop)),) if stop else ()))
                 for index, text, stop in zip(batch["index"].tolist(), batch["text"].tolist(),
                                              batch["stop"].tolist())]
        try:
            if self.fatal is not None:
                raise BatchError(self.fatal)
            assert self.lm is not None  # loaded, or fatal says why not
            records = run_rows(self.lm, self.task, items)
        except OpswitchError as exc:
            self.fatal = str(exc)
            records = [{"index": item[0], "fatal": self.fatal} for item in items]
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def actor_threads(options: RayOptions) -> int:
    """Compute threads per actor: $OPSWITCH_NUM_THREADS (or --threads) when set, else the
    CPUs each actor reserves (at least one; a fractional share rounds down)."""
    wanted = os.environ.get(ENV_THREADS)
    if wanted and wanted.strip().isdigit() and int(wanted) > 0:
        return int(wanted)
    return max(1, math.floor(options.cpus_per_actor))


def connect(ray, address: str) -> None:
    """Use the Ray this process is already connected to, else connect (or start one)."""
    if ray.is_initialized():
        return
    try:
        if address == "auto":  # RAY_ADDRESS, or a cluster started on this machine, or a new local one
            ray.init(include_dashboard=False, logging_level=logging.ERROR)
        else:
            ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BatchError(f"cannot connect to Ray at {address!r}: {first}") from None


def run_ray(
    task: Task,
    items: Sequence[Item],
    on_records: Callable[[list[dict[str, Any]]], None],
    options: RayOptions,
    batch_size: int = 8,
) -> None:
    """Run ``items`` on Ray actors; records come back (in input order) to ``on_records``."""
    if not items:
        return
    ray = import_ray()
    connect(ray, options.address)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # bounds what the shard store holds back
    context.enable_progress_bars = False  # the CLI draws its own
    # About one block per model call, and at least one per actor, so that every actor has work.
    blocks = min(len(items), max(options.actors, -(-len(items) // batch_size)), 10_000)
    dataset = ray.data.from_items(
        [{"index": item[0], "text": item[1], "stop": json.dumps(item[2]) if len(item) > 2 else ""}
         for item in items], override_num_blocks=blocks
    )
    results = dataset.map_batches(
        RowsActor,
        fn_constructor_kwargs={"task": task, "threads": actor_threads(options)},
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor,
        batch_size=batch_size,
        batch_format="numpy",
    )
    for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
        records = [json.loads(r) for r in batch["record"]]
        for record in records:
            if "fatal" in record:
                raise BatchError(f"on a Ray actor: {record['fatal']}")
        on_records(records)
