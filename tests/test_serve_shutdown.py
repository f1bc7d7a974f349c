"""`opswitch serve` stopped by a signal while it works: every client gets an answer in
OpenAI's shape (streams an error chunk and [DONE], waiting requests a 503), then it exits."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
from helpers import BACKEND, Server
from support import require

httpx = require("httpx")


GRACE = 5.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_streams_with_an_error_and_answers_waiting_requests(sig):
    # a batch of 2: the stream's two choices fill it, so the second request waits in the queue
    s = Server("--backend", BACKEND, "--max-batch", "2", "--max-queue", "8", "--shutdown-grace", str(GRACE))
    lines: list[str] = []
    waiting: dict[str, httpx.Response] = {}
    streaming = threading.Event()

    def stream() -> None:
        body = {"model": "demo", "prompt": "Hello", "max_tokens": 250, "n": 2, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    streaming.set()

    def wait_in_queue() -> None:
        body = {"model": "demo", "prompt": "Hi", "max_tokens": 10}
        waiting["r"] = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)

    threads = [threading.Thread(target=stream), threading.Thread(target=wait_in_queue)]
    try:
        threads[0].start()
        assert streaming.wait(60), "the stream never started"
        threads[1].start()
        deadline = time.monotonic() + 30  # until the second request is queued behind the full batch
        while "opswitch_queue_length 1" not in httpx.get(f"{s.url}/metrics").text:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        signalled = time.monotonic()
        s.proc.send_signal(sig)
        for t in threads:
            t.join(timeout=GRACE + 30)
        code = s.proc.wait(timeout=GRACE + 30)
        took = time.monotonic() - signalled
    finally:
        s.stop()
    assert code == 0 and "Server stopped" in "".join(s.log), "".join(s.log)
    assert took < GRACE + 2, f"the server took {took:.1f} s to exit"
    assert lines[-1] == "data: [DONE]", lines[-3:]
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert set(error) == {"message", "type", "param", "code"} and "shutting down" in error["message"]
    assert all(json.loads(line[6:])["choices"] for line in lines[:-2]), "a chunk before the error is not one"
    r = waiting["r"]
    assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["type"] == "server_error" and "shutting down" in r.json()["error"]["message"]
