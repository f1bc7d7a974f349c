"""The local runner: one process, the model loaded once; generation is continuously batched
across rows (one engine for the job), scoring runs in small batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from opswitch.batch.work import Item, Task, check_model, run_rows, stream_rows

if TYPE_CHECKING:
    from opswitch.api import LanguageModel


def load_lm(task: Task) -> LanguageModel:
    """The model as the job asks for it, checked against the job (tokenizer, stop token)."""
    from opswitch.api import load_model

    lm = load_model(task.model, backend=task.backend, tokenizer=task.tokenizer, revision=task.revision,
                    weights=task.weights, kv_cache=task.kv_cache)
    check_model(lm, task)
    return lm


def run_local(
    lm: LanguageModel,
    task: Task,
    items: Sequence[Item],
    on_records: Callable[[list[dict[str, Any]]], None],
    batch_size: int = 8,
) -> None:
    """Run ``items`` (``(index, text[, stop])``), handing records over as rows finish."""
    if task.kind == "generate":
        stream_rows(lm, task, items, on_records, batch_size)
        return
    for start in range(0, len(items), batch_size):
        on_records(run_rows(lm, task, items[start : start + batch_size]))
