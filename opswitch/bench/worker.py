"""The process one engine runs in: ``python -m opswitch.bench.worker engine|load ...`` -> one JSON line.

Each engine gets a fresh process so that torch's, numba's and OpenBLAS's
thread pools never share one (which halved some rates when they did), and so
that load time and peak memory are the model's, not the parent's.
``opswitch.bench.subprocess_engine`` starts it and reads the line.

    engine ENGINE MODEL SPEC FMT REPEATS PROMPT LATE PREFILL NEW IDLE_WAIT
        ENGINE is ``torch`` or ``ours``; MODEL a directory or hub id, ``shape:NAME``
        for random weights of a preset, ``tiny`` for the --quick model; FMT is a
        weight format, or ``FMT:KV`` for a KV-cache format other than f32
    load ENGINE PATH FMT BACKEND THREADS
        load time, load + first token and peak RSS of a saved directory
"""

from __future__ import annotations

import json
import os
import sys
import time


def _peak_rss() -> int:
    """Peak RSS of this process image (ru_maxrss would include the parent's, kept over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def load_main(engine: str, path: str, fmt: str, backend: str, threads: str) -> dict:
    """Load time, load + first token, peak RSS and the libraries' RSS before loading."""
    if engine == "torch":
        import torch
        import transformers

        torch.set_num_threads(int(threads))
    else:
        import opswitch
        from opswitch.core.registry import get_registry

        get_registry().select(backend)  # probe and import the backend's libraries before the clock
    base = _peak_rss()
    start = time.perf_counter()
    if engine == "torch":
        with torch.inference_mode():
            model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
            loaded = time.perf_counter()
            model(torch.tensor([[1, 2, 3]])).logits[0, -1].argmax()
    else:
        lm = opswitch.load_model(path, backend=backend, weights=None if fmt == "file" else fmt)
        loaded = time.perf_counter()
        lm.model.forward([1, 2, 3])
    end = time.perf_counter()
    return {"load": loaded - start, "first": end - start, "peak": _peak_rss(), "base": base}


def engine_main(engine: str, model_spec: str, spec: str, fmt: str, *numbers: str) -> dict:
    """Decode early and late and prefill: each figure's median and samples, and interference."""
    from opswitch.bench.engines import engine_rows
    from opswitch.bench.idle import Quiet

    repeats, prompt, late, prefill, new = (int(v) for v in numbers[:5])
    quiet = Quiet(max_wait=float(numbers[5]))
    config, model = _engine_model(engine, model_spec, spec, fmt)
    rows = engine_rows(engine, model, config.vocab_size, repeats, prompt, late, prefill, new, quiet)
    out: dict = {k: {"median": r.median, "samples": r.samples} for k, r in rows.items()}
    out["interference"] = [quiet.report.disturbed, quiet.report.repeats]
    return out


def _engine_model(engine: str, model_spec: str, spec: str, fmt: str):
    """(config, model): an HF model for ``torch`` (random of the shape, or the saved one), else ours."""
    from opswitch.bench.models import TINY, hf_shape, random_hf_model, random_params
    from opswitch.core.registry import get_registry
    from opswitch.model.config import PRESETS
    from opswitch.model.gpt2 import GPT2

    if engine == "torch":
        import torch

        torch.set_num_threads(int(os.environ.get("OPSWITCH_NUM_THREADS", os.cpu_count() or 1)))
    params = None
    if model_spec.lower().endswith(".gguf") and engine != "torch":  # fmt "file": as the file stores it
        from opswitch.model.gguf_load import load_gguf

        gguf = load_gguf(model_spec)
        backend = get_registry().select(spec).backend
        return gguf.config, GPT2(gguf.config, gguf.params, backend, weights=None if fmt == "file" else fmt)
    if model_spec == "tiny":
        config = TINY
    elif model_spec.startswith("shape:"):
        config = PRESETS[model_spec[6:]]
    else:
        from opswitch.model.hub import resolve_model
        from opswitch.model.weights import load_gpt2

        path = resolve_model(model_spec)
        config, params = load_gpt2(path)
        if engine == "torch":
            import transformers

            return config, transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    if engine == "torch":
        return config, random_hf_model(0, **hf_shape(config))
    backend = get_registry().select(spec).backend
    weights, _, kv = fmt.partition(":")
    return config, GPT2(config, random_params(config) if params is None else params, backend,
                        weights=weights, kv_cache=kv or "f32")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("engine", "load"):
        print("usage: python -m opswitch.bench.worker engine|load ARGS...", file=sys.stderr)
        return 2
    result = (engine_main if argv[0] == "engine" else load_main)(*argv[1:])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
