"""opswitch batch, local mode: same rows as the API, bad rows filed, nothing lost or doubled on resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_jsonl, write_jsonl
from support import require

import opswitch
from opswitch.batch import (
    BatchError,
    Job,
    JobSpec,
    MissingExtraError,
    Task,
    generation_settings,
    row_seed,
    run_job,
)
from opswitch.batch.local import run_local
from opswitch.cli.main import main

PROMPTS = [
    "It is a truth universally acknowledged",
    "Mr. Darcy",
    "Elizabeth could not help",
    "The ball at Netherfield",
    "She had never seen",
    "“Oh! my dear,”",
    "In the morning",
]


def prompts_file(tmp_path: Path, n: int = len(PROMPTS), name: str = "prompts.jsonl") -> Path:
    rows = [{"id": f"r{i}", "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n)]
    return write_jsonl(tmp_path / name, rows)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generate_equals_generate_ids_row_by_row(tmp_path, lm, temperature):
    settings = generation_settings(max_new_tokens=12, temperature=temperature, top_k=40, top_p=0.9, seed=5)
    spec = JobSpec(Task("generate", "prompt", generation=settings), prompts_file(tmp_path),
                   tmp_path / "o.jsonl", shard_size=3, batch_size=2)
    summary = run_job(spec, lm=lm)
    assert (summary.rows, summary.ran, summary.errors) == (len(PROMPTS), len(PROMPTS), 0)
    rows = read_jsonl(tmp_path / "o.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(PROMPTS))]
    for i, (row, prompt) in enumerate(zip(rows, PROMPTS)):
        expected = lm.generate_ids(prompt, **{**settings, "seed": row_seed(5, i)})
        assert row["index"] == i and row["prompt"] == prompt and row["seed"] == row_seed(5, i)
        assert row["completion_ids"] == expected.new_ids
        assert row["completion"] == lm.tokenizer.decode(expected.new_ids)
        assert row["stop_reason"] == expected.stop_reason
        assert row["prompt_tokens"] == len(lm.encode(prompt))
        assert row["settings"] == {"model": None, "backend": lm.backend.name, **settings}
    assert read_jsonl(tmp_path / "o.jsonl.errors.jsonl") == []
    assert not (tmp_path / "o.jsonl.shards").exists()


def test_row_seeds_depend_on_seed_and_index_only():
    seeds = {row_seed(s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150 and row_seed(1, 7) == row_seed(1, 7)


def test_output_does_not_depend_on_shard_or_batch_size(tmp_path, lm):
    settings = generation_settings(max_new_tokens=6, seed=11)
    outputs = []
    for shard_size, batch_size in [(1, 1), (4, 3), (100, 8)]:
        out = tmp_path / f"o{shard_size}.jsonl"
        run_job(JobSpec(Task("generate", "prompt", generation=settings), prompts_file(tmp_path), out,
                        shard_size=shard_size, batch_size=batch_size), lm=lm)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_eval_equals_loss_row_by_row(tmp_path, lm):
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": p, "n": i} for i, p in enumerate(PROMPTS)])
    run_job(JobSpec(Task("eval", "text"), texts, tmp_path / "s.jsonl", shard_size=2), lm=lm)
    rows = read_jsonl(tmp_path / "s.jsonl")
    assert [r["n"] for r in rows] == list(range(len(PROMPTS)))
    for row, text in zip(rows, PROMPTS):
        assert row["loss"] == lm.loss(text)
        assert row["perplexity"] == lm.perplexity(text)
        assert row["tokens"] == len(lm.encode(text))


def test_bad_rows_land_in_the_errors_file_and_the_job_goes_on(tmp_path, lm):
    too_long = " ".join(["word"] * (lm.config.n_positions + 10))
    lines = [
        {"id": "ok1", "prompt": "Mr. Darcy"},
        "{not json",
        {"id": "missing", "text": "no prompt here"},
        {"id": "number", "prompt": 42},
        {"id": "long", "prompt": too_long},
        ["a", "list"],
        {"id": "empty", "prompt": ""},
        {"id": "clash", "prompt": "Hi", "completion": "mine"},
        "",  # a blank line is not a row
        {"id": "ok2", "prompt": "In the morning"},
    ]
    inp = write_jsonl(tmp_path / "p.jsonl", lines)
    settings = generation_settings(max_new_tokens=4, temperature=0)
    summary = run_job(JobSpec(Task("generate", "prompt", generation=settings), inp, tmp_path / "o.jsonl",
                              shard_size=2), lm=lm)
    assert (summary.rows, summary.errors) == (9, 7)
    assert [(r["index"], r["id"]) for r in read_jsonl(tmp_path / "o.jsonl")] == [(0, "ok1"), (8, "ok2")]
    errors = read_jsonl(tmp_path / "o.jsonl.errors.jsonl")
    assert [(e["index"], e["id"]) for e in errors] == [
        (1, None), (2, "missing"), (3, "number"), (4, "long"), (5, None), (6, "empty"), (7, "clash")]
    reasons = [e["reason"] for e in errors]
    assert "line 2 is not valid JSON" in reasons[0]
    assert reasons[1] == "no 'prompt' field"
    assert reasons[2] == "field 'prompt' is int, not text"
    assert f"the model's context is {lm.config.n_positions}" in reasons[3]
    assert "not an object" in reasons[4] and "empty" in reasons[5] and "'completion'" in reasons[6]


def test_eval_of_a_single_token_is_a_bad_row(tmp_path, lm):
    inp = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "Two words"}])
    run_job(JobSpec(Task("eval", "text"), inp, tmp_path / "s.jsonl"), lm=lm)
    assert [e["index"] for e in read_jsonl(tmp_path / "s.jsonl.errors.jsonl")] == [0]
    assert [r["index"] for r in read_jsonl(tmp_path / "s.jsonl")] == [1]


def test_parquet_in_and_out(tmp_path, lm):
    pa = require("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(4)), "prompt": PROMPTS[:4]}), tmp_path / "p.parquet")
    write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:4])])
    settings = generation_settings(max_new_tokens=5, seed=2)
    for inp, out in [("p.parquet", "o.parquet"), ("p.jsonl", "o.jsonl")]:
        task = Task("generate", "prompt", generation=settings)
        run_job(JobSpec(task, tmp_path / inp, tmp_path / out), lm=lm)
    assert pq.read_table(tmp_path / "o.parquet").to_pylist() == read_jsonl(tmp_path / "o.jsonl")


def test_missing_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    spec = JobSpec(Task("eval", "text"), prompts_file(tmp_path), tmp_path / "o.parquet")
    with pytest.raises(MissingExtraError, match=r"pip install 'opswitch\[parquet\]'"):
        run_job(spec)


def test_missing_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    code = main(["batch", "eval", "--input", str(prompts_file(tmp_path)),
                 "--output", str(tmp_path / "o.jsonl"), "--ray", "auto"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "opswitch: error: --ray needs ray[data], which is not installed: pip install 'opswitch[ray]'"]


@pytest.mark.parametrize("extra, message", [
    (["--output", "o.csv"], "must end in .jsonl, .ndjson (JSON Lines) or .parquet"),
    (["--input", "nope.jsonl"], "input file nope.jsonl does not exist"),
    (["--actors", "2"], "--actors needs --ray"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--shard-size", "0"], "--shard-size must be at least 1"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--output", "existing.jsonl"], "existing.jsonl exists: pass --overwrite to replace it"),
    (["--output", "nodir/o.jsonl"], "the output's folder nodir does not exist"),
])
def test_flags_and_files_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    prompts_file(tmp_path, name="p.jsonl")
    Path("existing.jsonl").write_text("keep me\n")
    files, flags = {"--input": "p.jsonl", "--output": "o.jsonl"}, []
    words = iter(extra)
    for word in words:
        if word in files:
            files[word] = next(words)
        else:
            flags.append(word)
    argv = ["batch", "generate", "--model", "/no/such/model", *(x for kv in files.items() for x in kv)]
    code = main(argv + flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert Path("existing.jsonl").read_text() == "keep me\n"


def test_a_model_error_is_one_line(tmp_path, capsys):
    code = main(["batch", "eval", "--model", str(tmp_path / "nothing-here"), "--input",
                 str(prompts_file(tmp_path)), "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("opswitch: error:")


def cli_args(inp: Path, out: Path, *more: str) -> list[str]:
    return ["batch", "generate", "--input", str(inp), "--output", str(out), "--max-tokens", "8",
            "--seed", "7", "--shard-size", "2", "--batch-size", "1", "--stop-token", "-1", *more]


def start_and_stop(argv: list[str], shards: Path, sig: int) -> subprocess.Popen:
    """Run the CLI in a real process and send ``sig`` once two shards are on disk."""
    proc = subprocess.Popen([sys.executable, "-m", "opswitch", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while len(list(shards.glob("part-*.jsonl"))) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard was written"
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_a_killed_job_gives_the_uninterrupted_output(tmp_path, capsys, sig):
    inp = prompts_file(tmp_path, n=40)  # the stop comes within a row or two of the second shard
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    assert main(cli_args(inp, reference, "--quiet")) == 0
    shards = tmp_path / "out.jsonl.shards"
    proc = start_and_stop(cli_args(inp, out), shards, sig)
    assert not out.exists(), "the job finished before it was stopped: give it more rows"
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert "run the same command with --resume to finish" in proc.stderr.read()
    done = len(list(shards.glob("part-*.jsonl")))
    assert done >= 2
    capsys.readouterr()
    assert main(cli_args(inp, out)) == 2  # no --resume: refused, shards kept
    assert "add --resume to finish it" in capsys.readouterr().err
    assert main(cli_args(inp, out, "--resume")) == 0
    assert f"Resuming: {done * 2} rows in complete shards are done" in capsys.readouterr().err
    assert out.read_bytes() == reference.read_bytes()
    assert [r["index"] for r in read_jsonl(out)] == list(range(40))
    assert not shards.exists()


def test_an_interrupted_overwrite_can_be_resumed(tmp_path, lm):
    inp, out = prompts_file(tmp_path, n=4), tmp_path / "o.jsonl"
    out.write_text("an older output\n")
    task = Task("generate", "prompt", generation=generation_settings(max_new_tokens=2, seed=1))
    job = Job(JobSpec(task, inp, out, shard_size=2, overwrite=True))
    run_local(lm, job.task, job.start()[:2], job.add)  # one shard, then a "crash"
    job.close()  # (a crash lets go of the job's lock)
    assert out.read_text() == "an older output\n"  # replaced only by a finished job
    summary = run_job(JobSpec(task, inp, out, shard_size=2, resume=True), lm=lm)
    assert (summary.resumed, summary.ran) == (2, 2)
    assert [r["id"] for r in read_jsonl(out)] == ["r0", "r1", "r2", "r3"]


def test_resume_refuses_another_jobs_shards(tmp_path, capsys):
    inp = prompts_file(tmp_path, n=4)
    out = tmp_path / "o.jsonl"
    spec = JobSpec(Task("generate", "prompt", generation=generation_settings(max_new_tokens=2, seed=1)),
                   inp, out, shard_size=2)
    Job(spec).start()  # a job that stopped before any shard was complete
    assert main(cli_args(inp, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "different generation settings this time (use the same flags" in err
    with pytest.raises(BatchError, match="holds the shards of an unfinished job"):
        run_job(spec)


def test_batch_takes_the_model_flags_of_generate(tmp_path, monkeypatch):
    """--weights, --tokenizer (and --revision, --threads) as `generate` has them: the rows are
    what `load_model` with the same flags generates."""
    from opswitch.model.hub import DEMO_MODEL as DEMO_MODEL_DIR

    monkeypatch.setenv("OPSWITCH_NUM_THREADS", "2")  # --threads sets it: restored after the test
    inp, out = prompts_file(tmp_path, n=3), tmp_path / "o.jsonl"
    argv = cli_args(inp, out, "--weights", "bf16", "--tokenizer", str(DEMO_MODEL_DIR), "--threads", "1",
                    "--backend", "blas", "-q")  # fmt: skip
    assert main(argv) == 0
    lm = opswitch.load_model(None, backend="blas", weights="bf16", tokenizer=DEMO_MODEL_DIR)
    for i, row in enumerate(read_jsonl(out)):
        settings = {"max_new_tokens": 8, "seed": row_seed(7, i), "stop_token": -1, "temperature": 0.8,
                    "top_k": 40, "top_p": 0.9}
        assert row["completion_ids"] == lm.generate_ids(row["prompt"], **settings).new_ids
