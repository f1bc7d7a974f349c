"""Plain helpers the test modules share: import them ``from helpers import ...`` (never from
conftest.py or from another test module; fixtures live in conftest.py).

The CLI runner, the server runner and the JSON Lines helpers are here; random-weight and
HF-model builders are ``opswitch.bench.models``'s (one of each, shared with the benchmarks).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows) -> Path:
    """Rows as JSON Lines; a row that is a string is written as it is (a hostile line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one_error_line(capsys) -> str:
    """The CLI's stderr is exactly one ``opswitch: error:`` line: returned."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("opswitch: error:"), err
    return err[0]


def expect_result_or_opswitch_error(fn, *args):
    """``fn(*args)``'s result, or None when it raised an OpswitchError of one short line
    (what fuzzed input may get; any other exception fails the test)."""
    import warnings

    from opswitch.core.errors import OpswitchError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args)
        except OpswitchError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 1000, str(exc)
            return None


def save_sharded(directory: Path, config, params: dict, shards: int = 3) -> list[str]:
    """What HF's save_pretrained(max_shard_size=...) writes: an index and model-XXXXX-of-XXXXX files."""
    from opswitch.model.safetensors import save_safetensors
    from opswitch.model.weights import INDEX_NAME, flatten_params, save_gpt2

    save_gpt2(directory, config, params, overwrite=True)
    (directory / "model.safetensors").unlink()
    flat = {"transformer." + n: a for n, a in flatten_params(params).items()}
    names = sorted(flat)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, file in enumerate(files):
        part = names[i::shards]
        save_safetensors(directory / file, {n: flat[n] for n in part}, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


# -- the CLI in its own process -----------------------------------------------------------------
def run_cli(*args, input: str | None = None, env: Mapping[str, str] | None = None,
            base: Mapping[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m opswitch ARGS`` in a fresh process, stdout and stderr captured as text.

    The child's environment is ``base`` (default: this process's), unbuffered output, then ``env``."""
    environment = {**(os.environ if base is None else base), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "opswitch", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=timeout, env=environment)


def save_hf(model, directory: Path) -> Path:
    """An HF model saved as a safetensors directory (what users download)."""
    model.save_pretrained(directory, safe_serialization=True)
    return directory


# -- `opswitch serve` in its own process ---------------------------------------------------------
KEY = "test-key"  # the serve tests' API key
BACKEND = "blas"  # the serve tests' backend
PROMPT = "It is a truth universally acknowledged"


class Server:
    """`python -m opswitch serve` on a free loopback port, stopped with SIGINT as a user would."""

    def __init__(self, *args: str) -> None:
        # one BLAS thread unless told otherwise: on a small shared machine, threaded GEMMs of a few
        # rows spend their time waiting for each other
        env = {"OPSWITCH_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opswitch", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise RuntimeError("the server exited:\n" + "".join(self.log)) from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the server did not start:\n" + "".join(self.log)) from None
                continue
            found = re.search(r"at (http://\S+)/v1 ", line)
            if found:
                self.url = found.group(1)
                break

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def openai_client(server: Server, timeout: float = 120):
    """The official client on ``server`` with the tests' key and no retries (a retry would hide a failure)."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=timeout)


def http(server: Server, method: str, path: str, key: str | None = KEY, headers: dict | None = None,
         **kwargs):
    """A raw HTTP request to ``server`` (for what the openai client would not send)."""
    import httpx  # the serve extra: the modules that call this require it first

    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return httpx.request(method, f"{server.url}{path}", headers=headers, **{"timeout": 60, **kwargs})


def metric(server: Server, name: str) -> float:
    """One value of the server's Prometheus /metrics."""
    text = http(server, "GET", "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


# -- models for the parity tests ------------------------------------------------------
PARITY_SHAPES = {
    # odd sizes: n_embd 96 over 3 heads (head dim 32), vocab not a multiple of 8
    "odd-96x3-v1001": dict(n_layer=2, n_embd=96, n_head=3, vocab_size=1001, n_positions=128),
    # n_inner not 4·n_embd, head dim 16, 3 layers
    "inner200-64x4-v517": dict(n_layer=3, n_embd=64, n_head=4, vocab_size=517, n_positions=96, n_inner=200),
    # GPT-2's real vocabulary size: the tied lm_head is a 50257-row matrix
    "gpt2vocab-128x2": dict(n_layer=1, n_embd=128, n_head=2, vocab_size=50257, n_positions=80),
    # an untied lm_head (its own matrix), and an epsilon that is not the default
    "untied-eps1e-6-48x2": dict(n_layer=2, n_embd=48, n_head=2, vocab_size=333, n_positions=96,
                                tie_word_embeddings=False, layer_norm_epsilon=1e-6),
}
# float32 logits are sums over n_embd products after a dozen ops, each carrying
# ~1e-7 relative error; HF's own float32 result has the same order of error, so
# agreement to 2e-5 of the logit scale is what two correct float32 runs give.
LOGIT_RTOL = 2e-5


def random_prompt(vocab_size: int, n: int = 23) -> list[int]:
    """``n`` ids of a vocabulary, the same for one vocabulary size."""
    return np.random.default_rng(vocab_size).integers(0, vocab_size, n).tolist()
