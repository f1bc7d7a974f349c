"""``save_gpt2(..., overwrite=True)`` deletes only stale weight shards, only after the new
files are in place, and leaves a loadable directory wherever a crash hits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import save_sharded

from opswitch.bench.models import random_params
from opswitch.core.errors import WeightsError
from opswitch.model.config import GPT2Config
from opswitch.model.weights import INDEX_NAME, load_gpt2, save_gpt2

CONFIG = GPT2Config(vocab_size=61, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                    bos_token_id=0, eos_token_id=60)
OLD, NEW = random_params(CONFIG, seed=1), random_params(CONFIG, seed=2)


def wte(directory: Path) -> np.ndarray:
    return load_gpt2(directory)[1]["wte"]


def test_overwrite_keeps_files_an_old_index_names_that_are_not_shards(tmp_path: Path) -> None:
    save_sharded(tmp_path, CONFIG, OLD)
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "notes.safetensors").write_bytes(b"mine")
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    # A hostile or buggy index may name anything: it must not turn a save into a deletion.
    index["extra"] = {"x": "vocab.json"}
    index["weight_map"]["transformer.ln_f.bias"] = "model.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    save_gpt2(tmp_path, CONFIG, NEW, overwrite=True)
    assert (tmp_path / "vocab.json").read_text() == '{"a": 0}'
    assert (tmp_path / "notes.safetensors").read_bytes() == b"mine"
    assert not (tmp_path / INDEX_NAME).exists()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    np.testing.assert_array_equal(wte(tmp_path), NEW["wte"])


def test_overwrite_with_an_unreadable_index_deletes_no_shard(tmp_path: Path) -> None:
    files = save_sharded(tmp_path, CONFIG, OLD)
    (tmp_path / INDEX_NAME).write_text("not json")
    save_gpt2(tmp_path, CONFIG, NEW, overwrite=True)
    assert all((tmp_path / f).exists() for f in files)  # not provably ours: kept
    np.testing.assert_array_equal(wte(tmp_path), NEW["wte"])


class Crash(BaseException):
    """A kill -9 at a chosen moment (BaseException: nothing may catch it)."""


def _crash_at(monkeypatch: pytest.MonkeyPatch, k: int) -> list[str]:
    """Raise Crash at the k-th file-system change (rename or delete) save_gpt2 makes."""
    calls: list[str] = []
    real_replace, real_unlink = os.replace, Path.unlink

    def step(what: str) -> None:
        calls.append(what)
        if len(calls) == k:
            raise Crash(what)

    def replace(src, dst, *a, **kw):
        step(f"rename {Path(dst).name}")
        return real_replace(src, dst, *a, **kw)

    def unlink(self, *a, **kw):
        if not self.name.endswith(".tmp"):  # atomic_write's own clean-up after a crash
            step(f"delete {self.name}")
        return real_unlink(self, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    return calls


@pytest.mark.parametrize("sharded", [True, False], ids=["from sharded", "from single file"])
def test_a_crash_at_any_step_leaves_a_loadable_directory(tmp_path: Path, monkeypatch, sharded: bool) -> None:
    k = 1
    while True:
        directory = tmp_path / str(k)
        if sharded:
            save_sharded(directory, CONFIG, OLD)
        else:
            save_gpt2(directory, CONFIG, OLD)
        with monkeypatch.context() as m:
            calls = _crash_at(m, k)
            try:
                save_gpt2(directory, CONFIG, NEW, overwrite=True)
                finished = True
            except Crash:
                finished = False
        got = wte(directory)  # loads, whatever the step
        assert np.array_equal(got, OLD["wte"]) or np.array_equal(got, NEW["wte"]), calls
        if finished:
            np.testing.assert_array_equal(got, NEW["wte"])
            break
        k += 1
    assert k >= 3 if sharded else k >= 2


def test_a_killed_writers_temporary_files_are_never_loaded_and_cleaned_up(tmp_path: Path) -> None:
    save_gpt2(tmp_path, CONFIG, OLD)
    garbage = [".model.safetensors.0123456789ab.tmp", ".config.json.ba9876543210.tmp"]
    for name in garbage:
        (tmp_path / name).write_bytes(b"\x00" * 100)
    np.testing.assert_array_equal(wte(tmp_path), OLD["wte"])
    save_gpt2(tmp_path, CONFIG, NEW, overwrite=True)
    assert not any((tmp_path / name).exists() for name in garbage)
    np.testing.assert_array_equal(wte(tmp_path), NEW["wte"])


@pytest.mark.parametrize("shard", ["vocab.json", ".model.safetensors.0123456789ab.tmp", "config.json"])
def test_an_index_may_only_name_safetensors_files(tmp_path: Path, shard: str) -> None:
    save_sharded(tmp_path, CONFIG, OLD)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["transformer.wte.weight"] = shard
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    (tmp_path / shard).write_bytes(b"{}")
    with pytest.raises(WeightsError, match=r"is not a \.safetensors file"):
        load_gpt2(tmp_path)
