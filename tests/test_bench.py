"""``opswitch bench --quick`` end to end: every section runs and prints; no speed claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_error_line

from opswitch.cli.main import main


@pytest.mark.slow
def test_quick_bench_runs_every_section(capsys, tmp_path, monkeypatch) -> None:
    # run from a folder that holds a folder named opswitch (the parent of a clone):
    # the engines' child processes must still import the real package
    decoy = tmp_path / "opswitch"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy opswitch folder was imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPSWITCH_NUM_THREADS", "2")  # --threads sets it: restored after the test
    args = ["--quick", "--profile", "--ops", "--backend", "naive,blas,cpu", "--threads", "1"]
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out
    for section in ("memory bandwidth", "decode limit", "decode after 8 tokens", "decode after 64 tokens",
                    "prefill of 32 tokens", "profile: blas", "sampling", "ops, GFLOP/s",
                    "load + first token", "tokenizer encode", "interference:"):
        assert section in out, f"missing section {section!r}"
    assert "decoy" not in out and "1 threads" in out
    assert "CPU: " in out and "smoke run (--quick)" in out


def test_quick_batch_bench_prints_and_writes_every_size(capsys, tmp_path) -> None:
    # --batch: one table row per batch size, one column per engine, every sample in --json
    out_file = tmp_path / "batch.json"
    args = ["--quick", "--batch", "1,2", "--backend", "naive", "--no-reference", "--json", str(out_file)]
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out
    assert "batched decode, aggregate tokens/s" in out and "reference: skipped (--no-reference)" in out
    rows = json.loads(out_file.read_text())
    want = [("decode batch 1", "naive"), ("decode batch 2", "naive")]
    assert [(r["what"], r["impl"]) for r in rows] == want
    assert all(r["samples"] and r["median"] > 0 for r in rows)


@pytest.mark.parametrize("sizes", ["0", "1,x", ","])
def test_batch_sizes_that_are_not_sizes_are_one_line(capsys, sizes) -> None:
    assert main(["bench", "--quick", "--batch", sizes, "--backend", "naive", "--no-reference"]) == 2
    assert one_error_line(capsys).endswith(f"--batch takes batch sizes such as 1,4,16,64, got {sizes!r}")


@pytest.mark.parametrize("script", ["side_by_side.py", "busy_machine.py"])
def test_the_comparison_scripts_start(script) -> None:
    """The scripts beside llama.cpp are not run in CI (they need llama-cpp-python built from
    source and minutes of a quiet machine); their imports and flags are checked here."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--llama-python" in done.stdout
