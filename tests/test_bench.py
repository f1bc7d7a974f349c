"""``opswitch bench --quick`` end to end: every section runs and prints; no speed claims."""

from __future__ import annotations

import pytest

from opswitch.cli.main import main


@pytest.mark.slow
def test_quick_bench_runs_every_section(capsys) -> None:
    assert main(["bench", "--quick", "--profile", "--ops", "--backend", "naive,blas,cpu"]) == 0
    out = capsys.readouterr().out
    for section in ("memory bandwidth", "decode limit", "decode after 8 tokens", "decode after 64 tokens",
                    "prefill of 32 tokens", "profile: blas", "sampling", "ops, GFLOP/s",
                    "load + first token", "tokenizer encode", "interference:"):
        assert section in out, f"missing section {section!r}"
