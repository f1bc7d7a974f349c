"""The engine driven by one caller on its own thread: a stream, a whole result, a batch.

One prompt is the batch of one: the same engine, scheduler and output
processor as the server's and batch jobs'.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from opswitch.core.errors import GenerationError, OpswitchError
from opswitch.generation.config import GenerationConfig
from opswitch.generation.engine import Engine, Generation, StepOutput
from opswitch.generation.loop import GenerationResult, check_request
from opswitch.model.gpt2 import GPT2
from opswitch.model.kvcache import CachePool


def stream_outputs(engine: Engine, gen: Generation, interrupted: str = "interrupted") -> Iterator[StepOutput]:
    """Step ``engine`` until ``gen`` is done, yielding its outputs; a failure is raised.
    If the consumer stops early (Ctrl-C, or it closes the generator), ``gen`` is cancelled."""
    try:
        while not gen.done:
            for out in engine.step():
                if out.generation is gen:
                    if out.error:
                        _raise(gen)
                    yield out
    finally:
        if not gen.done:
            engine.cancel(gen, interrupted)


def run_stream(engine: Engine, prompt_ids: Sequence[int], config: GenerationConfig,
               result: GenerationResult | None = None) -> Iterator[StepOutput]:
    """Queue one request on ``engine`` and yield its outputs (token, text) as they come."""
    gen = engine.add(prompt_ids, config, result=result)
    yield from stream_outputs(engine, gen)


def run_batch(engine: Engine, prompts: Sequence[Sequence[int]],
              configs: Sequence[GenerationConfig]) -> list[GenerationResult]:
    """Generate for every prompt together (each with its own settings) on ``engine``; the
    same ids as generating each alone.  With a pool, sequences wait for cache room."""
    if len(prompts) != len(configs):
        raise GenerationError(f"{len(prompts)} prompts but {len(configs)} settings")
    for prompt, config in zip(prompts, configs):
        check_request(engine.model, prompt, config)
    gens = [engine.add(prompt, config) for prompt, config in zip(prompts, configs)]
    try:
        while not all(g.done for g in gens):
            for out in engine.step():
                if out.error and out.generation in gens:
                    _raise(out.generation)
    finally:
        for gen in gens:
            engine.cancel(gen)
    return [g.result for g in gens]


# -- the same, given a model (a fresh engine for the call) --------------------------
def stream_ids(model: GPT2, prompt_ids: Sequence[int], config: GenerationConfig,
               result: GenerationResult | None = None, n_vocab_allowed: int | None = None,
               unused_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield each new token id as soon as it is sampled (the stop token is not yielded).

    The prompt must fit the context; generation stops early, with
    ``stop_reason = "context_full"``, when the context fills up (documented
    truncation rather than an error halfway through a stream)."""
    engine = Engine(model, n_vocab_allowed=n_vocab_allowed, unused_ids=unused_ids)
    for out in run_stream(engine, prompt_ids, config, result):
        if out.token is not None:
            yield out.token


def generate_ids(model: GPT2, prompt_ids: Sequence[int], config: GenerationConfig,
                 n_vocab_allowed: int | None = None, unused_ids: Sequence[int] = ()) -> GenerationResult:
    """Run generation to the end and return everything at once."""
    result = GenerationResult(list(prompt_ids))
    for _ in stream_ids(model, prompt_ids, config, result, n_vocab_allowed, unused_ids):
        pass
    return result


def generate_batch(model: GPT2, prompts: Sequence[Sequence[int]], configs: Sequence[GenerationConfig],
                   pool: CachePool | None = None, n_vocab_allowed: int | None = None,
                   unused_ids: Sequence[int] = ()) -> list[GenerationResult]:
    """``run_batch`` on a fresh engine over ``model`` (and ``pool``)."""
    engine = Engine(model, pool, n_vocab_allowed=n_vocab_allowed, unused_ids=unused_ids)
    return run_batch(engine, prompts, configs)


class BatchGenerator(Engine):
    """The engine under its earlier name and signature (the batch benchmark uses it): whole
    prompts in one step and no prefix reuse, so it measures the plain batched loop."""

    def __init__(self, model: GPT2, pool: CachePool | None = None, n_vocab_allowed: int | None = None,
                 unused_ids: Sequence[int] = ()) -> None:
        super().__init__(model, pool, prefill_chunk=0, prefix_cache=False, n_vocab_allowed=n_vocab_allowed,
                         unused_ids=unused_ids)


def _raise(gen: Generation) -> None:
    exc = gen.exception
    if isinstance(exc, OpswitchError):
        raise exc
    raise GenerationError(gen.error or "generation failed") from exc
