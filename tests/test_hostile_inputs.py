"""Hostile files and inputs: each is a one-line OpswitchError naming the file, never a hang,
an unbounded allocation, a wrong answer or lost data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from opswitch.bench.models import random_params
from opswitch.core.errors import (
    ConfigError,
    OpswitchError,
    TokenizerError,
    WeightsError,
)
from opswitch.core.files import CONFIG_LIMIT, not_a_file, read_json
from opswitch.model.config import GPT2Config
from opswitch.model.weights import load_gpt2, save_gpt2
from opswitch.tokenizer import load_tokenizer

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")

SMALL = GPT2Config(vocab_size=61, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                   bos_token_id=0, eos_token_id=60)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small complete model directory (no tokenizer)."""
    directory = tmp_path / "model"
    save_gpt2(directory, SMALL, random_params(SMALL))
    return directory


def one_line(exc: pytest.ExceptionInfo, *words: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and len(message) < 1000, message
    for word in words:
        assert word in message, message
    return message


# -- not a regular file --------------------------------------------------------------------

def _replace_with(path: Path, kind: str) -> None:
    """Put a FIFO, a directory, a dangling link or a link to a device where a file was."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling link":
        path.symlink_to(path.with_name("nowhere"))
    elif kind == "device":
        path.symlink_to("/dev/zero")


KINDS = {"fifo": "a FIFO", "directory": "a directory", "dangling link": "a dangling link",
         "device": "a character device"}


@needs_fifo
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_model_file_that_is_not_a_file(model_dir: Path, name: str, kind: str) -> None:
    _replace_with(model_dir / name, kind)
    with pytest.raises(OpswitchError) as exc:
        load_gpt2(model_dir)
    one_line(exc, f"{name} is {KINDS[kind]}", "not a file")


@needs_fifo
@pytest.mark.parametrize("kind", KINDS)
def test_index_that_is_not_a_file(model_dir: Path, kind: str) -> None:
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00001.safetensors")
    _replace_with(model_dir / "model.safetensors.index.json", kind)
    with pytest.raises(WeightsError) as exc:
        load_gpt2(model_dir)
    one_line(exc, f"index.json is {KINDS[kind]}")


@needs_fifo
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer.json"])
def test_tokenizer_file_that_is_not_a_file(tmp_path: Path, name: str, kind: str) -> None:
    for other in ("vocab.json", "merges.txt") if name != "tokenizer.json" else ():
        (tmp_path / other).write_text('{"a": 0}' if other == "vocab.json" else "")
    _replace_with(tmp_path / name, kind)
    with pytest.raises(TokenizerError) as exc:
        load_tokenizer(tmp_path)
    one_line(exc, f"{name} is {KINDS[kind]}")


def test_not_a_file_says_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert not_a_file(tmp_path / "f") is None
    assert not_a_file(tmp_path) == "a directory"
    assert not_a_file(tmp_path / "nothing") == "missing"
    (tmp_path / "link").symlink_to(tmp_path / "nothing")
    assert not_a_file(tmp_path / "link") == "a dangling link"


def test_oversized_config_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.truncate(CONFIG_LIMIT + 1)  # sparse: costs no disk
    with pytest.raises(ConfigError) as exc:
        GPT2Config.from_json(path)
    one_line(exc, "config.json", "bytes, more than any config file")


# -- parser limits -------------------------------------------------------------------------

HOSTILE_JSON = {
    "deep nesting": "[" * 100_000 + "]" * 100_000,
    "deep object": '{"a":' * 100_000 + "1" + "}" * 100_000,
    "5000-digit integer": '{"vocab_size": ' + "9" * 5000 + "}",
    "NaN": '{"vocab_size": NaN}',
    "not UTF-8": b'{"a": "\xff"}',
    "truncated": '{"a": [1, 2',
    "empty": "",
}


@pytest.mark.parametrize("content", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
@pytest.mark.parametrize(
    "name", ["config.json", "vocab.json", "tokenizer.json", "model.safetensors.index.json"]
)
def test_hostile_json(model_dir: Path, name: str, content: str | bytes) -> None:
    path = model_dir / name
    if name == "model.safetensors.index.json":
        (model_dir / "model.safetensors").unlink()
    if name == "vocab.json":
        (model_dir / "merges.txt").write_text("")
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(data)
    with pytest.raises(OpswitchError) as exc:
        if name in ("vocab.json", "tokenizer.json"):
            load_tokenizer(model_dir)
        else:
            load_gpt2(model_dir)
    one_line(exc, name)


def test_read_json_names_the_file_and_raises_the_callers_error(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("[" * 50_000)
    with pytest.raises(TokenizerError) as exc:
        read_json(path, what="test", limit=1 << 20, error=TokenizerError)
    one_line(exc, str(path), "too deeply")


# -- the same model directory, copied, keeps loading -----------------------------------------

def test_regular_files_through_symlinks_still_load(model_dir: Path, tmp_path: Path) -> None:
    """Hub snapshots are symlinks to blobs: links to regular files are fine."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in model_dir.iterdir():
        (linked / f.name).symlink_to(f)
    config, params = load_gpt2(linked)
    assert config == SMALL
    np.testing.assert_array_equal(params["wte"], load_gpt2(model_dir)[1]["wte"])
    shutil.rmtree(linked)


# -- sizes checked against each other before anything proportional is allocated ------------

def peak_bytes(fn) -> int:
    """Peak Python allocation while ``fn`` runs (it must raise OpswitchError)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(OpswitchError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("n_layer", [3, 10**6, 10**9, 10**18])
def test_config_claiming_more_layers_than_the_weights_hold(model_dir: Path, n_layer: int) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "n_layer": n_layer}))
    assert peak_bytes(lambda: load_gpt2(model_dir)) < 20 * 2**20
    with pytest.raises(ConfigError) as exc:
        load_gpt2(model_dir)
    one_line(exc, f"n_layer={n_layer}", "holds 2 layer(s) (h.0 ... h.1)", "config.json")


def test_save_with_a_config_claiming_a_billion_layers(tmp_path: Path) -> None:
    from dataclasses import replace

    huge = replace(SMALL, n_layer=10**9)
    assert peak_bytes(lambda: save_gpt2(tmp_path, huge, random_params(SMALL))) < 20 * 2**20


def _gpt2_like_vocab() -> dict[str, int]:
    from opswitch.tokenizer.bytes_to_unicode import BYTE_TO_UNICODE

    return {char: i for i, char in enumerate(BYTE_TO_UNICODE)}


@pytest.mark.parametrize("huge_id", [10**8, 10**9, 2**62])
def test_vocab_json_with_one_huge_id(tmp_path: Path, huge_id: int) -> None:
    vocab = {**_gpt2_like_vocab(), "<|endoftext|>": huge_id}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    assert peak_bytes(lambda: load_tokenizer(tmp_path)) < 20 * 2**20
    with pytest.raises(TokenizerError) as exc:
        load_tokenizer(tmp_path)
    one_line(exc, "vocab.json", f"has id {huge_id}", "far beyond the 257 ids")


@pytest.mark.parametrize("huge_id", [10**8, 10**9])
def test_tokenizer_json_added_token_with_a_huge_id(tmp_path: Path, huge_id: int) -> None:
    data = {
        "added_tokens": [{"id": huge_id, "content": "<pad>", "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "model": {"type": "BPE", "vocab": _gpt2_like_vocab(), "merges": []},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert peak_bytes(lambda: load_tokenizer(tmp_path)) < 20 * 2**20
    with pytest.raises(TokenizerError) as exc:
        load_tokenizer(tmp_path)
    one_line(exc, "tokenizer.json", "'<pad>' has id")


def test_small_gaps_in_ids_are_still_fine(tmp_path: Path) -> None:
    """Padded vocabularies and added tokens at round numbers leave gaps: those load."""
    vocab = {**_gpt2_like_vocab(), "<|endoftext|>": 512}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 513 and tok.eot_id == 512


# -- a huge prompt costs the work of the context, not of the text ---------------------------

@pytest.fixture(scope="module")
def gpt2_tokenizer(gpt2_tokenizer_dir):
    return load_tokenizer(gpt2_tokenizer_dir)


HUGE_TEXTS = {
    "prose": "It is a truth universally acknowledged. " * 250_000,
    "one long word": "a" * 10_000_000,
    "spaces": " " * 10_000_000,
    "emoji": "👋" * 2_500_000,
    "added tokens": "<|endoftext|>" * 800_000,
}


@pytest.mark.parametrize("text", HUGE_TEXTS.values(), ids=HUGE_TEXTS.keys())
def test_encode_with_max_tokens_stops_early(gpt2_tokenizer, text: str) -> None:
    import time

    from opswitch.core.errors import TextTooLongError

    start = time.perf_counter()
    assert peak_bytes(lambda: gpt2_tokenizer.encode(text, max_tokens=1024)) < 50 * 2**20
    with pytest.raises(TextTooLongError) as exc:
        gpt2_tokenizer.encode(text, max_tokens=1024)
    one_line(exc, "more than 1024 tokens")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("text", ["", "hello world", "a" * 300, "👋 " * 100, "x<|endoftext|>y"])
def test_encode_with_max_tokens_is_encode_when_the_text_fits(gpt2_tokenizer, text: str) -> None:
    from opswitch.core.errors import TextTooLongError

    ids = gpt2_tokenizer.encode(text)
    assert gpt2_tokenizer.encode(text, max_tokens=len(ids)) == ids
    if ids:
        with pytest.raises(TextTooLongError):
            gpt2_tokenizer.encode(text, max_tokens=len(ids) - 1)


def test_char_tokenizer_max_tokens() -> None:
    from opswitch.core.errors import TextTooLongError
    from opswitch.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("ab")
    assert tok.encode("abab", max_tokens=4) == [0, 1, 0, 1]
    with pytest.raises(TextTooLongError):
        tok.encode("ab" * 5_000_000, max_tokens=4)
    with pytest.raises(TokenizerError, match="max_tokens"):
        tok.encode("ab", max_tokens=-1)


# -- the command line -------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, stdin=None, stdout=None, stderr=None, env=None, **kw):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("OPSWITCH_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "opswitch", *args], stdin=stdin, stdout=stdout, stderr=stderr,
        env=env, timeout=120, **kw,
    )


def run_sh(script: str) -> tuple[int, str, str]:
    """Run ``script`` in sh (for `<&-`, `2>&-`, `>/dev/full`) with our PYTHONPATH."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PY": sys.executable}
    env.pop("OPSWITCH_DEBUG", None)
    r = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout, r.stderr


GEN = '"$PY" -m opswitch generate --max-tokens 3 --seed 1 -q'


@pytest.mark.parametrize(
    ("script", "code", "stdout", "stderr"),
    [
        (f"{GEN} --prompt Hi <&-", 0, "any", ""),
        (f"{GEN} <&-", 2, "", "the prompt is empty"),
        (f"{GEN} --prompt Hi 2>&-", 0, "any", ""),
        (f"{GEN} --model /nonexistent/model 2>&-", 2, "", ""),  # the error must not go to stdout
        (f"{GEN} --prompt Hi >&-", 0, "", ""),
    ],
    ids=["closed stdin", "closed stdin, prompt from it", "closed stderr", "closed stderr, error",
         "closed stdout"],
)
def test_closed_standard_streams(script: str, code: int, stdout: str, stderr: str) -> None:
    rc, out, err = run_sh(script)
    assert rc == code, (out, err)
    assert "Traceback" not in err and "internal error" not in err, err
    if stdout != "any":
        assert out == stdout, out
    assert stderr in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("command", [f"{GEN} --prompt Hi", '"$PY" -m opswitch backends'])
def test_stdout_on_a_full_disk(command: str) -> None:
    rc, _, err = run_sh(f"{command} >/dev/full")
    assert rc == 2, err
    assert err.strip().splitlines() == ["opswitch: error: cannot write the output: No space left on device"]


def test_tiny_temperature_is_greedy_in_the_cli() -> None:
    greedy = cli("generate", "--prompt", "Once", "--max-tokens", "8", "-q", "--temperature", "0",
                 capture_output=True, text=True)
    tiny = cli("generate", "--prompt", "Once", "--max-tokens", "8", "-q", "--temperature", "1e-320",
               capture_output=True, text=True)
    assert greedy.returncode == tiny.returncode == 0, tiny.stderr
    assert tiny.stdout == greedy.stdout


def test_eos_outside_the_vocabulary_is_a_one_line_warning(model_dir: Path, gpt2_tokenizer_dir) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": 70000}))
    with pytest.warns(UserWarning, match=r"eos_token_id=70000 is outside the vocabulary \(vocab_size=61\)"):
        GPT2Config.from_json(model_dir / "config.json")
    r = cli("generate", "--model", str(model_dir), "--tokenizer", str(gpt2_tokenizer_dir), "--prompt", "!",
            "--max-tokens", "2", "-q", capture_output=True, text=True)
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert warnings and warnings[0].startswith("opswitch: warning: ") and "eos_token_id=70000" in warnings[0]


def test_config_we_write_for_a_small_vocabulary_loads_without_warning(tmp_path: Path) -> None:
    import warnings

    config = GPT2Config(vocab_size=61, n_positions=16, n_embd=8, n_layer=1, n_head=2)  # eos default 50256
    save_gpt2(tmp_path, config, random_params(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GPT2Config.from_json(tmp_path / "config.json").eos_token_id is None


@pytest.mark.parametrize("target", ["/nonexistent/dir/x.json", "DIR"])
def test_bench_json_path_is_checked_before_running(tmp_path: Path, target: str) -> None:
    import time

    target = str(tmp_path) if target == "DIR" else target
    start = time.perf_counter()
    r = cli("bench", "--json", target, "--shape", "gpt2-xl", "--no-reference", capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"opswitch: error: cannot write --json {target}"), r.stderr
    assert time.perf_counter() - start < 30
