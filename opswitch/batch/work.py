"""What happens to a batch of rows: the same code in the local runner and in Ray actors.

A row comes in as ``(index, text)`` and goes out as ``{"index": i, "result": {...}}``
or ``{"index": i, "error": reason}``.  Only the row's own problems (too long
for the context, too short to score) become row errors; anything else is a
problem of the job and raised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opswitch.batch.errors import BatchError
from opswitch.core.errors import TextTooLongError

GENERATE_COLUMNS = frozenset(
    {"index", "completion", "completion_ids", "stop_reason", "prompt_tokens", "seed", "settings"}
)
EVAL_COLUMNS = frozenset({"index", "loss", "perplexity", "tokens", "settings"})


@dataclass(frozen=True)
class Task:
    """The job's kind, its text field and (for generate) the generation settings.

    ``generation`` holds ``lm.generate_ids`` keyword arguments; its ``seed`` is
    the job's, from which each row's own seed is derived.
    """

    kind: str  # "generate" | "eval"
    field: str
    model: str | None = None
    backend: str | None = None
    generation: Mapping[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> frozenset[str]:
        return GENERATE_COLUMNS if self.kind == "generate" else EVAL_COLUMNS


def generation_settings(
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.9,
    seed: int | None = None,
    stop_token: int | str = "eos",
) -> dict[str, Any]:
    """``lm.generate_ids`` keyword arguments, checked now (not after loading the model)."""
    from opswitch.generation import GenerationConfig

    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop_token=stop_token)
    GenerationConfig(**settings)  # raises GenerationError, one line, on a bad value
    return settings


def model_ref(model: str | None) -> str | None:
    """A local model directory as an absolute path (what Ray actors on other
    processes and nodes need, and what a resume compares); a hub id as given."""
    if model is None:
        return None
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def row_seed(seed: int, index: int) -> int:
    """A row's seed from the job's seed and the row's index alone, so that how
    the rows are split between processes never changes what a row gets."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


def check_model(lm, task: Task) -> None:
    """What the whole job needs from the model, checked once after loading."""
    if lm.tokenizer is None:
        raise BatchError(f"{lm.source or 'the model'} has no tokenizer files, so it cannot read text")
    stop = task.generation.get("stop_token", "eos")
    if isinstance(stop, int) and stop >= lm.config.vocab_size:
        raise BatchError(
            f"stop token {stop} is outside the model's vocabulary (0..{lm.config.vocab_size - 1})"
        )


def generate_rows(
    lm, prompts: Sequence[list[int]], seeds: Sequence[int], settings: Mapping[str, Any]
) -> list:
    """Generate for several prompts in one batched loop (``lm.generate_batch``): each
    row's ids are those of generating it alone with its own seed."""
    return lm.generate_batch(list(prompts), [{**settings, "seed": seed} for seed in seeds])


def run_rows(lm, task: Task, items: Sequence[tuple[int, str]]) -> list[dict[str, Any]]:
    """Results (or row errors) for ``(index, text)`` items, in the same order."""
    n_ctx = lm.config.n_positions
    out: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, list[int]]] = []
    for index, text in items:
        try:  # bounded work for a huge row: stop once it cannot fit the context
            ids = lm.tokenizer.encode(text, max_tokens=n_ctx)
        except TextTooLongError:
            out[index] = {"index": index,
                          "error": f"the text is more than {n_ctx} tokens but the model's context is {n_ctx}"}
            continue
        minimum = 1 if task.kind == "generate" else 2
        if len(ids) > n_ctx:
            out[index] = {"index": index, "error": f"the text is {len(ids)} tokens but the model's context "
                          f"is {n_ctx}"}
        elif len(ids) < minimum:
            out[index] = {"index": index, "error": f"the text is {len(ids)} token(s); scoring needs two"}
        else:
            todo.append((index, ids))
    settings = {"model": task.model, "backend": lm.backend.name}
    if task.kind == "generate":
        settings.update(task.generation)
        seeds = [row_seed(task.generation["seed"], index) for index, _ in todo]
        results = generate_rows(lm, [ids for _, ids in todo], seeds, task.generation)
        for (index, ids), seed, res in zip(todo, seeds, results):
            out[index] = {"index": index, "result": {
                "completion": lm.tokenizer.decode(res.new_ids),
                "completion_ids": [int(t) for t in res.new_ids],
                "stop_reason": res.stop_reason,
                "prompt_tokens": len(ids),
                "seed": seed,
                "settings": settings,
            }}
    else:
        for index, ids in todo:
            loss = lm.loss(ids)
            out[index] = {"index": index, "result": {
                "loss": loss, "perplexity": float(np.exp(loss)), "tokens": len(ids), "settings": settings,
            }}
    return [out[index] for index, _ in items]
