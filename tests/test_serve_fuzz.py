"""A fuzz of /v1/completions bodies against one running server (derandomized, bounded).

Bodies are built from OpenAI's own argument names with values of every JSON kind,
some hostile (lone surrogates, integers past Python's digit limit, deep nesting,
non-finite numbers), then sometimes damaged as bytes.  Every answer must be a 200
or a 4xx carrying OpenAI's error object, in bounded time: never a 500, never a hang.
"""

from __future__ import annotations

import json

import pytest
from helpers import BACKEND, KEY, PROMPT, Server
from support import require

hypothesis = require("hypothesis")
httpx = require("httpx")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ARGUMENTS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
             "stream_options", "logprobs", "stop", "seed", "user", "echo", "suffix", "best_of",
             "presence_penalty", "frequency_penalty", "logit_bias"]
# spliced into the JSON text as written: json.dumps cannot write them
BIG_INT, DEEP, HUGE_FLOAT = "\x00big", "\x00deep", "\x00huge"
RAW = {BIG_INT: "9" * 5000, DEEP: "[" * 3000 + "]" * 3000, HUGE_FLOAT: "1e999"}
ERROR_FIELDS = {"message", "type", "param", "code"}

texts = st.one_of(st.text(max_size=12), st.sampled_from(["demo", "\ud800", "a\udfffb", "", " " * 3, PROMPT]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 6), st.integers(), texts, texts,
                    st.floats(allow_nan=True, allow_infinity=True), st.integers(0, 3),
                    st.sampled_from(list(RAW)))  # (one_of picks a branch uniformly: hostile ones 1 in 9)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(texts, inner, max_size=3)),
                      max_leaves=8)
# a body near a valid one: the model and a prompt usually right, small outputs (the fuzz must be fast)
bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.just("demo"), st.just("demo"), values), "prompt": st.one_of(texts, texts, values)},
    optional={"max_tokens": st.one_of(st.integers(-1, 3), values), "n": st.one_of(st.integers(0, 2), values),
              **{name: values for name in ARGUMENTS if name not in ("model", "prompt", "max_tokens", "n")},
              "extra": values},
)


def _encode(body: object) -> bytes:
    text = json.dumps(body, ensure_ascii=True)  # lone surrogates as \\ud800 escapes
    for marker, raw in RAW.items():
        text = text.replace(json.dumps(marker), raw)
    return text.encode()


def _bounded(body: object) -> bool:
    """Valid requests must stay small: few completions of few tokens."""
    if not isinstance(body, dict):
        return True
    max_tokens, n = body.get("max_tokens"), body.get("n", 1)
    return not (isinstance(max_tokens, int) and max_tokens > 3) and not (isinstance(n, int) and n > 2) \
        and not isinstance(body.get("prompt"), list)


@pytest.fixture(scope="module")
def server():
    s = Server("--backend", BACKEND, "--max-batch", "8", "--max-queue", "16", "--api-key", KEY)
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}) as c:
        yield c


def _check(client: httpx.Client, content: bytes) -> None:
    with client.stream("POST", "/v1/completions", content=content) as r:
        raw = r.read()
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, raw[:300], content[:300])
    if r.status_code != 200:
        error = json.loads(raw)["error"]
        assert set(error) == ERROR_FIELDS and isinstance(error["message"], str), raw[:300]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("choices" in json.loads(e) for e in events[:-1]), raw[:300]
    else:
        assert json.loads(raw)["object"] == "text_completion"


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(body=st.one_of(bodies, bodies, values).filter(_bounded), cut=st.integers(0, 40),
       flip=st.integers(0, 255))
def test_fuzzed_bodies_are_answered_in_openai_shape_never_500(client, body, cut, flip):
    content = _encode(body)
    _check(client, content)
    if cut and len(content) > cut:  # the same body damaged: cut short, and one byte changed
        _check(client, content[:-cut])
        damaged = bytearray(content)
        damaged[cut % len(damaged)] = flip
        _check(client, bytes(damaged))
