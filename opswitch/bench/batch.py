"""``opswitch bench --batch 1,4,16,64``: aggregate decode speed of batched generation.

At batch 1 a decode step reads every weight to make one token; with B
sequences in one step the same read makes B tokens, so aggregate tokens/s
should grow with B until compute binds.  Measured on both sides the same
way: B equal-length prompts (so HF pads nothing and both do the same work),
greedy, no early stop, and the clock runs from the end of the first forward
pass (the prefill) to the end of the last, over B x (new_tokens - 1) tokens.
"""

from __future__ import annotations

import time

from opswitch.bench.idle import Quiet
from opswitch.bench.models import hf_shape, random_hf_model
from opswitch.bench.rows import Row


def batch_prompts(batch: int, prompt_tokens: int, vocab: int) -> list[list[int]]:
    """``batch`` different prompts of the same length."""
    return [[(1 + 7 * i + j) % vocab for j in range(prompt_tokens)] for i in range(batch)]


def bench_batch_ours(model, prompts: list[list[int]], new_tokens: int, repeats: int, quiet: Quiet) -> Row:
    """Aggregate decode tokens/s of one BatchGenerator over ``prompts`` (one forward per step)."""
    from opswitch.generation import BatchGenerator, GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0, stop_token=-1)
    row = Row(f"decode batch {len(prompts)}", model.backend.name, unit="tok/s")

    def one(steps: int = new_tokens) -> float:
        generator = BatchGenerator(model)
        for prompt in prompts:
            generator.add(prompt, config.replace(max_new_tokens=steps))
        generator.step()  # prefill, and the first token
        start = time.perf_counter()
        while generator.running:
            generator.step()
        return len(prompts) * (steps - 1) / (time.perf_counter() - start)

    one(2)  # warm-up
    for _ in range(repeats):
        row.samples.append(quiet.measure(one))
    return row


def bench_batch_torch(hf_model, prompts: list[list[int]], new_tokens: int, repeats: int, quiet: Quiet) -> Row:
    """HF's batched ``generate`` on the same prompts; a logits processor stamps each forward's end."""
    import torch
    import transformers

    stamps: list[float] = []

    class Clock(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts)
    row = Row(f"decode batch {len(prompts)}", "torch", unit="tok/s")

    def one(steps: int = new_tokens) -> float:
        stamps.clear()
        with torch.inference_mode():
            hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, pad_token_id=0,
                              logits_processor=transformers.LogitsProcessorList([Clock()]))
        return len(prompts) * (steps - 1) / (stamps[-1] - stamps[0])

    one(2)
    for _ in range(repeats):
        row.samples.append(quiet.measure(one))
    return row


def batch_rows(sizes: list[int], vocab: int, hf_model, models, prompt_tokens: int, new_tokens: int,
               repeats: int, quiet: Quiet):
    """For each batch size, its rows: HF's first (when ``hf_model`` is given), then each of ours."""
    for size in sizes:
        prompts = batch_prompts(size, prompt_tokens, vocab)
        line = []
        if hf_model is not None:
            line.append(bench_batch_torch(hf_model, prompts, new_tokens, repeats, quiet))
        line += [bench_batch_ours(m, prompts, new_tokens, repeats, quiet) for m in models]
        yield size, line


def batch_models(config, params, backends, with_torch: bool):
    """(HF model or None, our models): one per backend, the same weights in each of ours."""
    from opswitch.model.gpt2 import GPT2

    hf_model = random_hf_model(0, **hf_shape(config)) if with_torch else None
    return hf_model, [GPT2(config, params, backend) for backend in backends]
