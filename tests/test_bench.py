"""``opswitch bench --quick`` end to end: every section runs and prints; no speed claims."""

from __future__ import annotations

import pytest

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
