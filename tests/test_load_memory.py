"""Reduced formats load like f32: each memory-mapped tensor's f32 pages leave the process
once it is encoded, and nothing read afterwards differs."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from opswitch.bench.models import random_params
from opswitch.core.registry import get_registry
from opswitch.model.config import GPT2Config
from opswitch.model.gpt2 import GPT2
from opswitch.model.weights import load_gpt2, release_pages, save_gpt2

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


def resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):

    config = GPT2Config(vocab_size=4096, n_positions=64, n_embd=1024, n_layer=1, n_head=4)
    directory = tmp_path_factory.mktemp("wide")
    save_gpt2(directory, config, random_params(config))
    return directory


@linux
def test_an_encoded_tensors_file_pages_leave_the_process(model_dir):
    _, params = load_gpt2(model_dir)  # the finite-check read every page of the 16 MiB wte
    wte = params["wte"]
    before, total = resident_bytes(), float(wte.sum(dtype=np.float64))
    release_pages(wte)
    dropped = before - resident_bytes()
    assert dropped >= 0.9 * wte.nbytes, f"only {dropped} of {wte.nbytes} bytes left the process"
    assert float(wte.sum(dtype=np.float64)) == total  # read back from the file, unchanged


def test_release_leaves_arrays_it_does_not_own_alone():
    a = np.arange(1 << 20, dtype=np.float32)
    release_pages(a)  # heap memory: never advised away
    release_pages(a[3:7])
    assert a[5] == 5 and a[-1] == (1 << 20) - 1


@pytest.mark.parametrize("fmt", ["bf16", "int8", "f16"])
def test_a_model_bound_again_after_its_pages_left_computes_the_same(tmp_path, tiny_config, tiny_params, fmt):
    model_dir = tmp_path / "tiny"
    save_gpt2(model_dir, tiny_config, tiny_params)
    config, params = load_gpt2(model_dir)
    model = GPT2(config, params, get_registry().select("naive").backend, weights=fmt)
    first = model.forward([1, 2, 3])
    model.bind(get_registry().select("naive").backend)  # re-encodes from the (released) mapping
    np.testing.assert_array_equal(model.forward([1, 2, 3]), first)
    fresh = GPT2(*load_gpt2(model_dir), get_registry().select("naive").backend, weights=fmt)
    np.testing.assert_array_equal(fresh.forward([1, 2, 3]), first)
