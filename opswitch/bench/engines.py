"""Decode and prefill of one engine: ours (a bound ``GPT2``) and HF transformers + torch.

Greedy, the engine alone (argmax, no sampling); both sides are measured the
same way, so their ratio within one run is the figure that means something.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from opswitch.bench.idle import Quiet
from opswitch.bench.rows import Row
from opswitch.core.backend import Backend


def decode_rate(model, prompt: list[int], new_tokens: int, repeats: int, quiet: Quiet) -> Row:
    """Greedy decode tokens/s after ``prompt``, the engine alone (argmax, no sampling).

    The prompt is prefilled once; each repeat rewinds the cache to the prompt's
    end and decodes ``new_tokens`` (so decode late in the context costs no prefill)."""
    row = Row("decode", model.backend.name, unit="tok/s")
    cache = model.new_cache(len(prompt) + new_tokens)
    first = int(np.argmax(model.next_logits(prompt, cache)))

    def one() -> float:
        cache.length, token = len(prompt), first
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(np.argmax(model.next_logits([token], cache)))
        return new_tokens / (time.perf_counter() - start)

    one()  # warm-up
    for _ in range(repeats):
        row.samples.append(quiet.measure(one))
    return row


def prefill_time(model, prompt: list[int], repeats: int, quiet: Quiet) -> Row:
    """Seconds to process ``prompt`` and produce the first token's logits."""
    row = Row("prefill", model.backend.name, unit="s")

    def one() -> float:
        cache = model.new_cache(len(prompt))
        start = time.perf_counter()
        model.next_logits(prompt, cache)
        return time.perf_counter() - start

    one()
    for _ in range(repeats):
        row.samples.append(quiet.measure(one))
    return row


def torch_decode_rate(model, prompt: list[int], new_tokens: int, repeats: int, quiet: Quiet) -> Row:
    """HF + torch greedy decode with ``past_key_values``, as ``generate`` does it; the
    prompt's cache is computed once and cropped back to it before each repeat."""
    import torch

    row = Row("decode", "torch", unit="tok/s")
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        past, first = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def one() -> float:
            extra = past.get_seq_length() - len(prompt)
            if extra:
                past.crop(-extra)  # transformers 5 crops by a negative count
            token, cache = first, past
            start = time.perf_counter()
            for _ in range(new_tokens):
                result = model(token, past_key_values=cache, use_cache=True)
                cache, token = result.past_key_values, result.logits[:, -1].argmax(-1, keepdim=True)
            return new_tokens / (time.perf_counter() - start)

        one()
        for _ in range(repeats):
            row.samples.append(quiet.measure(one))
    return row


def torch_prefill_time(model, prompt: list[int], repeats: int, quiet: Quiet) -> Row:
    import torch

    row = Row("prefill", "torch", unit="s")
    ids = torch.tensor([prompt])

    def one() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(ids, use_cache=True).logits[:, -1].argmax(-1)
            return time.perf_counter() - start

    one()
    for _ in range(repeats):
        row.samples.append(quiet.measure(one))
    return row


def engine_rows(engine: str, model, vocab: int, repeats: int, prompt: int, late: int, prefill: int,
                new: int, quiet: Quiet) -> dict[str, Row]:
    """Decode after ``prompt`` tokens, after ``late`` (0: skipped), and a prefill of ``prefill``:
    ``engine`` is ``torch`` (an HF model) or ours (a ``GPT2``)."""
    torch = engine == "torch"
    decode, first = (torch_decode_rate, torch_prefill_time) if torch else (decode_rate, prefill_time)
    tokens = [1 + t % (vocab - 1) for t in range(max(prompt, late, prefill))]
    rows = {"early": decode(model, tokens[:prompt], new, repeats, quiet)}
    if late:
        rows["late"] = decode(model, tokens[:late], new, repeats, quiet)
    rows["prefill"] = first(model, tokens[:prefill], repeats, quiet)
    return rows


def native_engines(backends: Sequence[Backend], formats: Sequence[str]) -> list[tuple[str, Backend, str]]:
    """(label, backend, format) for each backend and each format it keeps natively."""
    out = []
    for backend in backends:
        for fmt in formats:
            if fmt == "f32" or fmt in backend.weight_formats:
                out.append((backend.spec + ("" if fmt == "f32" else f" {fmt}"), backend, fmt))
    return out


def torch_missing() -> str | None:
    """Why HF transformers + torch cannot be the reference here, or None when they can."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install 'opswitch[test]')"
    return None
