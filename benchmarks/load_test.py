"""Load test for `opswitch serve`: many concurrent streaming clients, every answer checked.

    python benchmarks/load_test.py                       # starts its own server (demo model)
    python benchmarks/load_test.py --model gpt2 --clients 32 --requests 256
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --pid 1234   # a running server
    python benchmarks/load_test.py --scenario engine --shape gpt2         # prefix reuse, chunked prefill,
                                                                          # throughput, RSS (engine_load.py)

Sends the same mixed-length greedy requests twice: one after another (batch
of one), then from ``--clients`` concurrent clients; checks that no request
is lost or mixed up (each answer equals the single-request greedy output,
computed in this process with ``opswitch.load_model``), and prints a
Markdown table: p50/p99 time to first token and latency, aggregate tokens/s
of both runs, and the server's RSS before and after.  Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import engine_load  # beside this file: the engine scenarios and the one streaming client
import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("it is a truth universally acknowledged that a single man in possession of a good fortune must be"
         " in want of a wife however little known the feelings or views of such a man may be on his first"
         " entering a neighbourhood").split()


@dataclass
class Outcome:
    text: str = ""
    tokens: int = 0
    ttft: float = float("nan")
    latency: float = float("nan")
    error: str | None = None


def make_requests(n: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs of mixed lengths: 1..60 words, 8..64 new tokens."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, length = rng.randrange(len(WORDS)), rng.randint(1, 60)
        prompt = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(length))
        out.append((prompt.capitalize(), rng.randint(8, 64)))
    return out


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Outcome:
    got = await engine_load.stream(client, prompt, max_tokens, model)
    return Outcome(got.text, got.tokens, got.ttft, got.end - got.start, got.error)


async def run_all(url: str, model: str, requests: list[tuple[str, int]], clients: int,
                  headers: dict) -> tuple[list[Outcome], float]:
    """Every request, at most ``clients`` in flight; returns the outcomes and the wall time."""
    gate = asyncio.Semaphore(clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as client:
        async def gated(prompt: str, max_tokens: int) -> Outcome:
            async with gate:
                return await one(client, model, prompt, max_tokens)

        start = time.perf_counter()
        outcomes = await asyncio.gather(*(gated(p, m) for p, m in requests))
        return list(outcomes), time.perf_counter() - start


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def start_server(args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "opswitch", "serve", "--host", "127.0.0.1", "--port", "0",
               "--max-batch", str(args.max_batch), "--max-queue", str(max(args.requests, 256))]
    if args.model:
        command += ["--model", args.model, "--name", "model"]
    if args.backend:
        command += ["--backend", args.backend]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        print("  server:", line.rstrip(), file=sys.stderr)
        found = re.search(r"at (http://\S+)/v1 ", line)
        if found:
            return proc, found.group(1)
    raise SystemExit("the server did not start")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="the running server's process id, for its RSS")
    parser.add_argument("--model", help="model for the server and the check (default: the demo model)")
    parser.add_argument("--backend", help="backend for the server and the check")
    parser.add_argument("--api-key", default=os.environ.get("OPSWITCH_API_KEY"))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the in-process reference outputs")
    parser.add_argument("--scenario", choices=("mixed", "engine"), default="mixed",
                        help="mixed: the checked load test (default); engine: prefix reuse, chunked prefill,"
                             " throughput and RSS (see engine_load.py --help for its own flags)")
    args, rest = parser.parse_known_args()
    if args.scenario == "engine":
        # its own flags: every argument but the scenario goes to it
        argv = [a for a in sys.argv[1:] if a != "--scenario=engine"]
        at = argv.index("--scenario") if "--scenario" in argv else None
        return engine_load.main(argv if at is None else argv[:at] + argv[at + 2:])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    proc, url, pid = None, args.url, args.pid
    if url is None:
        proc, url = start_server(args)
        pid = proc.pid
    if not re.match(r"http://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$", url):
        raise SystemExit("load tests go to loopback only (127.0.0.1, localhost, [::1])")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
        requests = make_requests(args.requests, args.seed)
        # warm-up at full concurrency: the KV-cache pool keeps freed buffers for reuse, so its
        # high-water mark is reached here and RSS before/after shows growth, not the pool filling
        asyncio.run(run_all(url, model, make_requests(args.clients, args.seed + 1), args.clients, headers))
        rss_before = rss_mib(pid)
        print(f"{len(requests)} requests one after another...", file=sys.stderr)
        serial, serial_wall = asyncio.run(run_all(url, model, requests, 1, headers))
        print(f"the same {len(requests)} requests from {args.clients} concurrent clients...", file=sys.stderr)
        concurrent, wall = asyncio.run(run_all(url, model, requests, args.clients, headers))
        rss_after = rss_mib(pid)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)

    failed = [o.error for o in serial + concurrent if o.error]
    mismatched = sum(a.text != b.text for a, b in zip(serial, concurrent))
    wrong = None
    if not args.no_check:
        import opswitch

        print("reference outputs in this process...", file=sys.stderr)
        lm = opswitch.load_model(args.model, backend=args.backend)
        expected = [lm.generate(p, max_new_tokens=m, temperature=0) for p, m in requests]
        wrong = sum(o.text != e for o, e in zip(concurrent, expected))
    tokens = sum(o.tokens for o in concurrent)
    ttft = [o.ttft for o in concurrent if o.ttft == o.ttft]
    latency = [o.latency for o in concurrent]
    serial_tokens = sum(o.tokens for o in serial)
    rows = [
        ("requests (concurrent clients)", f"{len(requests)} ({args.clients})"),
        ("lost or failed", f"{len(failed)}" + (f" (first: {failed[0]})" if failed else "")),
        ("answers differing from the single-request greedy output",
         f"{wrong} of {len(requests)}" if wrong is not None else "not checked (--no-check)"),
        ("answers differing between the serial and concurrent runs", f"{mismatched}"),
        ("tokens generated", f"{tokens}"),
        ("time to first token p50 / p99", f"{statistics.median(ttft) * 1000:.0f} ms /"
                                          f" {percentile(ttft, 99) * 1000:.0f} ms"),
        ("latency p50 / p99", f"{statistics.median(latency):.2f} s / {percentile(latency, 99):.2f} s"),
        ("aggregate tokens/s, concurrent", f"{tokens / wall:.1f} ({wall:.1f} s wall)"),
        ("aggregate tokens/s, one after another", f"{serial_tokens / serial_wall:.1f} ({serial_wall:.1f} s"
                                                   " wall)"),
        ("speed-up", f"{(tokens / wall) / (serial_tokens / serial_wall):.2f}x"),
        ("server RSS before / after", f"{rss_before:.0f} MiB / {rss_after:.0f} MiB"
         if rss_before is not None else "unknown (pass --pid)"),
    ]
    print("\n| | |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 1 if failed or mismatched or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
