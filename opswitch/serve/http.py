"""The connection layer under the app: limits uvicorn does not have, and a clean shutdown.

uvicorn bounds the idle time between requests (keep-alive) but not the time a
client may take to send a request's headers, and its ``limit_concurrency``
only answers 503 once a request has arrived, so connections that never send
one are never counted out.  ``guarded_protocol`` adds both: a connection over
``max_connections`` is answered 503 and closed at once, and one that has not
sent its headers ``header_timeout`` seconds after connecting (or after its
previous response) is closed.  ``Server`` tells the app when a signal asks it
to stop, so running streams and waiting requests are answered before uvicorn
closes their connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from opswitch.serve.metrics import Metrics
from opswitch.serve.protocol import error_body


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may hold: the `serve` flags of the same names."""

    max_connections: int = 512
    header_timeout: float = 10.0  # seconds to send a request's headers
    keep_alive: float = 5.0  # seconds idle between requests
    # the kernel's send buffer per connection: what a client that stops reading pins in the
    # kernel (autotuned, it grows to megabytes); a stream needs a few kB a second
    send_buffer: int = 64 << 10
    send_timeout: float = 30.0  # seconds a connection's unsent output may wait for the client to read


def _refusal(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps(error_body(message, "server_error", code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection limit and a header-read timeout."""
    too_many = _refusal(503, "Service Unavailable",
                        f"the server has its maximum of {limits.max_connections} connections open"
                        " (--max-connections): retry later", "too_many_connections")

    class GuardedProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(too_many)
                transport.close()
                return
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits.send_buffer)
            self._arm_header_timer()
            self._unsent: int | None = None
            self.loop.call_later(limits.send_timeout, self._check_unsent)

        def _check_unsent(self) -> None:
            """Abort a connection whose output has not moved for a send timeout.

            uvicorn writes a whole response into the transport's buffer and, when the client
            does not read, closing waits for that buffer to drain, so without this a client
            that never reads would hold its connection and the unsent answer for ever."""
            if self.transport.is_closing() and not self.transport.get_write_buffer_size():
                return  # closed, or closing with nothing left to send
            unsent = self.transport.get_write_buffer_size()
            waiting = unsent and (self.flow.write_paused or self.transport.is_closing())
            if waiting and self._unsent is not None and unsent >= self._unsent:
                self.transport.abort()
                return
            self._unsent = unsent if waiting else None
            self.loop.call_later(limits.send_timeout, self._check_unsent)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in: the app reads the body
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()  # the next request's headers get the same time

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            """A request h11 cannot parse (bad syntax, headers over the size limit): OpenAI's error
            JSON, as for every other error, instead of uvicorn's plain text."""
            body = json.dumps(error_body(f"invalid HTTP request: {msg}", code="invalid_http")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(limits.header_timeout, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.close()

    return GuardedProtocol


class Server(uvicorn.Server):
    """uvicorn's server, calling ``on_exit`` as soon as SIGINT/SIGTERM asks it to stop.

    SIGTERM is taken as SIGINT: the same graceful stop, a second one forces it, and
    the command ends as after Ctrl-C (status 0) rather than killed by the signal."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(signal.SIGINT if sig == signal.SIGTERM else sig, frame)
        self._on_exit()


def serve(app, sock: socket.socket, limits: ConnectionLimits, grace: float,
          on_exit: Callable[[], None], metrics: Metrics | None = None, *,
          log_level: str = "info", access_log: bool = True) -> None:
    """Run ``app`` on the bound ``sock`` until a signal stops it (within ``grace`` seconds).

    At ``info`` each request is one access-log line (client, method, path, status: never a
    prompt); uvicorn's own start-up chatter stays hidden unless ``debug``."""
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, http=guarded_protocol(limits),
                            timeout_keep_alive=limits.keep_alive, timeout_graceful_shutdown=grace)  # type: ignore[arg-type]  # uvicorn takes float seconds
    if log_level != "debug":
        level = max(logging.WARNING, logging.getLevelName(log_level.upper()))
        logging.getLogger("uvicorn.error").setLevel(level)
    server = Server(config, on_exit)
    if metrics is not None:
        metrics.gauge("opswitch_open_connections", "HTTP connections open (at most --max-connections).",
                      lambda: len(server.server_state.connections))
    server.run(sockets=[sock])
