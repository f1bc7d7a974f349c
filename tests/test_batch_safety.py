"""opswitch batch never loses data: it never writes over its input or model, never trusts
a damaged shard, and never lets two jobs mix in one output. Files on disk, the CLI,
real processes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import one_error_line, read_jsonl

import opswitch
from opswitch.batch import BatchError, Job, JobSpec, Task, generation_settings, run_job
from opswitch.batch.job import Report
from opswitch.batch.local import run_local
from opswitch.cli.main import main
from opswitch.model.hub import DEMO_MODEL

PROMPTS = ["It is a truth universally acknowledged", "Mr. Darcy", "Elizabeth could not help",
           "The ball at Netherfield", "She had never seen", "In the morning"]
SETTINGS = generation_settings(max_new_tokens=3, seed=3, stop_token=-1)


def prompts_file(path: Path, n: int = len(PROMPTS)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": PROMPTS[i % len(PROMPTS)]}) + "\n"
                            for i in range(n)))
    return path


# -- 1. the input and the model are never written, replaced or removed -------------------------

def _input_is_the_errors_file(tmp: Path) -> tuple[Path, Path]:
    return prompts_file(tmp / "o.jsonl.errors.jsonl"), tmp / "o.jsonl"


def _input_inside_the_shards(tmp: Path) -> tuple[Path, Path]:
    return prompts_file(tmp / "o.jsonl.shards" / "p.jsonl"), tmp / "o.jsonl"


def _input_links_into_the_shards(tmp: Path) -> tuple[Path, Path]:
    real = prompts_file(tmp / "o.jsonl.shards" / "p.jsonl")
    (tmp / "link.jsonl").symlink_to(real)
    return tmp / "link.jsonl", tmp / "o.jsonl"


def _input_hard_links_the_errors_file(tmp: Path) -> tuple[Path, Path]:
    errors = prompts_file(tmp / "o.jsonl.errors.jsonl")
    os.link(errors, tmp / "p.jsonl")
    return tmp / "p.jsonl", tmp / "o.jsonl"


def _output_is_a_symlink_to_the_input(tmp: Path) -> tuple[Path, Path]:
    inp = prompts_file(tmp / "p.jsonl")
    (tmp / "o.jsonl").symlink_to(inp)
    return inp, tmp / "o.jsonl"


def _input_is_the_output(tmp: Path) -> tuple[Path, Path]:
    inp = prompts_file(tmp / "p.jsonl")
    return inp, inp


def _input_hard_links_the_output(tmp: Path) -> tuple[Path, Path]:
    inp = prompts_file(tmp / "p.jsonl")
    os.link(inp, tmp / "o.jsonl")
    return inp, tmp / "o.jsonl"


def _input_hard_linked_into_the_shards(tmp: Path) -> tuple[Path, Path]:
    inp = prompts_file(tmp / "p.jsonl")
    (tmp / "o.jsonl.shards").mkdir()
    os.link(inp, tmp / "o.jsonl.shards" / "part-00000.jsonl")
    return inp, tmp / "o.jsonl"


def _errors_file_links_to_the_input(tmp: Path) -> tuple[Path, Path]:
    inp = prompts_file(tmp / "p.jsonl")
    (tmp / "o.jsonl.errors.jsonl").symlink_to(inp)
    return inp, tmp / "o.jsonl"


@pytest.mark.parametrize("layout", [
    _input_is_the_errors_file, _input_inside_the_shards, _input_links_into_the_shards,
    _input_hard_links_the_errors_file, _output_is_a_symlink_to_the_input, _input_is_the_output,
    _input_hard_links_the_output, _input_hard_linked_into_the_shards, _errors_file_links_to_the_input,
])
@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_the_input_is_never_overwritten_or_removed(tmp_path, capsys, layout, flag):
    inp, out = layout(tmp_path)
    before = inp.read_bytes()
    # the demo model loads fine: on a run that got past the check, the job would finish
    code = main(["batch", "generate", "--input", str(inp), "--output", str(out), "--max-tokens", "1",
                 "--seed", "1", flag])
    line = one_error_line(capsys)
    assert code == 2 and "would overwrite or remove the input" in line, line
    assert inp.read_bytes() == before


def test_a_model_named_like_the_shard_folder_is_not_removed(tmp_path, capsys):
    model = tmp_path / "o.jsonl.shards"
    shutil.copytree(DEMO_MODEL, model)
    before = sorted(p.name for p in model.iterdir())
    inp = prompts_file(tmp_path / "p.jsonl", 2)
    code = main(["batch", "eval", "--model", str(model), "--input", str(inp), "--output",
                 str(tmp_path / "o.jsonl"), "--overwrite"])
    line = one_error_line(capsys)
    assert code == 2 and "would overwrite or remove the model" in line, line
    assert sorted(p.name for p in model.iterdir()) == before


def test_the_loaded_model_is_protected_even_when_the_job_does_not_name_it(tmp_path):
    model = tmp_path / "o.jsonl.shards"  # as a hub snapshot or the demo model: found, not named
    shutil.copytree(DEMO_MODEL, model)
    inp = prompts_file(tmp_path / "p.jsonl", 2)
    with pytest.raises(BatchError, match="would overwrite or remove the model"):
        run_job(JobSpec(Task("eval", "prompt"), inp, tmp_path / "o.jsonl", overwrite=True),
                lm=opswitch.load_model(str(model)))
    assert (model / "model.safetensors").exists()


def test_an_output_beside_the_model_files_is_fine(tmp_path, lm):
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    inp = prompts_file(tmp_path / "p.jsonl", 2)
    task = Task("eval", "prompt", model=str(model))
    for overwrite in (False, True):  # and again, over the first one's output
        summary = run_job(JobSpec(task, inp, model / "scores.jsonl", overwrite=overwrite), lm=lm)
        assert summary.written == 2 and (model / "config.json").exists()


@pytest.mark.parametrize("folder", ["model", "tokenizer"])
def test_an_output_that_links_to_a_model_or_tokenizer_file_is_refused(tmp_path, lm, capsys, folder):
    """A link is followed: the file it names stays protected, whatever the output is called."""
    model, tokenizer = tmp_path / "model", tmp_path / "tok"
    shutil.copytree(DEMO_MODEL, model)
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DEMO_MODEL / name, tokenizer / name)
    inp = prompts_file(tmp_path / "p.jsonl", 2)
    home = model if folder == "model" else tokenizer
    target = home / ("config.json" if folder == "model" else "vocab.json")
    before = target.read_bytes()
    out = home / "scores.jsonl"
    out.symlink_to(target)
    code = main(["batch", "eval", "--model", str(model), "--tokenizer", str(tokenizer), "--input", str(inp),
                 "--output", str(out), "--overwrite"])  # fmt: skip
    assert code == 2 and f"would overwrite or remove a file of the {folder}" in one_error_line(capsys)
    assert target.read_bytes() == before and out.is_symlink()


def test_an_output_beside_the_tokenizer_files_is_fine(tmp_path, lm):
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DEMO_MODEL / name, tokenizer / name)
    inp = prompts_file(tmp_path / "p.jsonl", 2)
    task = Task("eval", "prompt", tokenizer=str(tokenizer))
    summary = run_job(JobSpec(task, inp, tokenizer / "scores.jsonl"), lm=lm)
    assert summary.written == 2 and (tokenizer / "vocab.json").exists()


def test_refused_before_the_model_loads(tmp_path, capsys):
    inp, out = _input_inside_the_shards(tmp_path)
    code = main(["batch", "eval", "--model", "/no/such/model", "--input", str(inp), "--output", str(out),
                 "--overwrite"])
    assert code == 2 and "would overwrite or remove the input" in one_error_line(capsys)


def test_an_output_folder_of_our_own_is_still_replaced(tmp_path, lm):
    """The check refuses only what is the user's: an old output and its shards are replaced."""
    inp, out = prompts_file(tmp_path / "p.jsonl", 4), tmp_path / "o.jsonl"
    out.write_text("old\n")
    task = Task("generate", "prompt", generation=SETTINGS)
    summary = run_job(JobSpec(task, inp, out, shard_size=2, overwrite=True), lm=lm)
    assert (summary.written, summary.errors) == (4, 0)
    assert [r["index"] for r in read_jsonl(out)] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "o.jsonl.errors.jsonl", "p.jsonl"]


# -- 2. damaged shards are found, run again, and the output is the clean run's -----------------

def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _drop_a_line(data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    return b"".join(lines[:1] + lines[2:])


def _drop_a_line_and_the_checksum(data: bytes) -> bytes:
    return data.splitlines(keepends=True)[0]


def _duplicate_a_line(data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    return b"".join(lines[:1] + lines[:1] + lines[1:])


def _flip_a_byte(data: bytes) -> bytes:
    """Still valid JSON, still the right rows: only the checksum can tell."""
    return data.replace(b'"stop_reason": "length"', b'"stop_reason": "lengtH"', 1)


def _invalid_utf8(data: bytes) -> bytes:
    return data[:10] + b"\xff\xfe" + data[12:]


def _emptied(data: bytes) -> bytes:
    return b""


def _grown_huge(data: bytes) -> str:
    return "sparse"


def _replaced_by_a_symlink(data: bytes) -> str:
    return "symlink"


def _replaced_by_a_folder(data: bytes) -> str:
    return "folder"


DAMAGES = [_truncate, _drop_a_line, _drop_a_line_and_the_checksum, _duplicate_a_line, _flip_a_byte,
           _invalid_utf8, _emptied, _replaced_by_a_symlink, _replaced_by_a_folder, _grown_huge]


def damage(shard: Path, how) -> None:
    data = how(shard.read_bytes())
    if data == "symlink":
        other = shard.with_name("elsewhere.txt")
        other.write_bytes(b"x\n")
        shard.unlink()
        shard.symlink_to(other)
    elif data == "sparse":  # 8 GiB without a newline, on no disk space: must not be read whole
        with shard.open("r+b") as f:
            f.truncate(8 << 30)
    elif data == "folder":
        shard.unlink()
        (shard / "x.tmp").mkdir(parents=True)
        (shard.parent / "stray.tmp").mkdir()  # a folder where a killed job's temporary file was
    else:
        assert data != shard.read_bytes()
        shard.write_bytes(data)


class Notes(Report):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, line: str) -> None:
        self.lines.append(line)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, lm):
    folder = tmp_path_factory.mktemp("clean")
    inp = prompts_file(folder / "p.jsonl", 6)
    run_job(JobSpec(Task("generate", "prompt", generation=SETTINGS), inp, folder / "o.jsonl", shard_size=2),
            lm=lm)
    return inp, (folder / "o.jsonl").read_bytes()


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_shard_is_run_again_on_resume(tmp_path, lm, clean_run, how):
    inp = Path(shutil.copy(clean_run[0], tmp_path / "p.jsonl"))
    out = tmp_path / "o.jsonl"
    task = Task("generate", "prompt", generation=SETTINGS)
    job = Job(JobSpec(task, inp, out, shard_size=2))
    run_local(lm, job.task, job.start()[:4], job.add)  # two shards of three, then a "crash"
    del job  # (its lock goes with it, as with a killed process)
    shards = out.with_name("o.jsonl.shards")
    damage(shards / "part-00000.jsonl", how)
    notes = Notes()
    summary = run_job(JobSpec(task, inp, out, shard_size=2, resume=True), lm=lm, report=notes)
    assert out.read_bytes() == clean_run[1]
    assert [r["index"] for r in read_jsonl(out)] == list(range(6))
    assert (summary.resumed, summary.ran, summary.written, summary.errors) == (2, 4, 6, 0)
    assert len(notes.lines) == 1 and "part-00000.jsonl is damaged" in notes.lines[0], notes.lines
    assert not shards.exists()


class DamageOnce(Notes):
    """Damages the first shard once every row has run: the read-back before assembly must catch it."""

    def __init__(self, shard: Path, how, rows: int) -> None:
        super().__init__()
        self.shard, self.how, self.left = shard, how, rows

    def done_rows(self, n: int) -> None:
        self.left -= n
        if self.left == 0:
            damage(self.shard, self.how)


@pytest.mark.parametrize("how", [_drop_a_line, _flip_a_byte, _duplicate_a_line])
def test_a_shard_damaged_before_assembly_is_run_again(tmp_path, lm, clean_run, how):
    inp = Path(shutil.copy(clean_run[0], tmp_path / "p.jsonl"))
    out = tmp_path / "o.jsonl"
    report = DamageOnce(out.with_name("o.jsonl.shards") / "part-00001.jsonl", how, 6)
    summary = run_job(JobSpec(Task("generate", "prompt", generation=SETTINGS), inp, out, shard_size=2),
                      lm=lm, report=report)
    assert out.read_bytes() == clean_run[1]
    assert (summary.ran, summary.written) == (8, 6)  # the damaged shard's two rows ran twice
    assert len(report.lines) == 1 and "part-00001.jsonl is damaged" in report.lines[0]


# -- 3. one job per output: a lock held for the job's life, gone with its process --------------

def cli(inp: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "opswitch", "batch", "generate", "--input", str(inp), "--output", str(out),
            "--max-tokens", "8", "--seed", "7", "--shard-size", "2", "--batch-size", "1",
            "--stop-token", "-1", *more]


def test_a_second_job_on_the_same_output_is_refused_until_the_first_dies(tmp_path, capsys):
    inp, out = prompts_file(tmp_path / "p.jsonl", 400), tmp_path / "o.jsonl"  # more than it will run
    shards = tmp_path / "o.jsonl.shards"
    first = subprocess.Popen(cli(inp, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(shards.glob("part-*.jsonl")):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "no shard was written"
            time.sleep(0.01)
        # this process, second: the same job again, its resume, another seed over it (each would
        # mix two jobs' rows)
        for flags in [(), ("--resume",), ("--overwrite", "--seed", "8")]:
            code = main(cli(inp, out, *flags)[3:])
            line = one_error_line(capsys)
            assert code == 2 and f"another job (pid {first.pid}) is running on {out}" in line, line
            assert first.poll() is None and (shards / "job.json").exists(), "the first job was disturbed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (tmp_path / "o.jsonl.lock").exists()  # a killed job's lock file stays, and must not block
    small = prompts_file(tmp_path / "small.jsonl", 2)
    capsys.readouterr()
    assert main(cli(small, out, "--overwrite", "--quiet")[3:]) == 0, capsys.readouterr().err
    assert [r["index"] for r in read_jsonl(out)] == [0, 1]
    assert not (tmp_path / "o.jsonl.lock").exists() and not shards.exists()


def test_a_lock_left_by_a_finished_or_killed_job_never_blocks(tmp_path, lm):
    inp, out = prompts_file(tmp_path / "p.jsonl", 2), tmp_path / "o.jsonl"
    (tmp_path / "o.jsonl.lock").write_text("999999\n")  # as a killed job leaves it: no process holds it
    task = Task("generate", "prompt", generation=SETTINGS)
    assert run_job(JobSpec(task, inp, out), lm=lm).written == 2
    assert run_job(JobSpec(task, inp, out, overwrite=True), lm=lm).written == 2


def _random_damage(rng: random.Random, shards: list[Path]) -> None:
    """One of a few kinds of damage, at a random place in a random shard."""
    shard = rng.choice(shards)
    data = shard.read_bytes()
    lines = data.splitlines(keepends=True)
    kind = rng.randrange(6)
    at = rng.randrange(len(data))
    if kind == 0:  # one flipped bit
        new = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
    elif kind == 1:  # bytes lost
        new = data[:at] + data[at + rng.randrange(1, 40):]
    elif kind == 2:  # bytes inserted
        new = data[:at] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8))) + data[at:]
    elif kind == 3:  # a line twice, or lines swapped
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[j:j] = [lines[i]] if rng.random() < 0.5 else []
        if len(lines) > 1 and i != j:
            lines[i], lines[j] = lines[j], lines[i]
        new = b"".join(lines)
    elif kind == 4:  # cut short
        new = data[:at]
    else:  # another shard's (sound) file in its place
        new = next(s for s in shards if s != shard).read_bytes()
    if new == data:
        new = data[:-1]
    shard.write_bytes(new)


def test_random_damage_to_complete_shards_never_reaches_the_output(tmp_path, lm, clean_run):
    """A scripted fuzz: 12 random damages to a job whose shards are all complete; each resume
    gives the clean run's output byte for byte."""
    inp = Path(shutil.copy(clean_run[0], tmp_path / "p.jsonl"))
    out, shards = tmp_path / "o.jsonl", tmp_path / "o.jsonl.shards"
    task = Task("generate", "prompt", generation=SETTINGS)
    with Job(JobSpec(task, inp, out, shard_size=2)) as job:
        run_local(lm, job.task, job.start(), job.add)  # every shard written, then a "crash"
    template = tmp_path / "template"
    shutil.copytree(shards, template)
    rng = random.Random(19)
    for case in range(12):
        shutil.rmtree(shards, ignore_errors=True)
        shutil.copytree(template, shards)
        for _ in range(rng.randrange(1, 3)):
            _random_damage(rng, sorted(shards.glob("part-*.jsonl")))
        notes = Notes()
        summary = run_job(JobSpec(task, inp, out, shard_size=2, resume=True), lm=lm, report=notes)
        assert out.read_bytes() == clean_run[1], case
        assert summary.written == 6 and summary.ran == 2 * len(notes.lines) > 0, (case, notes.lines)
        out.unlink()
        (tmp_path / "o.jsonl.errors.jsonl").unlink()
