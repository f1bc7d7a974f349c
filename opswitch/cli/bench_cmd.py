"""``opswitch bench``: our backends beside HF transformers + torch, in one run.

Prints medians and ratios against torch (the reference a user would pick
otherwise), for decode tokens/s, prefill time and, with ``--ops``, the
GEMV/GEMM shapes of the model in GFLOP/s and GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from opswitch.core.errors import OpswitchError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark backends beside HF transformers + torch (CPU)")
    p.add_argument("--model", metavar="PATH_OR_NAME",
                   help="a model directory or hub id (default: random weights of --shape)")
    p.add_argument("--shape", default="gpt2", metavar="PRESET",
                   help="gpt2, distilgpt2, gpt2-medium, gpt2-large, gpt2-xl (default gpt2)")
    p.add_argument("--backend", metavar="NAME[,NAME...]", help="backends to run (default: every available)")
    p.add_argument("--prompt-tokens", type=int, default=64, metavar="N")
    p.add_argument("--new-tokens", type=int, default=32, metavar="N")
    p.add_argument("--repeats", type=int, default=5, metavar="N")
    p.add_argument("--ops", action="store_true", help="also time the model's GEMV/GEMM shapes per op")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model benchmark")
    p.add_argument("--no-reference", action="store_true", help="skip HF transformers + torch")
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
    chosen = []
    for name in spec.split(","):
        chosen.append(registry.select(name.strip()).backend)  # unknown/unavailable: a clear error
    return chosen


def _load(args):
    from opswitch.cli.benchmark import random_gpt2_params
    from opswitch.model.config import PRESETS
    from opswitch.model.hub import resolve_model
    from opswitch.model.weights import load_gpt2

    if args.model:
        return load_gpt2(resolve_model(args.model))
    if args.shape not in PRESETS:
        raise OpswitchError(f"unknown --shape {args.shape!r}: choose one of {', '.join(PRESETS)}")
    config = PRESETS[args.shape]
    return config, random_gpt2_params(config)


def _torch_available() -> str | None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install 'opswitch[test]')"
    return None


def run(args: argparse.Namespace) -> int:
    from opswitch.cli.benchmark import (
        Quiet,
        bench_model_ours,
        bench_model_torch,
        bench_op_ours,
        bench_op_torch,
        op_shapes,
    )
    from opswitch.core.registry import get_registry
    from opswitch.model.gpt2 import GPT2

    for flag in ("prompt_tokens", "new_tokens", "repeats"):
        if getattr(args, flag) < 1 + (flag == "new_tokens"):
            raise OpswitchError(f"--{flag.replace('_', '-')} must be at least {1 + (flag == 'new_tokens')}")
    if args.json:
        _check_writable(args.json)
    backends = _backends(args.backend)
    config, params = _load(args)
    if args.prompt_tokens + args.new_tokens > config.n_positions:
        raise OpswitchError(f"prompt + new tokens exceed the model's context of {config.n_positions}")
    no_torch = None if not args.no_reference else "skipped (--no-reference)"
    no_torch = no_torch or _torch_available()
    if no_torch is None:
        import torch

        torch.set_num_threads(int(os.environ.get("OPSWITCH_NUM_THREADS", os.cpu_count() or 1)))
    quiet = Quiet(max_wait=max(args.idle_wait, 0.0))
    prompt = [int(t) for t in range(1, args.prompt_tokens + 1)]
    print(f"opswitch bench: {args.model or args.shape} shape ({config.n_params / 1e6:.1f}M params), "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"{args.repeats} repeats; medians; ratios against HF transformers + torch (CPU)")
    print(f"machine: {os.cpu_count()} CPUs" + ("" if no_torch else f"; torch {torch.__version__}, "
                                                f"{torch.get_num_threads()} threads"))
    if args.batch:
        from opswitch.cli.batch_bench import run_batch

        return run_batch(args, backends, config, params, no_torch, quiet)
    rows = []
    if not args.no_model:
        decode, prefill = [], []
        if not no_torch:
            p, d = bench_model_torch(config, prompt, args.new_tokens, args.repeats, quiet)
            prefill.append(p)
            decode.append(d)
        for backend in backends:
            model = GPT2(config, params, backend)
            p, d = bench_model_ours(model, prompt, args.new_tokens, args.repeats, quiet)
            prefill.append(p)
            decode.append(d)
            del model
        rows += decode + prefill
        _print_ratio_table("decode, tokens/s (higher is better)", decode, higher_better=True)
        _print_ratio_table(f"prefill of {args.prompt_tokens} tokens, ms (lower is better)", prefill,
                           higher_better=False, scale=1000)
    if args.ops:
        shapes = op_shapes(config.n_embd, config.d_ff, config.vocab_size, args.prompt_tokens)
        op_rows = []
        for label, m, k, n, tb in shapes:
            if not no_torch:
                op_rows.append(bench_op_torch(label, m, k, n, tb, args.repeats, quiet))
            for backend in backends:
                ops = get_registry().bind(backend)
                op_rows.append(bench_op_ours(backend, ops, label, m, k, n, tb, args.repeats, quiet))
        rows += op_rows
        _print_op_table(op_rows, shapes)
    if no_torch:
        print(f"\nreference: {no_torch}")
    print("\n" + quiet.report.summary())
    if args.json:
        samples = [{"what": r.what, "impl": r.impl, "unit": r.unit, "median": r.median,
                    "samples": r.samples} for r in rows]
        try:
            with open(args.json, "w") as f:
                json.dump(samples, f, indent=2)
        except OSError as exc:
            raise OpswitchError(
                f"cannot write --json {args.json}: {exc.strerror or exc} (the results are printed above)"
            ) from None
    return 0


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


def _print_ratio_table(title: str, rows, higher_better: bool, scale: float = 1.0) -> None:
    print(f"\n{title}")
    base = next((r.median for r in rows if r.impl == "torch"), None)
    for r in rows:
        value = r.median * scale
        ratio = ""
        if base:
            ratio = f"{(r.median / base if higher_better else base / r.median):5.2f}x torch"
        label = "torch (HF transformers)" if r.impl == "torch" else r.impl
        print(f"  {label:<24} {value:10.1f}   {ratio}")
    if base:
        print("  (ratio > 1 means faster than torch)")


def _print_op_table(rows, shapes) -> None:
    impls = list(dict.fromkeys(r.impl for r in rows))
    print("\nops, GFLOP/s (and GB/s of weights read for decode shapes), median")
    print("  " + f"{'shape':<34}" + "".join(f"{i:>18}" for i in impls))
    for label, m, k, n, _ in shapes:
        cells = []
        for impl in impls:
            row = next((r for r in rows if r.what == label and r.impl == impl), None)
            if row is None:
                cells.append(f"{'-':>18}")
                continue
            gflops = row.work / row.median / 1e9
            cell = f"{gflops:.1f}" + (f" ({k * n * 4 / row.median / 1e9:.1f} GB/s)" if m == 1 else "")
            cells.append(f"{cell:>18}")
        print("  " + f"{label + f' {m}x{k}x{n}':<34}" + "".join(cells))
    sys.stdout.flush()
