"""The three entry points on the one engine, as users meet them: stop strings give the same
text in `opswitch generate` (the CLI), `opswitch serve` (the official openai client) and
`opswitch batch` (a row's `stop` field); a client that leaves frees its cache, and a
repeated prompt reuses its prefix, both seen through /metrics."""

from __future__ import annotations

import time

import pytest
from helpers import BACKEND, KEY, Server, metric, openai_client, read_jsonl, write_jsonl
from support import require

for _module in ("starlette", "uvicorn", "sse_starlette", "openai", "httpx"):
    require(_module)


import opswitch  # noqa: E402
from opswitch.cli.main import main  # noqa: E402

PROMPT = "The weather in London is"
GREEDY = {"max_new_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def server(long_context_model_dir):
    s = Server("--model", str(long_context_model_dir), "--name", "long", "--backend", BACKEND,
               "--max-batch", "4", "--prefill-chunk", "16", "--api-key", KEY)
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="module")
def lm(long_context_model_dir):
    return opswitch.load_model(str(long_context_model_dir), backend=BACKEND)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def _straddling_stop(lm) -> tuple[str, str]:
    """A stop string made of the last character of one generated token and the first of the
    next (so it is only found across tokens), and the text expected before it."""
    result = lm.generate_ids(PROMPT, **GREEDY)
    pieces = [lm.decode([t]) for t in result.new_ids]
    k = next(k for k in range(len(pieces) // 2, len(pieces) - 1)
             if pieces[k].strip() and pieces[k + 1].strip())
    stop = pieces[k][-1] + pieces[k + 1][0]
    free = lm.decode(result.new_ids)
    assert result.text == free
    return stop, free[: free.index(stop)]


def test_stop_strings_give_the_same_text_in_generate_serve_and_batch(lm, client, long_context_model_dir,
                                                                     tmp_path, capsys):
    stop, expected = _straddling_stop(lm)
    assert lm.generate(PROMPT, stop=stop, **GREEDY) == expected

    code = main(["generate", "--model", str(long_context_model_dir), "--backend", BACKEND, "--prompt",
                 PROMPT, "--max-tokens", "24", "--temperature", "0", "--stop", "never in it", "--stop", stop,
                 "-q"])
    assert code == 0
    assert capsys.readouterr().out == expected + "\n"

    served = client.completions.create(model="long", prompt=PROMPT, max_tokens=24, temperature=0,
                                       stop=[stop])
    assert served.choices[0].text == expected and served.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="long", prompt=PROMPT, max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected

    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": PROMPT, "stop": stop}, {"prompt": PROMPT},
                                              {"prompt": PROMPT, "stop": [""]}])
    code = main(["batch", "generate", "--model", str(long_context_model_dir), "--backend", BACKEND,
                 "--input", str(inp), "--output", str(tmp_path / "out.jsonl"), "--max-tokens", "24",
                 "--temperature", "0", "--quiet"])
    assert code == 0, capsys.readouterr().err
    with_stop, without = read_jsonl(tmp_path / "out.jsonl")
    (bad,) = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert with_stop["completion"] == expected and with_stop["stop_reason"] == "stop"
    alone = lm.generate_ids(PROMPT, **GREEDY)
    assert without["completion"] == alone.text and without["stop_reason"] == alone.stop_reason
    assert bad["index"] == 2 and "stop" in bad["reason"]


def test_n_completions_in_generate_are_the_servers_n(lm, client, long_context_model_dir, capsys):
    code = main(["generate", "--model", str(long_context_model_dir), "--backend", BACKEND, "--prompt",
                 PROMPT, "--max-tokens", "8", "--temperature", "1", "--seed", "5", "-n", "3", "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    served = client.completions.create(model="long", prompt=PROMPT, max_tokens=8, temperature=1,
                                       top_p=0.9, extra_body={"top_k": 40}, seed=5, n=3)
    assert printed == "".join(c.text + "\n" for c in sorted(served.choices, key=lambda c: c.index))


def _wait_for(server, name: str, want, seconds: float = 30.0) -> float:
    """Poll /metrics until ``want(value)``: what the server says, not a sleep and a hope."""
    deadline = time.monotonic() + seconds
    while True:
        value = metric(server, name)
        if want(value):
            return value
        assert time.monotonic() < deadline, f"{name} stayed at {value}"
        time.sleep(0.02)


def test_a_client_that_leaves_frees_its_cache(client, server):
    before = metric(server, "opswitch_generated_tokens_total")
    stream = client.completions.create(model="long", prompt=PROMPT, max_tokens=3000, temperature=1,
                                       seed=3, stream=True)
    next(iter(stream))  # generating: its cache is held
    assert metric(server, "opswitch_kv_cache_bytes_in_use") > 0
    stream.close()
    _wait_for(server, "opswitch_kv_cache_bytes_in_use", lambda v: v == 0)
    assert metric(server, "opswitch_running_sequences") == 0
    generated = metric(server, "opswitch_generated_tokens_total") - before
    assert generated < 3000  # cancelled, not finished
    assert metric(server, "opswitch_kv_cache_bytes_spare") > 0  # its rows wait for a reuse, in the budget


def test_a_repeated_prompt_reuses_its_prefix_and_answers_the_same(client, server, lm):
    prompt = " ".join(["It is a truth universally acknowledged"] * 12)  # well over a block
    before = metric(server, "opswitch_prefix_cache_hit_tokens_total")
    first = client.completions.create(model="long", prompt=prompt, max_tokens=12, temperature=0)
    second = client.completions.create(model="long", prompt=prompt, max_tokens=12, temperature=0)
    alone = lm.generate(prompt, max_new_tokens=12, temperature=0)
    assert first.choices[0].text == second.choices[0].text == alone
    hits = metric(server, "opswitch_prefix_cache_hit_tokens_total") - before
    assert hits >= len(lm.encode(prompt)) - 32  # all but the last (partial) blocks
    assert metric(server, "opswitch_prefix_cache_evictions_total") >= 0
