"""``opswitch bench``: our backends beside HF transformers + torch, in one run.

Prints, with medians and ratios (the machine is shared: each repeat waits
for an idle machine and the interference seen is reported):

* the physical limit: DRAM bandwidth measured now, and the decode rate it
  allows for each weight format (bandwidth ÷ bytes read per token);
* decode after a short prompt and late in the context, prefill, each with
  its share of the limit or its ratio to torch;
* load time, first token and peak memory of a saved directory (fresh process);
* tokenizer encode MB/s against ``GPT2TokenizerFast``;
* ``--ops``: the model's GEMV/GEMM shapes (weights from DRAM, as in a model);
* ``--profile``: time per op of a prefill and a decode step, fallbacks marked.

``--quick`` runs all of it on a tiny model once, as a smoke test.

The measuring is ``opswitch.bench``'s; this module parses the flags and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from opswitch.bench.engines import native_engines, torch_missing
from opswitch.bench.idle import Quiet
from opswitch.bench.machine import cpu_description, kv_bytes_read, measure_bandwidth, weight_bytes_per_token
from opswitch.bench.models import bench_model
from opswitch.cli.model_args import add_kv_cache_argument, add_threads_argument
from opswitch.core.errors import OpswitchError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark backends beside HF transformers + torch (CPU)")
    p.add_argument("--model", metavar="PATH_OR_NAME",
                   help="a model directory or hub id (default: random weights of --shape)")
    p.add_argument("--shape", default="gpt2", metavar="PRESET",
                   help="gpt2, distilgpt2, gpt2-medium, gpt2-large, gpt2-xl (default gpt2)")
    p.add_argument("--backend", metavar="NAME[,NAME...]", help="backends to run (default: every available)")
    p.add_argument("--weights", default="f32", metavar="FMT[,FMT...]",
                   help="weight formats to run where a backend keeps them natively: f32, f16, bf16, int8,"
                        " q8_0, q4_0 or all (default f32)")
    p.add_argument("--prompt-tokens", type=int, default=32, metavar="N", help="prompt before decode (32)")
    p.add_argument("--new-tokens", type=int, default=32, metavar="N", help="tokens decoded per repeat (32)")
    p.add_argument("--late", type=int, default=900, metavar="N",
                   help="also decode after N tokens of context (default 900; 0 = skip)")
    p.add_argument("--prefill", type=int, default=512, metavar="N", help="prefill length (default 512)")
    p.add_argument("--repeats", type=int, default=5, metavar="N")
    add_kv_cache_argument(p)
    add_threads_argument(p)
    p.add_argument("--ops", action="store_true", help="also time the model's GEMV/GEMM shapes per op")
    p.add_argument("--profile", action="store_true", help="time per op of a prefill and a decode step")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model benchmarks")
    p.add_argument("--no-load", action="store_true", help="skip load time and peak memory")
    p.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer benchmark")
    p.add_argument("--text", metavar="FILE", help="text for the tokenizer benchmark (default: stdlib source)")
    p.add_argument("--no-reference", action="store_true", help="skip HF transformers + torch")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny model, one repeat, no waiting")
    p.add_argument("--idle-wait", type=float, default=10.0, metavar="SECONDS",
                   help="longest wait for an idle machine before each repeat (default 10)")
    p.add_argument("--json", metavar="FILE", help="also write every sample as JSON to FILE")
    p.add_argument("--batch", metavar="SIZES",
                   help="instead: aggregate decode tok/s of batched generation at these batch sizes"
                   " (e.g. 1,4,16,64), beside HF's batched generate")
    p.set_defaults(run=run)


def _backends(spec: str | None):
    from opswitch.core.registry import get_registry

    registry = get_registry()
    if not spec:
        return [registry.backend(n) for n in registry.available()]
    return [registry.select(name.strip()).backend for name in spec.split(",")]


def _formats(text: str) -> list[str]:
    from opswitch.core.formats import FORMATS, check_format

    return list(FORMATS) if text == "all" else [check_format(f.strip()) for f in text.split(",")]


def _quick(args: argparse.Namespace) -> None:
    args.prompt_tokens, args.new_tokens, args.repeats = 8, 4, 1
    args.late, args.prefill, args.idle_wait = min(args.late, 64), 32, 0.0
    args.weights = "all"


def run(args: argparse.Namespace) -> int:
    if args.quick:
        _quick(args)
    for flag in ("prompt_tokens", "new_tokens", "repeats", "prefill"):
        if getattr(args, flag) < 1:
            raise OpswitchError(f"--{flag.replace('_', '-')} must be at least 1")
    formats = _formats(args.weights)
    if args.json:
        _check_writable(args.json)
    backends = _backends(args.backend)
    config, params = bench_model(args.model, args.shape, args.quick)
    if args.prompt_tokens + args.new_tokens > config.n_positions:
        raise OpswitchError(f"--prompt-tokens + --new-tokens exceed the context of {config.n_positions}")
    # late decode and prefill follow a small model's context rather than fail on it
    args.late = min(args.late, config.n_positions - args.new_tokens)
    args.prefill = min(args.prefill, config.n_positions)
    threads = int(os.environ.get("OPSWITCH_NUM_THREADS", os.cpu_count() or 1))
    no_torch = "skipped (--no-reference)" if args.no_reference else torch_missing()
    if no_torch is None:
        import torch

        torch.set_num_threads(threads)
    quiet = Quiet(max_wait=max(args.idle_wait, 0.0))
    print(f"opswitch bench: {args.model or ('tiny (--quick)' if args.quick else args.shape)} "
          f"({config.n_params / 1e6:.1f}M params), {args.repeats} repeats, medians; "
          f"{threads} threads (OPSWITCH_NUM_THREADS); KV cache {args.kv_cache}"
          + ("" if no_torch else f"; torch {torch.__version__}"))
    print(f"CPU: {cpu_description()}")
    if args.quick:
        print("smoke run (--quick): a tiny model that fits in cache, one repeat; its rates and ratios"
              " say nothing about speed (run without --quick to measure)")
    if args.batch:
        return _batch_table(args, backends, config, params, no_torch, quiet)
    rows: list = []
    bw = measure_bandwidth(quiet, args.repeats, mbytes=16 if args.quick else 256)
    print(f"memory bandwidth (DRAM, {bw.how}, {bw.threads} threads): read {bw.read / 1e9:.1f} GB/s, "
          f"triad {bw.triad / 1e9:.1f} GB/s")
    if not args.no_model:
        rows += _model_tables(args, config, params, backends, formats, bw, no_torch, quiet)
    if args.profile:
        _profiles(args, config, params, backends, formats)
    if args.ops:
        rows += _op_table(args, config, backends, no_torch, quiet)
    if not args.no_load:
        _load_table(args, config, params, backends, formats, no_torch, threads)
    if not args.no_tokenizer:
        _tokenizer_table(args, quiet)
    return _finish(args, quiet, rows, no_torch)


def _write_json(path: str, rows: list) -> None:
    try:
        with open(path, "w") as f:
            json.dump([row.as_json() for row in rows], f, indent=2)
    except OSError as exc:
        raise OpswitchError(
            f"cannot write --json {path}: {exc.strerror or exc} (the results are printed above)"
        ) from None


def _check_writable(path: str) -> None:
    """Refuse an unwritable --json FILE before a run of minutes, not after it."""
    from opswitch.core.files import not_a_file

    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise OpswitchError(f"cannot write --json {path}: {parent} is not a directory; create it first")
    kind = not_a_file(target)
    if kind not in (None, "missing"):
        raise OpswitchError(f"cannot write --json {path}: it is {kind}, not a file; choose another path")
    if not os.access(target if kind is None else parent, os.W_OK):
        raise OpswitchError(f"cannot write --json {path}: permission denied; choose another path")


def _model_tables(args, config, params, backends, formats, bw, no_torch, quiet) -> list:
    """Each engine in its own process (torch's, numba's and OpenBLAS's pools never share
    one, which halved some rates when they did); the same weights in each."""
    from opswitch.bench.subprocess_engine import measure_engines

    model_spec = "tiny" if args.quick else (args.model or f"shape:{args.shape}")
    engines = [] if no_torch else [("torch", "torch", "", "f32")]
    engines += [(label, "ours", b.spec, fmt) for label, b, fmt in native_engines(backends, formats)]
    results, (disturbed, repeats) = measure_engines(
        engines, model_spec, args.repeats, args.prompt_tokens, args.late, args.prefill, args.new_tokens,
        args.idle_wait, on_failure=lambda label, error: print(f"  {_name(label)}: failed: {error}"),
        kv_cache=args.kv_cache)
    quiet.report.disturbed += disturbed
    quiet.report.repeats += repeats

    def limit(fmt: str, position: int, label: str = "") -> float:
        kv = "f32" if label == "torch" else args.kv_cache  # torch keeps its own f32 cache
        return bw.read / (weight_bytes_per_token(config, fmt) + kv_bytes_read(config, position, kv))

    print("\ndecode limit = read bandwidth / bytes read per token (weights + KV cache):")
    for fmt in dict.fromkeys(r["fmt"] for r in results.values()):
        print(f"  {fmt:<5} {weight_bytes_per_token(config, fmt) / 1e6:7.1f} MB/token   "
              f"limit {limit(fmt, args.prompt_tokens):7.1f} tok/s at {args.prompt_tokens}"
              + (f", {limit(fmt, args.late):.1f} at {args.late}" if args.late else ""))
    base = results.get("torch")
    print(f"\ndecode after {args.prompt_tokens} tokens, tok/s (higher is better)")
    print(f"  {'engine':<24} {'tok/s':>8} {'x torch':>8} {'of limit':>9}")
    for label, r in results.items():
        v = r["early"].median
        ratio = f"{v / base['early'].median:8.2f}" if base else f"{'-':>8}"
        print(f"  {_name(label):<24} {v:8.1f} {ratio} {v / limit(r['fmt'], args.prompt_tokens, label):9.0%}")
    if args.late:
        print(f"\ndecode after {args.late} tokens, tok/s")
        own = f"x own at {args.prompt_tokens}"
        print(f"  {'engine':<24} {'tok/s':>8} {'x torch':>8} {'of limit':>9} {own:>12}")
        for label, r in results.items():
            v = r["late"].median
            ratio = f"{v / base['late'].median:8.2f}" if base else f"{'-':>8}"
            print(f"  {_name(label):<24} {v:8.1f} {ratio} {v / limit(r['fmt'], args.late, label):9.0%}"
                  f" {v / r['early'].median:12.2f}")
    print(f"\nprefill of {args.prefill} tokens, ms (lower is better)")
    print(f"  {'engine':<24} {'ms':>8} {'x torch':>8}")
    for label, r in results.items():
        v = r["prefill"].median
        ratio = f"{base['prefill'].median / v:8.2f}" if base else f"{'-':>8}"
        print(f"  {_name(label):<24} {v * 1000:8.1f} {ratio}")
    if base:
        print("  (x torch > 1 means faster than HF transformers + torch)")
    sys.stdout.flush()
    return [row for r in results.values() for row in (r["early"], r["late"], r["prefill"]) if row]


def _name(label: str) -> str:
    return "torch (HF transformers)" if label == "torch" else label


def _profiles(args, config, params, backends, formats) -> None:
    from opswitch.bench.profile import profile_model
    from opswitch.model.gpt2 import GPT2

    prompt = [1 + t % (config.vocab_size - 1) for t in range(args.prefill)]
    for label, backend, fmt in native_engines(backends, formats):
        model = GPT2(config, params, backend, weights=fmt)
        profile_model(model, prompt, 2)  # warm-up: compile (every kernel the run uses), allocate
        prefill, decode, sampling = profile_model(model, prompt)
        print(f"\nprofile: {label} (fallback ops marked *)")
        for prof in (prefill, decode):
            per_call = prof.total / prof.calls
            print(f"  {prof.what}: {per_call * 1000:.2f} ms")
            timed = 0.0
            for op, times in sorted(prof.per_op.items(), key=lambda kv: -sum(kv[1])):
                t = sum(times) / prof.calls
                timed += t
                mark = "*" if op in model.fallbacks else " "
                print(f"    {op + mark:<18} {t * 1000:9.3f} ms {t / per_call:6.1%}  "
                      f"({len(times) // prof.calls} calls)")
            rest = per_call - timed
            print(f"    {'(outside ops)':<18} {rest * 1000:9.3f} ms {rest / per_call:6.1%}")
        step = decode.total / decode.calls
        print(f"  sampling (top-k 40, top-p 0.9): {sampling * 1000:.3f} ms, "
              f"{sampling / (step + sampling):.1%} of a decode step")
        del model


def _op_table(args, config, backends, no_torch, quiet) -> list:
    from opswitch.bench.ops import bench_op_ours, bench_op_torch, op_shapes
    from opswitch.core.registry import get_registry

    shapes = op_shapes(config.n_embd, config.d_ff, config.vocab_size, args.prefill)
    rows = []
    for backend in backends:  # ours first: torch's thread pool, once started, spins beside ours
        ops = get_registry().bind(backend)
        for label, m, k, n, tb in shapes:
            rows.append(bench_op_ours(backend, ops, label, m, k, n, tb, args.repeats, quiet))
    for label, m, k, n, tb in [] if no_torch else shapes:
        rows.append(bench_op_torch(label, m, k, n, tb, args.repeats, quiet))
    impls = list(dict.fromkeys(r.impl for r in rows))
    print("\nops, GFLOP/s; for decode (GEMV) shapes also GB/s of weights, read from DRAM"
          " (copies cycled past the last-level cache, as in a model)")
    print("  " + f"{'shape':<34}" + "".join(f"{i:>20}" for i in impls))
    for label, m, k, n, _ in shapes:
        cells = []
        for impl in impls:
            row = next((r for r in rows if r.what == label and r.impl == impl), None)
            if row is None:
                cells.append(f"{'-':>20}")
                continue
            cell = f"{row.work / row.median / 1e9:.1f}"
            if m == 1:
                cell += f" ({k * n * 4 / row.median / 1e9:.1f} GB/s)"
            cells.append(f"{cell:>20}")
        print("  " + f"{label + f' {m}x{k}x{n}':<34}" + "".join(cells))
    sys.stdout.flush()
    return rows


def _load_table(args, config, params, backends, formats, no_torch, threads) -> None:
    from opswitch.bench.subprocess_engine import load_and_first_token
    from opswitch.model.weights import save_gpt2

    print("\nload + first token of a saved safetensors directory (fresh process each; peak RSS"
          " includes the interpreter and libraries, 'libs' is the RSS before loading)")
    print(f"  {'engine':<24} {'load s':>7} {'+1st tok s':>10} {'peak MB':>8} {'libs MB':>8}"
          f" {'weights MB':>10} {'peak/weights':>12} {'(peak-libs)/w':>13}")
    with tempfile.TemporaryDirectory() as directory:
        save_gpt2(directory, config, params, overwrite=True)
        runs = [] if no_torch else [("torch", "torch", "f32", "")]
        runs += [(label, "opswitch", fmt, b.spec) for label, b, fmt in native_engines(backends, formats)]
        for label, engine, fmt, spec in runs:
            try:
                r = load_and_first_token(engine, directory, fmt, spec, threads)
            except Exception as exc:  # a broken engine is a row, not a crash
                print(f"  {_name(label):<24} failed: {exc}")
                continue
            w = weight_bytes_per_token(config, fmt) + config.n_positions * config.n_embd * 4
            print(f"  {_name(label):<24} {r['load']:7.2f} {r['first']:10.2f} {r['peak'] / 1e6:8.0f}"
                  f" {r['base'] / 1e6:8.0f} {w / 1e6:10.0f} {r['peak'] / w:12.2f}"
                  f" {(r['peak'] - r['base']) / w:13.2f}")
    sys.stdout.flush()


def _tokenizer_table(args, quiet) -> None:
    from opswitch.bench.tokenizer import compare_tokenizers, real_text

    text, source = real_text(args.text, mbytes=0.05 if args.quick else 4.0)
    try:
        t = compare_tokenizers(text, source, args.repeats, quiet)
    except ImportError as exc:
        print(f"\ntokenizer: skipped ({exc.name} is not installed: pip install 'opswitch[test]')")
        return
    ours, theirs = t.rates["opswitch"], t.rates["GPT2TokenizerFast"]
    print(f"\ntokenizer encode, {t.mb:.1f} MB of {t.source}: opswitch {ours:.2f} MB/s, "
          f"GPT2TokenizerFast {theirs:.2f} MB/s ({ours / theirs:.2f}x); "
          f"same ids on the first 200 kB: {t.same}")
    sys.stdout.flush()


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise OpswitchError(f"--batch takes batch sizes such as 1,4,16,64, got {text!r}")
    return sizes


def _batch_table(args, backends, config, params, no_torch: str | None, quiet: Quiet) -> int:
    """The --batch table: one row per batch size, one column per implementation."""
    from opswitch.bench.batch import batch_models, batch_rows

    sizes = _batch_sizes(args.batch)
    hf_model, models = batch_models(config, params, backends, with_torch=not no_torch)
    impls = (["torch"] if hf_model is not None else []) + [m.backend.name for m in models]
    print(f"\nbatched decode, aggregate tokens/s over {args.new_tokens - 1} decode steps after a"
          f" {args.prompt_tokens}-token prefill (higher is better; ratio to torch in brackets)")
    print("  " + f"{'batch':>5}" + "".join(f"{name:>20}" for name in impls))
    rows = []
    for size, line in batch_rows(sizes, config.vocab_size, hf_model, models, args.prompt_tokens,
                                 args.new_tokens, args.repeats, quiet):
        base = line[0].median if hf_model is not None else None
        cells = [f"{r.median:.1f}" + (f" ({r.median / base:.2f}x)" if base and r.impl != "torch" else "")
                 for r in line]
        print("  " + f"{size:>5}" + "".join(f"{c:>20}" for c in cells), flush=True)
        rows += line
    return _finish(args, quiet, rows, no_torch)


def _finish(args, quiet, rows, no_torch) -> int:
    """What every bench run ends with: why the reference did not run, the interference
    seen, and the JSON file when asked for."""
    if no_torch:
        print(f"\nreference: {no_torch}")
    print("\n" + quiet.report.summary())
    if args.json:
        _write_json(args.json, rows)
    return 0
