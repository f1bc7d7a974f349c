"""llama.cpp (llama-cpp-python) on one GGUF file: decode after a short prompt, decode
late in the context, prefill; prints one JSON line.  Runs in llama.cpp's own
virtual environment and process (see side_by_side.py), greedy, argmax over
``llama_get_logits_ith(-1)`` as a user of the low-level API would."""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama, llama_get_logits_ith

# the same idle guard as `opswitch bench`, loaded by path (it needs only the standard library)
_spec = importlib.util.spec_from_file_location(
    "idle", Path(__file__).resolve().parents[1] / "opswitch" / "bench" / "idle.py")
benchmark = sys.modules["idle"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--late", type=int, default=900)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--idle-wait", type=float, default=10.0)
    p.add_argument("--mode", choices=("speed", "load", "greedy", "quantize"), default="speed",
                   help="speed: decode and prefill; load: load + first token and peak RSS of this process;"
                        " greedy: the prompt's last logits and --new-tokens greedy ids;"
                        " quantize: GGUF -> --out")
    p.add_argument("--out", help="quantize: the file to write (q4_0)")
    args = p.parse_args()
    if args.mode == "quantize":
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = args.threads
        if llama_cpp.llama_model_quantize(args.gguf.encode(), args.out.encode(), params) != 0:
            raise SystemExit("llama_model_quantize failed")
        print(json.dumps({"out": args.out}))
        return
    if args.mode == "load":
        import resource

        start = time.perf_counter()
        llm = Llama(args.gguf, n_ctx=1024, n_batch=512, n_threads=args.threads,
                    n_threads_batch=args.threads, verbose=False)
        loaded = time.perf_counter()
        llm.eval([1, 2, 3])
        first = time.perf_counter()
        print(json.dumps({"load": loaded - start, "first": first - start,
                          "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        return
    llm = Llama(args.gguf, n_ctx=1024, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    ctx, n_vocab = llm._ctx.ctx, llm.n_vocab()
    quiet = benchmark.Quiet(max_wait=args.idle_wait)
    tokens = [1 + t % (n_vocab - 1) for t in range(max(args.prompt_tokens, args.late, args.prefill))]

    def last() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))

    def decode_rate(prompt: list[int]) -> list[float]:
        llm.reset()
        llm.eval(prompt)
        first = last()

        def one() -> float:
            llm.n_tokens = len(prompt)  # eval drops the cache past n_tokens: a rewind
            token = first
            start = time.perf_counter()
            for _ in range(args.new_tokens):
                llm.eval([token])
                token = last()
            return args.new_tokens / (time.perf_counter() - start)

        one()
        return [quiet.measure(one) for _ in range(args.repeats)]

    def prefill() -> list[float]:
        def one() -> float:
            llm.reset()
            start = time.perf_counter()
            llm.eval(tokens[: args.prefill])
            last()
            return time.perf_counter() - start

        one()
        return [quiet.measure(one) for _ in range(args.repeats)]

    if args.mode == "greedy":
        llm.reset()
        llm.eval(tokens[: args.prompt_tokens])
        logits = np.ctypeslib.as_array(llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).tolist()
        ids = [last()]
        for _ in range(args.new_tokens - 1):
            llm.eval([ids[-1]])
            ids.append(last())
        print(json.dumps({"logits": logits, "ids": ids}))
        return
    early, late = decode_rate(tokens[: args.prompt_tokens]), decode_rate(tokens[: args.late])
    pre = prefill()
    r = quiet.report
    print(json.dumps({
        "early": statistics.median(early), "late": statistics.median(late), "prefill": statistics.median(pre),
        "samples": {"early": early, "late": late, "prefill": pre},
        "interference": [r.disturbed, r.repeats],
    }))


if __name__ == "__main__":
    main()
