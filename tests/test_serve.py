"""`opswitch serve` as clients meet it: a real server process on loopback, the official
`openai` client, raw HTTP for what that client would not send, and a small load test."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from helpers import BACKEND, KEY, PROMPT, Server, http, metric, openai_client
from support import require

for _module in ("starlette", "uvicorn", "sse_starlette", "openai", "httpx"):
    require(_module)

import httpx  # noqa: E402
import openai  # noqa: E402

import opswitch  # noqa: E402

MAX_BATCH, MAX_QUEUE = 8, 32


@pytest.fixture(scope="module")
def server():
    s = Server("--backend", BACKEND, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
               "--api-key", KEY)
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="module")
def lm():
    return opswitch.load_model(None, backend=BACKEND)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


SAMPLED = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}


# -- completions equal lm.generate ---------------------------------------------------------------
@pytest.mark.parametrize("settings", [{"temperature": 0}, {**SAMPLED, "seed": 7}], ids=["greedy", "seeded"])
def test_completion_equals_lm_generate(client, lm, settings):
    top_k = settings.get("top_k")
    body = {k: v for k, v in settings.items() if k != "top_k"}
    extra = {"extra_body": {"top_k": top_k}} if top_k else {}
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, **body, **extra)
    same = dict(max_new_tokens=24, temperature=settings["temperature"], top_k=top_k or 0,
                top_p=settings.get("top_p", 1.0), seed=settings.get("seed"))
    expected = lm.generate(PROMPT, **same)
    assert r.choices[0].text == expected and expected
    assert r.object == "text_completion" and r.model == "demo" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(lm.encode(PROMPT))
    assert r.usage.completion_tokens == len(lm.generate_ids(PROMPT, **same).new_ids)

    stream = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, stream=True,
                                       stream_options={"include_usage": True}, **body, **extra)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_token_ids_lists_and_n(client, lm):
    ids = lm.encode("The weather")
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == lm.generate(ids, max_new_tokens=10, temperature=0)
    prompts = ["Once upon a time", "Mr. Darcy"]
    r = client.completions.create(model="demo", prompt=prompts, max_tokens=10, n=2, seed=3, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:  # prompt i, choice j: seed 3 + j
        prompt, j = prompts[c.index // 2], c.index % 2
        assert c.text == lm.generate(prompt, max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0,
                                     seed=3 + j)
    assert r.usage.prompt_tokens == sum(len(lm.encode(p)) for p in prompts)


def test_stop_strings_cut_the_text_also_when_streaming(client, lm):
    full = lm.generate(PROMPT, max_new_tokens=40, temperature=0)
    stop = full[8:12]  # a string that certainly occurs
    expected = full[: full.index(stop)]
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=40, temperature=0,
                                  stop=[stop, "zzz"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="demo", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                                       stream=True)
    chunks = [c.choices[0] for c in stream]
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"


def test_logprobs(client, lm):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) == 2 and max(top.values()) == pytest.approx(chosen, abs=1e-9)


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["demo"]
    health = http(server, "GET", "/health", key=None)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = http(server, "GET", "/metrics").text
    for name in ("opswitch_queue_length", "opswitch_running_sequences", "opswitch_tokens_per_second",
                 "opswitch_request_latency_seconds_bucket", "opswitch_time_to_first_token_seconds_count"):
        assert name in text


# -- errors: OpenAI's shapes and status codes, and the server keeps serving --------------------------
def test_client_errors_are_the_clients_exception_types(client, server):
    cases = [
        (openai.BadRequestError, dict(max_tokens=-1), "max_tokens"),
        (openai.BadRequestError, dict(temperature=-0.5), "temperature"),
        (openai.BadRequestError, dict(top_p=1.5), "top_p"),
        (openai.BadRequestError, dict(extra_body={"frobnicate": 1}), "frobnicate"),
        (openai.BadRequestError, dict(prompt="word " * 300), "prompt"),
        (openai.BadRequestError, dict(max_tokens=260), "max_tokens"),
        (openai.BadRequestError, dict(echo=True), "echo"),
        (openai.NotFoundError, dict(model="gpt-4"), "model"),
    ]
    for error, changes, param in cases:
        args = {"model": "demo", "prompt": PROMPT, "max_tokens": 5, **changes}
        with pytest.raises(error) as info:
            client.completions.create(**args)
        assert info.value.body["param"] == param, info.value.body
        assert info.value.body["message"] and info.value.body["type"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo", prompt="word " * 300)
    assert info.value.code == "context_length_exceeded" and "256" in info.value.message
    with pytest.raises(openai.NotFoundError, match="no chat template"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="demo", prompt=PROMPT, max_tokens=2)
    assert client.completions.create(model="demo", prompt=PROMPT, max_tokens=2).choices[0].text


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b'["a list"]', 400, "JSON object"),
    (b'{"model": "demo", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    (b'{"model": "demo", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    (b'{"model": "demo", "prompt": "x", "n": 1.5}', 400, "n must be an integer"),
    (b'{"model": "demo", "prompt": [1, "a"]}', 400, "prompt"),
    (b'{"model": "demo", "prompt": [99999]}', 400, "vocabulary"),
    (b'{"model": "demo", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"model": "demo", "prompt": "x", "stream": "yes"}', 400, "stream"),
    (b'{"prompt": "x"}', 400, "model"),
    (b'{"model": "demo", "prompt": "' + b"a" * (2 << 20) + b'"}', 413, "limit"),
])
def test_bad_input_is_an_openai_error_and_the_server_keeps_serving(server, body, status, fragment):
    r = http(server, "POST", "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert http(server, "GET", "/health", key=None).status_code == 200


def test_unknown_route_and_missing_key(server):
    r = http(server, "GET", "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = http(server, "POST", "/v1/completions", key=None, json={"model": "demo", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_full_queue_is_429_and_a_disconnect_frees_the_batch(server):
    """A request of MAX_QUEUE sequences fills the queue; the next gets 429 with Retry-After.
    Closing the first stream cancels its sequences and frees their cache."""
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 200, "n": MAX_QUEUE, "stream": True,
            "temperature": 1.0, "seed": 1}
    headers = {"Authorization": f"Bearer {KEY}"}
    before = metric(server, "opswitch_generated_tokens_total")
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.url}/v1/completions", json=body,
                                                 headers=headers) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # (kept: closing the iterator would close the connection)
        next(lines)  # the first token has been made: the batch runs, the rest waits
        assert metric(server, "opswitch_running_sequences") == MAX_BATCH
        assert metric(server, "opswitch_kv_cache_bytes_in_use") > 0
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, n=MAX_BATCH + 1)
        assert info.value.response.headers["retry-after"] == "1"
    deadline = time.monotonic() + 30  # the stream is closed: its sequences go at the next step
    while metric(server, "opswitch_running_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "opswitch_running_sequences") == 0
    assert metric(server, "opswitch_queue_length") == 0
    assert metric(server, "opswitch_kv_cache_bytes_in_use") == 0
    # cancelled, not finished: finishing would have made MAX_QUEUE * 200 tokens
    made = metric(server, "opswitch_generated_tokens_total") - before
    assert made < MAX_QUEUE * 200 / 4, f"{made} tokens were made for a stream that was closed"


# -- load: many concurrent clients, every answer checked ------------------------------------------
def test_concurrent_clients_each_get_their_own_greedy_answer(server, lm):
    words = "the quick brown fox jumps over a lazy dog while it is raining in London".split()
    requests = []
    for i in range(48):
        prompt = " ".join(words[j % len(words)] for j in range(i % 7, i % 7 + 1 + (i * 5) % 23))
        requests.append((prompt, 4 + (i * 7) % 29, i % 3 == 0))  # prompt, max_tokens, stream
    expected = [lm.generate(p, max_new_tokens=m, temperature=0) for p, m, _ in requests]

    async def one(http_client: httpx.AsyncClient, prompt: str, max_tokens: int, stream: bool) -> str:
        body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": stream}
        if not stream:
            r = await http_client.post("/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["text"]
        text = ""
        async with http_client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def main() -> list[str]:
        limits = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     headers={"Authorization": f"Bearer {KEY}"}) as http_client:
            async def limited(r):
                async with limits:
                    return await one(http_client, *r)
            return await asyncio.gather(*(limited(r) for r in requests))

    got = asyncio.run(main())
    assert got == expected


def test_a_client_that_leaves_a_whole_request_frees_its_batch(server):
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 200, "n": 16, "temperature": 1.0}
    with pytest.raises(httpx.ReadTimeout):
        http(server, "POST", "/v1/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 30
    while metric(server, "opswitch_running_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "opswitch_running_sequences") == 0
    assert metric(server, "opswitch_kv_cache_bytes_in_use") == 0
    assert 'opswitch_requests_total{status="499"}' in http(server, "GET", "/metrics").text


# -- the command line --------------------------------------------------------------------------------
def test_serve_flags_fail_in_one_line(server):
    from opswitch.cli.serve_cmd import is_loopback

    port = server.url.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "opswitch", "serve", "--port", port], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "cannot listen on 127.0.0.1:" in r.stderr and len(r.stderr.splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "opswitch", "serve", "--max-batch", "0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--max-batch" in r.stderr
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")


def test_missing_serve_extra_names_it(monkeypatch, capsys):
    from opswitch.cli import serve_cmd
    from opswitch.cli.main import main

    # serve_cmd calls opswitch.serve.missing_deps at call time: patch it there (a check
    # left passing would make `serve` really start)
    monkeypatch.setattr(serve_cmd.serve_package, "missing_deps", lambda: ["uvicorn"])
    assert main(["serve"]) == 2
    assert "pip install 'opswitch[serve]'" in capsys.readouterr().err


def test_each_request_is_one_access_log_line_without_the_prompt(server):
    secret = "a prompt that must never reach the log"
    r = http(server, "POST", "/v1/completions", json={"model": "demo", "prompt": secret, "max_tokens": 2})
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("POST /v1/completions" in line for line in server.log):
        time.sleep(0.05)
    assert any("POST /v1/completions" in line and " 200" in line for line in server.log), server.log
    assert not any(secret in line for line in server.log)


def test_the_default_model_id_is_the_directorys_name(tmp_path):
    from opswitch.cli.serve_cmd import default_model_id

    folder = tmp_path / "my-gpt2"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (tmp_path / "exported.onnx").write_bytes(b"")
    assert default_model_id(str(folder)) == "my-gpt2"
    assert default_model_id(str(folder) + "/") == "my-gpt2"
    assert default_model_id(str(folder / "model.safetensors")) == "my-gpt2"
    assert default_model_id(str(tmp_path / "exported.onnx")) == "exported"
    assert default_model_id("openai-community/gpt2") == "openai-community/gpt2"
    assert default_model_id(None) == "demo"
