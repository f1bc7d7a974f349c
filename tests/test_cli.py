"""The CLI as a user meets it: real processes, real files, exit codes, one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import run_cli
from support import require

from opswitch.core.registry import get_registry

GREEDY = ["--temperature", "0", "--max-tokens", "8", "--stop-token", "-1"]


def test_generate_prints_summary_to_stderr_and_text_to_stdout(tiny_model_dir):
    r = run_cli("generate", "--model", tiny_model_dir, "--prompt", "Hello world", *GREEDY)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello world") and len(r.stdout) > len("Hello world\n")
    err = r.stderr
    auto = get_registry().select("auto").backend.name  # cpu where numba is installed, else blas
    for expected in ("Model loaded (vocab=50257, dim=16, layers=2", f"Backend: {auto}", "auto",
                     "Tokenizer loaded", "Temperature: 0.00", "Prompt: Hello world",
                     "Encoded to 2 tokens: [15496, 995]", "Generated 8 tokens", "tokens/s"):
        assert expected in err, expected


def test_quiet_prints_only_the_generated_text(tiny_model_dir):
    loud = run_cli("generate", "--model", tiny_model_dir, "--prompt", "Hello world", *GREEDY)
    quiet = run_cli("generate", "--model", tiny_model_dir, "--prompt", "Hello world", *GREEDY, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert loud.stdout == "Hello world" + quiet.stdout


def test_equals_form_stdin_and_dash_give_the_same_text(tiny_model_dir):
    base = run_cli("generate", "--model", tiny_model_dir, "--prompt", "The cat", *GREEDY, "-q").stdout
    equals = run_cli("generate", f"--model={tiny_model_dir}", "--prompt=The cat", "--temperature=0",
                      "--max-tokens=8", "--stop-token=-1", "-q").stdout
    piped = run_cli("generate", "--model", tiny_model_dir, *GREEDY, "-q", input="The cat\n").stdout
    dash = run_cli("generate", "--model", tiny_model_dir, "--prompt", "-", *GREEDY, "-q",
                    input="The cat").stdout
    assert base == equals == piped == dash and base


def test_seed_makes_sampling_reproducible(tiny_model_dir):
    args = ["generate", "--model", tiny_model_dir, "--prompt", "A", "--max-tokens", "12", "-q"]
    a, b = run_cli(*args, "--seed", "5").stdout, run_cli(*args, "--seed", "5").stdout
    assert a == b
    others = {run_cli(*args, "--seed", str(seed)).stdout for seed in (6, 7)}
    assert others - {a}, "different seeds gave the same sampled text: is --seed used?"
    r = run_cli("generate", "--model", tiny_model_dir, "--prompt", "A", "--max-tokens", "2")
    assert "Seed:" in r.stderr  # an unseeded run prints the seed it drew, to reproduce it


@pytest.mark.parametrize("backend", ["naive", "blas", "opencl", "naive,blas"])
def test_backends_agree_and_no_kv_cache_agrees(tiny_model_dir, backend):
    from opswitch.core.registry import get_registry

    probe = get_registry().backend(backend.split(",")[0]).probe()
    if not probe.available:
        pytest.skip(f"{backend} unavailable: {probe.reason}")
    ref = run_cli("generate", "--model", tiny_model_dir, "--prompt", "Hi", *GREEDY, "-q").stdout
    got = run_cli("generate", "--model", tiny_model_dir, "--prompt", "Hi", *GREEDY, "-q",
                   "--backend", backend, "--no-kv-cache").stdout
    assert got == ref


BAD_INPUTS = [
    (["--temperature", "-1"], "temperature must be"),
    (["--top-p", "1.5"], "top_p must be between 0 and 1"),
    (["--top-k", "-3"], "top_k must be an integer >= 0"),
    (["--max-tokens", "-1"], "max_new_tokens must be"),
    (["--max-tokens", "ten"], "invalid int value: 'ten'"),
    (["--temperature", "hot"], "invalid float value"),
    (["--seed", "-4"], "seed must be"),
    (["--stop-token", "-7"], "stop_token must be"),
    (["--backend", "nope"], "unknown backend 'nope'; available backends: "),
    (["--backend", "nope,warp"], "no backend of 'nope,warp' is available"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--prompt", ""], "the prompt is empty"),
    (["--model", "/nonexistent/model"], "no such model directory"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, extra, message):
    args = ["generate", "--model", tiny_model_dir, "--prompt", "Hi", *extra]
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opswitch"), r.stderr
    assert message in lines[0]
    assert r.stdout == "" and "Traceback" not in r.stderr


def test_unavailable_backend_names_reason_and_alternatives(tiny_model_dir, monkeypatch):
    env = {"OPSWITCH_OPENCL_DEVICE": "no-such-device-xyz"}
    r = run_cli("generate", "--model", tiny_model_dir, "--prompt", "Hi", "--backend", "opencl", env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "backend 'opencl' is unavailable" in r.stderr and "available backends: " in r.stderr
    assert "blas" in r.stderr.split("available backends: ")[1]


def test_env_var_backend_is_used_and_checked(tiny_model_dir):
    r = run_cli("generate", "--model", tiny_model_dir, "--prompt", "Hi", *GREEDY,
                 env={"OPSWITCH_BACKEND": "naive"})
    assert r.returncode == 0 and "Backend: naive" in r.stderr
    r = run_cli("generate", "--model", tiny_model_dir, "--prompt", "Hi", env={"OPSWITCH_BACKEND": "warp"})
    assert r.returncode == 2 and "unknown backend 'warp'" in r.stderr


def _model_copy(tmp_path, tiny_model_dir):
    import shutil

    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    return target


def test_corrupt_and_pickled_weights_are_refused(tmp_path, tiny_model_dir):
    model = _model_copy(tmp_path, tiny_model_dir)
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])  # truncated download
    r = run_cli("generate", "--model", model, "--prompt", "Hi")
    assert r.returncode == 2 and "model.safetensors" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert weights.read_bytes() == original[: len(original) // 2]  # nothing of the user's is touched

    weights.unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    r = run_cli("generate", "--model", model, "--prompt", "Hi")
    assert r.returncode == 2 and "pickle" in r.stderr.lower() and "safetensors" in r.stderr
    r = run_cli("generate", "--model", model / "pytorch_model.bin", "--prompt", "Hi")
    assert r.returncode == 2 and "pickle" in r.stderr.lower()


def test_bad_tokenizer_files_are_refused(tmp_path, tiny_model_dir):
    model = _model_copy(tmp_path, tiny_model_dir)
    (model / "vocab.json").write_text("{not json")
    r = run_cli("generate", "--model", model, "--prompt", "Hi")
    assert r.returncode == 2 and "vocab.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (model / "vocab.json").unlink()
    (model / "merges.txt").unlink()
    r = run_cli("generate", "--model", model, "--prompt", "Hi")
    assert r.returncode == 2 and "tokenizer" in r.stderr.lower()


def test_ctrl_c_stops_generation_and_keeps_the_text(long_context_model_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "opswitch", "generate", "--model", str(long_context_model_dir),
         "--prompt", "Hi",
         "--max-tokens", "100000", "--no-kv-cache", "--backend", "naive", "--stop-token", "-1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # wait until text is streaming, then interrupt
    first = proc.stdout.read(4)
    time.sleep(0.3)
    assert proc.poll() is None, "generation ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (first + out).startswith("Hi") and len(first + out) > 4
    assert "interrupted" in err and "Traceback" not in err
    assert "Generated" in err  # the summary still prints


def test_backends_command_and_version():
    r = run_cli("backends")
    assert r.returncode == 0 and "naive" in r.stdout and "blas" in r.stdout and "auto ->" in r.stdout
    assert run_cli("--version").stdout.startswith("opswitch ")
    r = run_cli()
    assert r.returncode == 2 and "generate" in r.stderr


def test_bench_runs_side_by_side_with_torch(tiny_model_dir):
    require("torch")
    r = run_cli("bench", "--model", tiny_model_dir, "--backend", "naive,blas", "--repeats", "1",
                 "--prompt-tokens", "4", "--new-tokens", "3", "--ops", "--idle-wait", "0")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "decode after 4 tokens, tok/s" in out and "torch (HF transformers)" in out and "x torch" in out
    assert "ops, GFLOP/s" in out and "decode lm_head 1x16x50257" in out and "interference:" in out
    r = run_cli("bench", "--backend", "warp", "--no-reference")
    assert r.returncode == 2 and "unknown backend 'warp'" in r.stderr


def test_model_dependent_errors_are_one_line_before_any_summary(tiny_model_dir):
    too_long = "word" + " word" * 199  # 200 tokens > the tiny model's 128 positions
    cases = ((["--prompt", too_long], "the prompt is more than 128 tokens but the model's context is 128"),
             (["--prompt", "Hi", "--stop-token", "50257"], "outside the model's vocabulary"))
    for extra, message in cases:
        r = run_cli("generate", "--model", tiny_model_dir, *extra)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr


def test_threads_flag_sets_the_pools_and_is_shown(tiny_model_dir):
    r = run_cli("generate", "--model", tiny_model_dir, "--backend", "blas", "--threads", "1",
                 "--prompt", "Hi", *GREEDY)  # fmt: skip
    assert r.returncode == 0, r.stderr
    backend_line = next(line for line in r.stderr.splitlines() if "Backend:" in line)
    assert "1 threads" in backend_line
    assert "--threads" in run_cli("generate", "--help").stdout


@pytest.mark.parametrize("value", ["0", "-2", "two", "1e3", "99999"])
def test_a_bad_thread_count_is_a_one_line_usage_error(value):
    r = run_cli("generate", "--threads", value, "--prompt", "Hi")
    assert r.returncode == 2 and "thread count" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_max_tokens_zero_is_refused(tiny_model_dir):
    r = run_cli("generate", "--model", tiny_model_dir, "--prompt", "Hi", "--max-tokens", "0")
    assert r.returncode == 2 and "--max-tokens 0" in r.stderr


def test_a_long_prompt_does_not_print_every_id():
    from opswitch.cli.session import describe_ids

    assert describe_ids([7]) == "1 token: [7]"
    text = describe_ids(list(range(5000)))
    assert text.startswith("5000 tokens: [0, 1,") and "4999]" in text and len(text) < 200
