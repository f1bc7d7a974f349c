"""Decode on a busy machine: opswitch and llama.cpp beside another CPU-bound process.

A user's machine is rarely idle.  This starts ``--busy`` processes that each keep
one core busy (a Python loop, as a build or a second job would), then runs every
engine at the default thread count (one per core) and at one thread, in its own
process, interleaved over ``--rounds``, and prints each engine's rates, how the
default count compares with one thread, and ours against llama.cpp in the same
contended minutes.  The load is stopped when the script ends, however it ends.

    python benchmarks/busy_machine.py --llama-python /path/to/llama-venv/bin/python \\
        --llama-src /path/to/llama_cpp_python-0.3.36
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from side_by_side import HERE, ROOT, convert, make_model, medians, run_json

SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def start_load(n: int, seconds: float) -> list[subprocess.Popen]:
    """``n`` processes, each a busy loop for at most ``seconds`` (they end on their own too)."""
    return [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)]) for _ in range(n)]


def stop_load(load: list[subprocess.Popen]) -> None:
    for proc in load:
        proc.kill()
    for proc in load:
        proc.wait()


def decode_rate(engine: tuple[str, ...], threads: int, args, model: Path) -> float | str:
    """One engine's median early-decode rate at ``threads``, or its error line."""
    from opswitch.bench.subprocess_engine import run_engine

    env = dict(os.environ, OPSWITCH_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    repeats, prompt = args.repeats, args.prompt_tokens
    numbers = (repeats, prompt, prompt + 8, prompt, args.new_tokens, 0.0)  # late and prefill: short
    if engine[0] == "llama":
        flags = ("--repeats", "--prompt-tokens", "--late", "--prefill", "--new-tokens", "--idle-wait")
        command = [args.llama_python, str(HERE / "llama_cpp_engine.py"), engine[2], "--threads", str(threads)]
        r = run_json(command + [str(v) for pair in zip(flags, numbers) for v in pair], env)
    else:
        r = medians(run_engine("ours", str(model), engine[1], engine[2], *numbers, env=env))
    return r["early"] if "error" not in r else r["error"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-python", help="python of a venv with llama-cpp-python==0.3.36 (else no llama)")
    p.add_argument("--llama-src", type=Path, help="the unpacked llama-cpp-python sdist (for the converter)")
    p.add_argument("--shape", default="gpt2")
    p.add_argument("--ours", default="cpu:f32,cpu:int8,blas:f32", help="backend:format pairs of ours")
    p.add_argument("--llama-types", default="f32,q8_0")
    p.add_argument("--busy", type=int, default=1, help="CPU-bound processes to run beside (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="the default count (one per core)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians over them)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "opswitch-bench")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work, args.shape)
    engines = [("ours", *pair.split(":", 1)) for pair in args.ours.split(",")]
    if args.llama_python:
        engines += [("llama", t, str(convert(model, args.llama_src, t))) for t in args.llama_types.split(",")]
    counts = sorted({args.threads, 1}, reverse=True)
    rates: dict[tuple, list] = {(e, n): [] for e in engines for n in counts}

    from opswitch.bench.machine import cpu_description

    load = start_load(args.busy, seconds=3600)
    started = time.monotonic()
    try:
        time.sleep(1.0)  # let the load reach its cores
        for _ in range(args.rounds):
            for engine in engines:
                for n in counts:
                    rates[(engine, n)].append(decode_rate(engine, n, args, model))
    finally:
        stop_load(load)
    minutes = (time.monotonic() - started) / 60

    print(f"{args.shape} shape, random weights, batch 1, greedy decode after {args.prompt_tokens} tokens;"
          f" {args.busy} CPU-bound process(es) running beside for the whole run ({minutes:.1f} min);"
          f" medians of {args.rounds} interleaved rounds x {args.repeats} repeats")
    print(f"CPU: {cpu_description()}")
    print(f"| engine | tok/s at {args.threads} threads (default) | tok/s at 1 thread | default / 1 thread |")
    print("|---|---|---|---|")
    best: dict[str, float] = {}
    for engine in engines:
        name = f"opswitch {engine[1]} {engine[2]}" if engine[0] == "ours" else f"llama.cpp {engine[1]}"
        cells = []
        for n in counts:
            good = [r for r in rates[(engine, n)] if isinstance(r, float)]
            cells.append(statistics.median(good) if good else None)
            if not good:
                print(f"| {name} | failed at {n} threads: {rates[(engine, n)][0]} |")
                break
        else:
            ratio = cells[0] / cells[-1] if len(cells) > 1 else 1.0
            print(f"| {name} | {cells[0]:.1f} | {cells[-1]:.1f} | {ratio:.2f} |")
            best[name] = cells[0]
    pairs = [("opswitch cpu f32", "llama.cpp f32"), ("opswitch cpu int8", "llama.cpp q8_0")]
    for ours, theirs in pairs:
        if ours in best and theirs in best:
            print(f"{ours} / {theirs} at the default thread count, loaded: {best[ours] / best[theirs]:.2f}x")


if __name__ == "__main__":
    main()
