"""The local runner: one process, the model loaded once, rows in small batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opswitch.batch.work import Task, check_model, run_rows


def load_lm(task: Task):
    """The model as the job asks for it, checked against the job (tokenizer, stop token)."""
    from opswitch.api import load_model

    lm = load_model(task.model, backend=task.backend, tokenizer=task.tokenizer, revision=task.revision,
                    weights=task.weights, kv_cache=task.kv_cache)
    check_model(lm, task)
    return lm


def run_local(
    lm,
    task: Task,
    items: Sequence[tuple[int, str]],
    on_records: Callable[[list[dict[str, Any]]], None],
    batch_size: int = 8,
) -> None:
    """Run ``items`` (``(index, text)``) in order, handing each batch's records over as it finishes."""
    for start in range(0, len(items), batch_size):
        on_records(run_rows(lm, task, items[start : start + batch_size]))
