"""`opswitch serve` semantics checked against what must happen, not against itself.

* A client that leaves is cancelled: the generated-token counter of /metrics shows
  that the server made far fewer tokens than the request asked for (a 4000-token
  request on a 4096-token model, closed as soon as it runs).  Waiting until the work
  would have finished anyway could not tell cancelling from finishing.
* ``stop`` applies to each of the ``n`` choices.
* logprobs are the float64 log-softmax of the model's own logits on the same text
  (computed here through the Python API).
"""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
from helpers import KEY, Server, metric, openai_client
from support import require

for _module in ("starlette", "uvicorn", "sse_starlette", "openai", "httpx"):
    require(_module)


import opswitch  # noqa: E402

BACKEND = "blas"
# two correct float32 runs of a model agree to 2e-5 of the logit scale (test_parity's LOGIT_RTOL:
# a dozen ops, each ~1e-7 relative); here the server's incremental, batched steps against one forward
LOGIT_RTOL = 2e-5
N_LONG, LONG_TOKENS = 4, 4000  # a request that would take N_LONG * LONG_TOKENS tokens to finish
PROMPT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def server(long_context_model_dir):
    s = Server("--model", str(long_context_model_dir), "--name", "long", "--backend", BACKEND,
               "--max-batch", "8", "--api-key", KEY)
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="module")
def lm(long_context_model_dir):
    return opswitch.load_model(str(long_context_model_dir), backend=BACKEND)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def _raw_request(server, body: dict) -> socket.socket:
    """POST ``body`` on a socket of our own, so that we decide when the connection closes."""
    url = urlsplit(server.url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
    )
    return sock


def _until(condition, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streaming"])
def test_a_client_that_leaves_is_cancelled_not_finished(server, stream):
    before = metric(server, "opswitch_generated_tokens_total")
    body = {"model": "long", "prompt": PROMPT, "max_tokens": LONG_TOKENS, "n": N_LONG, "temperature": 1.0,
            "seed": 11, "stream": stream}
    sock = _raw_request(server, body)
    try:
        if stream:  # the first event has arrived: the request is generating
            received = b""
            while b"data: " not in received:
                chunk = sock.recv(4096)
                assert chunk, "the server closed the stream"
                received += chunk
        else:
            _until(lambda: metric(server, "opswitch_running_sequences") == N_LONG, "the request never ran")
    finally:
        sock.close()
    _until(lambda: metric(server, "opswitch_running_sequences") == 0, "the sequences kept running")
    made = metric(server, "opswitch_generated_tokens_total") - before
    # cancelled at the next step, it makes a few tokens (8 to 24 here); a tenth of the request
    # leaves hundreds of steps for a slow machine.  (All N_LONG sequences ending on the stop
    # token that early, had they run on, is vanishingly unlikely; with seed 11 none does.)
    assert 0 < made < N_LONG * LONG_TOKENS / 10, f"{made} tokens were made for a client that had left"
    assert metric(server, "opswitch_kv_cache_bytes_in_use") == 0
    assert metric(server, "opswitch_queue_length") == 0


N_STOP, STOP_SEED = 3, 5


@pytest.fixture(scope="module")
def unstopped(lm) -> list[str]:
    """Choice j of a request with seed s is ``lm.generate(..., seed=s + j)``."""
    return [lm.generate(PROMPT, max_new_tokens=30, temperature=1.0, top_k=0, top_p=1.0, seed=STOP_SEED + j)
            for j in range(N_STOP)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streaming"])
def test_stop_applies_to_every_one_of_n_choices(client, unstopped, stream):
    n, seed, full = N_STOP, STOP_SEED, unstopped
    # one stop string of each choice's own text (from its middle), so every choice must be cut
    stops = [text[len(text) // 2: len(text) // 2 + 3] for text in full]
    assert all(len(s) == 3 for s in stops), full
    expected = []
    for text in full:
        cut = min((text.index(s) for s in stops if s in text), default=len(text))
        expected.append(text[:cut])
    r = client.completions.create(model="long", prompt=PROMPT, max_tokens=30, n=n, temperature=1.0,
                                  seed=seed, stop=stops, stream=stream)
    if stream:
        texts, reasons = [""] * n, [None] * n
        for chunk in r:
            for c in chunk.choices:
                texts[c.index] += c.text
                reasons[c.index] = c.finish_reason or reasons[c.index]
    else:
        texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
        reasons = [c.finish_reason for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts == expected
    assert reasons == ["stop"] * n


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_logprobs_are_the_log_softmax_of_the_models_logits(client, lm):
    n_tokens, top = 6, 3
    prompt_ids = lm.encode(PROMPT)
    new_ids = lm.generate_ids(PROMPT, max_new_tokens=n_tokens, temperature=0, stop_token=-1).new_ids
    r = client.completions.create(model="long", prompt=PROMPT, max_tokens=n_tokens, temperature=0,
                                  logprobs=top)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == len(new_ids) == n_tokens
    logits = lm.model.forward(prompt_ids + new_ids[:-1])[len(prompt_ids) - 1:]
    allowed = lm.n_vocab_allowed or logits.shape[1]
    reference = _log_softmax(logits[:, :allowed])
    # a log-softmax moves by at most twice its inputs' largest change
    tol = 2 * LOGIT_RTOL * float(np.abs(logits[:, :allowed]).max())
    for step, (token, chosen, alternatives) in enumerate(zip(new_ids, lp.token_logprobs, lp.top_logprobs)):
        assert chosen == pytest.approx(reference[step, token], abs=tol), f"step {step}"
        best = np.argsort(-reference[step])[:top]
        expected = {lm.decode([int(i)]): reference[step, i] for i in best}
        assert sorted(alternatives.values(), reverse=True) == pytest.approx(
            sorted(expected.values(), reverse=True), abs=tol), f"step {step}"
