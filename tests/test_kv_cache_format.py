"""--kv-cache f16 as a user meets it: the option, the memory it saves, refusals in one line.
(The values an f16 cache gives are the conformance suite's: opswitch/testing/test_conformance.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import read_jsonl, run_cli, write_jsonl

import opswitch as api
from opswitch.backends.naive import NaiveBackend
from opswitch.core.errors import BackendError, OpswitchError
from opswitch.model.gpt2 import GPT2

GREEDY = ["--temperature", "0", "--max-tokens", "8", "--stop-token", "-1"]


def batch_args(inp, out, *more: str) -> list[str]:
    """``opswitch batch generate`` of ``inp``: 8 tokens a row, seed 7, shards of 2 rows."""
    return ["batch", "generate", "--input", str(inp), "--output", str(out), "--max-tokens", "8",
            "--seed", "7", "--shard-size", "2", "--batch-size", "1", "--stop-token", "-1", *more]


class F32CacheOnly(NaiveBackend):
    name = "f32-cache-only"
    kv_formats = ("f32",)


@pytest.mark.parametrize("backend", ["cpu", "blas", "naive"])
def test_an_f16_cache_is_float16_and_half_the_bytes(tiny_config, tiny_params, backend):
    from opswitch.core.registry import get_registry

    chosen = get_registry().select(backend).backend
    f32, f16 = (GPT2(tiny_config, tiny_params, chosen, kv_cache=kv) for kv in ("f32", "f16"))
    a, b = f32.new_cache(40), f16.new_cache(40)
    assert all(k.dtype == np.float16 and v.dtype == np.float16 for k, v in b.layers)
    assert b.nbytes * 2 == a.nbytes == sum(k.nbytes + v.nbytes for k, v in a.layers)
    assert f16.cache_pool(1 << 20).bytes_for(40) * 2 == f32.cache_pool(1 << 20).bytes_for(40)
    # and it decodes through the model: a prompt, then a step at a time (values: conformance)
    assert np.isfinite(f16.next_logits([1, 2, 3, 4, 5], b)).all()
    for t in range(20):
        assert np.isfinite(f16.next_logits([t % 60], b)).all()
    assert b.length == 25


def test_a_backend_without_f16_caches_refuses_in_one_line(tiny_config, tiny_params):
    with pytest.raises(BackendError, match="keeps its KV cache in f32 only, not f16: use --kv-cache f32"):
        GPT2(tiny_config, tiny_params, F32CacheOnly(), kv_cache="f16")
    with pytest.raises(BackendError, match="--kv-cache f32"):
        api.load_model(None, backend=F32CacheOnly(), kv_cache="f16")  # before reading any weights


def test_an_unknown_cache_format_is_refused():
    with pytest.raises(OpswitchError, match="unknown KV-cache format 'f8': use one of f32, f16"):
        api.load_model(None, backend="naive", kv_cache="f8")


def test_the_cli_flag_generates_and_says_so(tiny_model_dir):
    r = run_cli("generate", "--model", tiny_model_dir, "--backend", "cpu", "--kv-cache", "f16",
                 "--prompt", "Hello world", *GREEDY)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "KV cache stored as f16" in r.stderr
    assert r.stdout.startswith("Hello world")
    bad = run_cli("generate", "--model", tiny_model_dir, "--kv-cache", "f8", "--prompt", "Hi")
    assert bad.returncode == 2 and "--kv-cache" in bad.stderr


def test_the_cli_refuses_f16_on_a_backend_that_lacks_it(tiny_model_dir):
    from opswitch.core.registry import get_registry

    if "example" not in get_registry().names():  # the example plugin: cheap to start, f32 caches only
        pytest.skip("the example plugin is not installed")
    r = run_cli("generate", "--model", tiny_model_dir, "--backend", "example", "--kv-cache", "f16",
                 "--prompt", "Hi", *GREEDY)  # fmt: skip
    assert r.returncode != 0
    assert "--kv-cache f32" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_batch_takes_the_flag_and_will_not_resume_across_formats(tmp_path, capsys):
    from opswitch.batch import Job, JobSpec, Task, generation_settings, row_seed
    from opswitch.cli.main import main

    prompts = ["Mr. Darcy", "In the morning"]
    inp = write_jsonl(tmp_path / "p.jsonl", [{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)])
    out = tmp_path / "o.jsonl"
    assert main(batch_args(inp, out, "--backend", "cpu", "--kv-cache", "f16", "-q")) == 0
    lm = api.load_model(None, backend="cpu", kv_cache="f16")
    for i, row in enumerate(read_jsonl(out)):  # the rows are what load_model(kv_cache="f16") generates
        settings = {"max_new_tokens": 8, "seed": row_seed(7, i), "stop_token": -1, "temperature": 0.8,
                    "top_k": 40, "top_p": 0.9}
        assert row["completion_ids"] == lm.generate_ids(row["prompt"], **settings).new_ids
    # a job's shards record the cache format: resuming with another is refused by name
    half = tmp_path / "half.jsonl"
    same = generation_settings(max_new_tokens=8, seed=7, stop_token=-1)  # as cli_args has them
    Job(JobSpec(Task("generate", "prompt", generation=same, kv_cache="f16"), inp, half, shard_size=2)).start()
    assert main(batch_args(inp, half, "--resume")) == 2
    assert "different --kv-cache this time" in capsys.readouterr().err


def test_the_bench_measures_an_f16_cache_and_counts_its_bytes():
    from opswitch.bench.machine import kv_bytes_read
    from opswitch.bench.models import TINY
    from opswitch.bench.worker import _engine_model

    _, model = _engine_model("ours", "tiny", "naive", "f16:f16")  # FMT:KV, as bench --kv-cache f16 passes it
    assert (model.weights, model.kv_cache) == ("f16", "f16")
    _, plain = _engine_model("ours", "tiny", "naive", "int8")
    assert (plain.weights, plain.kv_cache) == ("int8", "f32")
    f32_bytes = 2 * TINY.n_layer * TINY.n_embd * 100 * 4  # keys and values, 4 bytes a value
    assert kv_bytes_read(TINY, 100, "f16") * 2 == kv_bytes_read(TINY, 100) == f32_bytes
