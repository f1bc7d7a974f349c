"""What happens to a batch of rows: the same code in the local runner and in Ray actors.

A row comes in as ``(index, text)`` and goes out as ``{"index": i, "result": {...}}``
or ``{"index": i, "error": reason}``.  A row's own problems (too long for the
context or the cache budget, too short to score) are row errors, and so is
any failure while generating or decoding it: a batch that fails is run again
in halves, and a row that still fails alone is filed with the reason while
the job goes on.  Problems of the job (no tokenizer, a budget that cannot hold
one sequence, running out of memory) are raised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from opswitch.batch.errors import BatchError
from opswitch.core.errors import TextTooLongError
from opswitch.generation import DEFAULT_PREFILL_CHUNK, Generation, GenerationResult

if TYPE_CHECKING:
    from opswitch.api import LanguageModel

#: A row to run: ``(index, text)``, or ``(index, text, stop)`` for a row with its own stop strings.
Item = tuple[int, str] | tuple[int, str, tuple[str, ...]]

DEFAULT_CACHE_MIB = 1024.0  # as `opswitch serve --cache-mib`
MAX_CACHE_MIB = float(1 << 20)  # 1 TiB: beyond any machine, so a typo is caught

GENERATE_COLUMNS = frozenset(
    {"index", "completion", "completion_ids", "stop_reason", "prompt_tokens", "seed", "settings"}
)
EVAL_COLUMNS = frozenset({"index", "loss", "perplexity", "tokens", "settings"})


@dataclass(frozen=True)
class Task:
    """The job's kind, its text field and (for generate) the generation settings.

    ``generation`` holds ``lm.generate_ids`` keyword arguments; its ``seed`` is
    the job's, from which each row's own seed is derived.  ``cache_mib`` bounds
    the KV caches of the rows generated together; ``prefill_chunk`` and
    ``prefix_cache`` are the engine's (none of the three changes a result).
    """

    kind: str  # "generate" | "eval"
    field: str
    model: str | None = None
    backend: str | None = None
    generation: Mapping[str, Any] = field(default_factory=dict)  # type: ignore[operator]  # the attribute `field` shadows it for mypy only
    cache_mib: float = DEFAULT_CACHE_MIB
    tokenizer: str | None = None  # the model's own when None
    revision: str | None = None  # a hub revision to pin
    weights: str | None = None  # the storage format of the weight matrices (None: as the file stores them)
    kv_cache: str = "f32"  # the KV cache's format (f16: half the bytes)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefix_cache: bool = True

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mib * 2**20)

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
    GenerationConfig(**settings)  # type: ignore[arg-type]  # raises GenerationError, one line, on a bad value
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


def check_model(lm: LanguageModel, task: Task) -> None:
    """What the whole job needs from the model, checked once after loading."""
    if lm.tokenizer is None:
        raise BatchError(f"{lm.source or 'the model'} has no tokenizer files, so it cannot read text")
    stop = task.generation.get("stop_token", "eos")
    if isinstance(stop, int) and stop >= lm.config.vocab_size:
        raise BatchError(
            f"stop token {stop} is outside the model's vocabulary (0..{lm.config.vocab_size - 1})"
        )
    if task.kind == "generate":
        smallest = lm.kv_cache_bytes(1, 0)
        if smallest > task.cache_bytes:
            raise BatchError(f"--cache-mib {task.cache_mib:g} cannot hold the KV cache of even one short "
                             f"sequence of this model ({smallest / 2**20:.2f} MiB)")


def generate_rows(
    lm: LanguageModel, prompts: Sequence[list[int]], seeds: Sequence[int], settings: Mapping[str, Any],
    cache_bytes: int, stops: Sequence[tuple[str, ...]] | None = None, **engine: Any,
) -> list[GenerationResult]:
    """Generate for several prompts in one batched loop (``lm.generate_batch``), their
    caches within ``cache_bytes``: each row's ids are those of generating it alone
    with its own seed (and stop strings)."""
    stops = stops or [()] * len(prompts)
    return lm.generate_batch(list(prompts), [{**settings, "seed": seed, **({"stop": stop} if stop else {})}
                                             for seed, stop in zip(seeds, stops)],
                             cache_bytes=cache_bytes, **engine)


def failure(exc: Exception) -> str:
    """A row's failure as one bounded line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:299] + "…"


def _unpack(item: Item) -> tuple[int, str, tuple[str, ...]]:
    index, text, *rest = item
    return index, text, (rest[0] if rest else ())


def _prepare(lm: LanguageModel, task: Task, item: Item) -> tuple[dict[str, Any] | None, list[int]]:
    """A row's token ids, or its error record (too long, too short, too big for the cache)."""
    n_ctx = lm.config.n_positions
    index, text, _ = _unpack(item)
    minimum = 1 if task.kind == "generate" else 2
    try:  # bounded work for a huge row: stop once it cannot fit the context
        ids = lm.require_tokenizer().encode(text, max_tokens=n_ctx)
    except TextTooLongError:
        return {"index": index,
                "error": f"the text is more than {n_ctx} tokens but the model's context is {n_ctx}"}, []
    except MemoryError:
        raise
    except Exception as exc:
        return {"index": index, "error": f"the text cannot be tokenized: {failure(exc)}"}, []
    if len(ids) > n_ctx:
        return {"index": index, "error": f"the text is {len(ids)} tokens but the model's context "
                f"is {n_ctx}"}, []
    if len(ids) < minimum:
        return {"index": index, "error": f"the text is {len(ids)} token(s); scoring needs two"}, []
    if task.kind == "generate" and (need := _cache_need(lm, task, len(ids))) > task.cache_bytes:
        return {"index": index, "error": f"the row's KV cache needs {need / 2**20:.2f} MiB, more "
                f"than the budget (--cache-mib {task.cache_mib:g})"}, []
    return None, ids


def _settings(lm: LanguageModel, task: Task) -> dict[str, Any]:
    settings = {"model": task.model, "backend": lm.backend.name}
    if task.kind == "generate":
        settings.update(task.generation)
    return settings


def _engine_settings(task: Task) -> dict[str, Any]:
    return {"prefill_chunk": task.prefill_chunk, "prefix_cache": task.prefix_cache}


def run_rows(lm: LanguageModel, task: Task, items: Sequence[Item]) -> list[dict[str, Any]]:
    """Results (or row errors) for ``(index, text[, stop])`` items, in the same order."""
    out: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, list[int], tuple[str, ...]]] = []
    for item in items:
        record, ids = _prepare(lm, task, item)
        index, _, stop = _unpack(item)
        if record is not None:
            out[index] = record
        else:
            todo.append((index, ids, stop))
    settings = _settings(lm, task)
    if task.kind == "generate":
        out.update(_generate(lm, task, todo, settings))
    else:
        for index, ids, _ in todo:
            try:
                loss = lm.loss(ids)
            except MemoryError:
                raise
            except Exception as exc:
                out[index] = {"index": index, "error": f"scoring failed: {failure(exc)}"}
                continue
            out[index] = {"index": index, "result": {
                "loss": loss, "perplexity": float(np.exp(loss)), "tokens": len(ids), "settings": settings,
            }}
    return [out[_unpack(item)[0]] for item in items]


def stream_rows(lm: LanguageModel, task: Task, items: Sequence[Item],
                on_records: Callable[[list[dict[str, Any]]], None], batch_size: int = 8) -> None:
    """Generate every row on one engine: continuous batching across rows.

    At most ``batch_size`` rows run at once (and as many wait, tokenized),
    their caches within the budget; a row that finishes makes room for the
    next at once, and its record is handed over at the end of that step.  Rows
    of a step that failed are run again through ``_generate`` (in halves), so
    only a row that fails alone is filed as an error."""
    engine = lm.engine(task.cache_bytes, max_batch=batch_size, **_engine_settings(task))
    settings = _settings(lm, task)
    rows = iter(items)
    live: dict[Generation, tuple[int, list[int], tuple[str, ...], int]] = {}
    with lm.using():
        while True:
            records: list[dict[str, Any]] = []
            while len(engine.waiting) < batch_size and (item := next(rows, None)) is not None:
                record, ids = _prepare(lm, task, item)
                index, _, stop = _unpack(item)
                if record is not None:
                    records.append(record)
                    continue
                seed = row_seed(task.generation["seed"], index)
                config = lm.settings(**{**task.generation, "seed": seed, "stop": stop})
                live[engine.add(ids, config)] = (index, ids, stop, seed)
            if not engine.has_work:
                if records:
                    on_records(records)
                return
            failed = []
            for out in engine.step():
                if out.finish_reason is None or out.generation not in live:
                    continue
                index, ids, stop, seed = live.pop(out.generation)
                if out.error is None:
                    records.append(_record(lm, index, ids, seed, out.generation.result, settings))
                elif isinstance(out.generation.exception, MemoryError):
                    raise out.generation.exception
                else:
                    failed.append((index, ids, stop))
            records += _generate(lm, task, failed, settings).values()
            if records:
                on_records(records)


def _cache_need(lm: LanguageModel, task: Task, n_prompt: int) -> int:
    """Bytes of the cache a row takes from the pool (the prompt and every new token)."""
    return lm.kv_cache_bytes(n_prompt, int(task.generation.get("max_new_tokens", 100)))


def _generate(lm: LanguageModel, task: Task, todo: list[tuple[int, list[int], tuple[str, ...]]],
              settings: dict) -> dict[int, dict]:
    """Records for the rows in one batched loop; if the batch fails, each half again, so
    that only a row that fails alone becomes an error."""
    seeds = [row_seed(task.generation["seed"], index) for index, _, _ in todo]
    if not todo:
        return {}
    try:
        results = generate_rows(lm, [ids for _, ids, _ in todo], seeds, task.generation, task.cache_bytes,
                                [stop for _, _, stop in todo], **_engine_settings(task))
    except MemoryError:
        raise
    except Exception as exc:
        if len(todo) == 1:
            return {todo[0][0]: {"index": todo[0][0], "error": f"generation failed: {failure(exc)}"}}
        half = len(todo) // 2  # halves, not one by one: a large batch with one bad row stays batched
        return {**_generate(lm, task, todo[:half], settings), **_generate(lm, task, todo[half:], settings)}
    return {index: _record(lm, index, ids, seed, res, settings)
            for (index, ids, _), seed, res in zip(todo, seeds, results)}


def _record(lm: LanguageModel, index: int, ids: list[int], seed: int, res: GenerationResult,
            settings: dict) -> dict[str, Any]:
    """A row's output: the output processor's text (stop strings cut), its ids, why it stopped."""
    try:
        completion = res.text if res.stop_reason == "stop" else lm.require_tokenizer().decode(res.new_ids)
    except MemoryError:
        raise
    except Exception as exc:
        return {"index": index, "error": f"the completion cannot be decoded: {failure(exc)}"}
    return {"index": index, "result": {
        "completion": completion,
        "completion_ids": [int(t) for t in res.new_ids],
        "stop_reason": res.stop_reason,
        "prompt_tokens": len(ids),
        "seed": seed,
        "settings": settings,
    }}
