"""opswitch batch against hostile rows, files and flags: each is a bad row (the job goes on)
or one line and exit 2 before the model loads; a row that fails while generating fails
alone; a large --batch-size stays within --cache-mib."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from pathlib import Path

import pytest
from helpers import one_error_line, read_jsonl

from opswitch.batch import JobSpec, Task, generation_settings, run_job
from opswitch.cli.main import main
from opswitch.core.errors import NonFiniteLogitsError
from opswitch.model.hub import DEMO_MODEL

SETTINGS = generation_settings(max_new_tokens=2, seed=1)


def test_hostile_lines_are_bad_rows_and_the_job_goes_on(tmp_path, lm):
    lines = [
        b'\xef\xbb\xbf{"id": "first", "prompt": "Mr. Darcy"}',  # a BOM is not part of the row
        b'{"id": "big", "prompt": "x", "n": ' + b"7" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"id": "deep", "prompt": "x", "d": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'"a JSON string, not a row"',
        b"12345",
        b"null",
        b'{"id": "nan", "prompt": "x", "score": NaN}',
        b'{"id": "last", "prompt": "In the morning"}',
    ]
    (tmp_path / "p.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    summary = run_job(JobSpec(Task("generate", "prompt", generation=SETTINGS), tmp_path / "p.jsonl",
                              tmp_path / "o.jsonl"), lm=lm)
    assert (summary.rows, summary.written, summary.errors) == (9, 2, 7)
    assert [(r["index"], r["id"]) for r in read_jsonl(tmp_path / "o.jsonl")] == [(0, "first"), (8, "last")]
    errors = read_jsonl(tmp_path / "o.jsonl.errors.jsonl")
    assert [e["index"] for e in errors] == [1, 2, 3, 4, 5, 6, 7]
    reasons = [e["reason"] for e in errors]
    assert "line 2" in reasons[0] and "digit" in reasons[0]
    assert reasons[1] == "line 3 is nested too deeply to read"
    assert reasons[2] == "line 4 is nested too deeply to read"
    assert reasons[3:6] == [f"the row is a JSON {k}, not an object" for k in ("string", "number", "null")]
    assert reasons[6] == "line 8 is not usable JSON: NaN is not a JSON value"


def _output_is_a_folder(tmp: Path) -> list[str]:
    (tmp / "o.jsonl").mkdir()
    return []


def _errors_file_is_a_folder(tmp: Path) -> list[str]:
    (tmp / "o.jsonl.errors.jsonl").mkdir()
    return []


def _output_is_a_fifo(tmp: Path) -> list[str]:
    os.mkfifo(tmp / "o.jsonl")
    return ["--overwrite"]


def _rows_of_two_types(tmp: Path) -> list[str]:
    (tmp / "p.jsonl").write_text('{"prompt": "a", "x": 1}\n{"prompt": "b", "x": "one"}\n')
    return ["--output", "o.parquet"]


def _a_number_parquet_cannot_hold(tmp: Path) -> list[str]:
    (tmp / "p.jsonl").write_text(json.dumps({"prompt": "a", "x": 10**30}) + "\n")
    return ["--output", "o.parquet"]


def _symlinked_shard_folder(tmp: Path) -> list[str]:
    (tmp / "elsewhere").mkdir()
    (tmp / "o.jsonl.shards").symlink_to(tmp / "elsewhere")
    return ["--resume"]


def _shards_with(manifest: bytes | None):
    def make(tmp: Path) -> list[str]:
        (tmp / "o.jsonl.shards").mkdir()
        if manifest is None:
            os.mkfifo(tmp / "o.jsonl.shards" / "job.json")
        else:
            (tmp / "o.jsonl.shards" / "job.json").write_bytes(manifest)
        return ["--resume"]
    make.__name__ = f"job.json={manifest[:12] if manifest is not None else 'FIFO'}"
    return make


HOSTILE_MANIFESTS = [b"[1, 2]", b'"text"', b"7" * 5000, b"[" * 100_000, b"\xff\xfe",
                     b"{" + b" " * (2 << 20) + b"}", None]


@pytest.mark.parametrize("setup, message", [
    (_output_is_a_folder, "is a directory, not a file"),
    (_errors_file_is_a_folder, "is a directory, not a file"),
    (_output_is_a_fifo, "is a FIFO, not a file"),
    (_rows_of_two_types, "do not fit one Parquet schema"),
    (_a_number_parquet_cannot_hold, "do not fit one Parquet schema"),
    (_symlinked_shard_folder, "is a symlink, not a folder this job made"),
    *((_shards_with(m), "has no readable job.json") for m in HOSTILE_MANIFESTS),
    (_shards_with(b'{"version": 2, "generation": {"seed": -5}, "x": [' + b"1," * 1000 + b"1]}"),
     "cannot resume the job"),
])
def test_bad_outputs_and_shard_folders_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                                         setup, message):
    pytest.importorskip("pyarrow")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "Mr. Darcy"}\n')
    flags = setup(tmp_path)
    output = flags[flags.index("--output") + 1] if "--output" in flags else "o.jsonl"
    flags = [f for f in flags if f not in ("--output", output)]
    code = main(["batch", "generate", "--model", "/no/such/model", "--input", "p.jsonl", "--output", output,
                 *flags])
    line = one_error_line(capsys)
    assert code == 2 and message in line, line


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e12"])
def test_cache_mib_must_be_a_sane_budget(tmp_path, capsys, value):
    (tmp_path / "p.jsonl").write_text('{"text": "Mr. Darcy"}\n')
    code = main(["batch", "eval", "--model", "/no/such/model", "--input", str(tmp_path / "p.jsonl"),
                 "--output", str(tmp_path / "o.jsonl"), "--cache-mib", value])
    assert code == 2 and "--cache-mib must be a number of MiB" in one_error_line(capsys)


def test_a_budget_too_small_for_one_sequence_is_one_line(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "Mr. Darcy"}\n')
    code = main(["batch", "generate", "--input", str(tmp_path / "p.jsonl"), "--output",
                 str(tmp_path / "o.jsonl"), "--cache-mib", "0.01"])
    assert code == 2 and "cannot hold the KV cache of even one short sequence" in one_error_line(capsys)


PROMPTS = ["Mr. Darcy said", "It is a truth universally acknowledged", "She had never seen",
           "The ball at Netherfield"]


def prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)]}) + "\n" for i in range(n)))
    return path


def test_a_tight_cache_budget_gives_the_same_rows(tmp_path, lm):
    """Rows wait for cache room; what each row gets never depends on the budget. A row whose
    cache alone exceeds the budget is a bad row."""
    inp = prompts(tmp_path / "p.jsonl", 9)
    with inp.open("a") as f:  # 80 tokens and 2 more: a 128-position cache, 0.75 MiB on the demo model
        f.write(json.dumps({"prompt": " ".join(["Darcy"] * 80)}) + "\n")
    outputs = []
    for mib in (1024, 0.4):  # 0.4 MiB: one 64-position cache (0.375 MiB) at a time
        task = Task("generate", "prompt", generation=SETTINGS, cache_mib=mib)
        summary = run_job(JobSpec(task, inp, tmp_path / f"o{mib}.jsonl", batch_size=10), lm=lm)
        outputs.append([r for r in read_jsonl(tmp_path / f"o{mib}.jsonl")])
    assert (summary.written, summary.errors) == (9, 1)
    assert outputs[1] == outputs[0][:9]
    (error,) = read_jsonl(tmp_path / "o0.4.jsonl.errors.jsonl")
    assert error["index"] == 9 and "more than the budget (--cache-mib 0.4)" in error["reason"]


def test_a_large_batch_stays_within_the_cache_budget(tmp_path, lm):
    """A budget of two caches admits two rows at a time, so the peak traced memory of 4 long
    rows in one model call is at most twice that of one row alone, plus the waiting rows'
    token lists (a few KiB; 0.5 MiB allowed). Unbounded, all 4 caches and prefills are live
    at once: about 4 times one row."""
    text = " ".join(["Mr. Darcy said"] * 60)  # 240 tokens: a 256-position cache, 1.5 MiB
    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"{text} {i}"}) + "\n" for i in range(4)))
    settings = generation_settings(max_new_tokens=1, seed=1)

    def peak(batch_size: int, cache_mib: float) -> int:
        task = Task("generate", "prompt", generation=settings, cache_mib=cache_mib)
        spec = JobSpec(task, inp, tmp_path / "o.jsonl", batch_size=batch_size, overwrite=True)
        tracemalloc.start()
        try:
            run_job(spec, lm=lm)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    run_job(JobSpec(Task("generate", "prompt", generation=settings), inp, tmp_path / "warm.jsonl",
                    batch_size=4), lm=lm)  # first calls allocate lasting things of their own
    one_row, bounded = peak(1, 1024), peak(4, 3.1)  # 3.1 MiB: two caches of 1.5 MiB
    assert bounded <= 2 * one_row + 0.5 * 2**20, (one_row, bounded)


def gap_model(folder: Path) -> Path:
    """The demo model with ~3,000 gaps in its tokenizer's id table (allowed at load): whole-word
    tokens that no merge builds on are dropped from vocab.json and merges.txt."""
    shutil.copytree(DEMO_MODEL, folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    parts = {p for m in merges for p in m}
    top = max(vocab.values())
    gone = {t for t, i in vocab.items() if 4000 <= i < top and t not in parts}
    (folder / "vocab.json").write_text(json.dumps({t: i for t, i in vocab.items() if t not in gone}))
    kept = [m for m in merges if m[0] + m[1] not in gone]
    (folder / "merges.txt").write_text("\n".join([lines[0], *(" ".join(m) for m in kept)]) + "\n")
    return folder


def test_a_row_that_fails_while_generating_fails_alone(tmp_path, capsys):
    """Sampling a gap's id used to abort the job at decoding. Never sampling it (the fix in
    generation) or failing that row alone (the fix in batch): either way the job finishes,
    every row is once in the output or the errors file, and no output row holds an id without text."""
    model = gap_model(tmp_path / "gaps")
    ids_with_text = set(json.loads((model / "vocab.json").read_text(encoding="utf-8")).values())
    inp = prompts(tmp_path / "p.jsonl", 12)  # with this seed, row 8 samples a gap's id
    code = main(["batch", "generate", "--model", str(model), "--input", str(inp), "--output",
                 str(tmp_path / "o.jsonl"), "--max-tokens", "8", "--temperature", "1", "--top-k", "0",
                 "--top-p", "0", "--seed", "4", "--batch-size", "4", "--quiet"])
    assert code == 0, capsys.readouterr().err
    rows, errors = read_jsonl(tmp_path / "o.jsonl"), read_jsonl(tmp_path / "o.jsonl.errors.jsonl")
    assert sorted([r["index"] for r in rows] + [e["index"] for e in errors]) == list(range(12))
    assert all(set(r["completion_ids"]) <= ids_with_text for r in rows)
    assert all("cannot be decoded" in e["reason"] and "unused" in e["reason"] for e in errors), errors


class OneRowFails:
    """The real demo model, except that a batch holding the poisoned prompt raises as a
    backend failure would: the only way to make one row's step fail on purpose."""

    def __init__(self, lm, poison: str) -> None:
        self.lm, self.poison, self.calls = lm, lm.encode(poison), 0

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def generate_batch(self, prompts, settings, **kw):
        self.calls += 1
        if any(list(p) == self.poison for p in prompts):
            raise NonFiniteLogitsError("the model produced NaN logits (at step 1, on backend cpu)")
        return self.lm.generate_batch(prompts, settings, **kw)

    def engine(self, *args, **kwargs):
        """The engine the rows run on: its forward steps fail the same way."""
        engine = self.lm.engine(*args, **kwargs)
        engine.model = _PoisonedSteps(engine.model, self.poison)
        return engine


class _PoisonedSteps:
    """A model whose forward step raises when one of its sequences is fed the poisoned prompt."""

    def __init__(self, model, poison: list[int]) -> None:
        self.model, self.poison = model, poison

    def __getattr__(self, name):
        return getattr(self.model, name)

    def step(self, batch, **kw):
        if any(list(ids) == self.poison for ids, _ in batch):
            raise NonFiniteLogitsError("the model produced NaN logits (at step 1, on backend cpu)")
        return self.model.step(batch, **kw)


def test_a_row_whose_step_fails_is_one_bad_row_and_the_batch_stays_batched(tmp_path, lm):
    inp = prompts(tmp_path / "p.jsonl", 16)
    with inp.open("a") as f:
        f.write(json.dumps({"prompt": "poison"}) + "\n")
    task = Task("generate", "prompt", generation=SETTINGS)
    faulty = OneRowFails(lm, "poison")
    summary = run_job(JobSpec(task, inp, tmp_path / "o.jsonl", batch_size=17), lm=faulty)
    assert (summary.written, summary.errors) == (16, 1)
    (error,) = read_jsonl(tmp_path / "o.jsonl.errors.jsonl")
    assert error["index"] == 16 and error["reason"].startswith("generation failed: the model produced NaN")
    clean = prompts(tmp_path / "clean.jsonl", 16)
    run_job(JobSpec(task, clean, tmp_path / "c.jsonl", batch_size=17), lm=lm)
    assert (tmp_path / "o.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()
    assert faulty.calls <= 2 * 5 + 1  # halving: at most two calls per level of a 17-row batch
