"""``opswitch serve``: an OpenAI-compatible HTTP server with continuous batching.

Checks every flag and binds the socket before loading the model, so a bad
flag or a port in use is one line on stderr, not a traceback from uvicorn.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
import sys
from pathlib import Path

from opswitch import serve as serve_package
from opswitch.cli.allocator import return_large_blocks_to_the_os
from opswitch.cli.generate_cmd import load
from opswitch.cli.model_args import add_engine_arguments, add_model_arguments
from opswitch.cli.session import Console
from opswitch.core.errors import OpswitchError
from opswitch.serve.scheduler import STREAM_BUFFER

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")  # uvicorn's


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a GPT-2-family model at /v1/completions (OpenAI's API), with continuous"
        " batching: concurrent requests share each forward pass.",
    )
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="most sequences in one forward pass (default 16)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="most sequences waiting; beyond it requests get 429 (default 256)")
    p.add_argument("--cache-mib", type=float, default=1024, metavar="MIB",
                   help="KV-cache memory budget for all running sequences (default 1024)")
    add_engine_arguments(p)
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $OPSWITCH_API_KEY or none)")
    p.add_argument("--name", metavar="NAME",
                   help="the model id clients ask for (default: the model directory's name, a hub id as"
                   " given, or 'demo')")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="info: one access-log line per request (client, path, status; never the prompt);"
                   " warning: problems only (default info)")
    p.add_argument("--no-access-log", action="store_true", help="no line per request")
    limits = p.add_argument_group("limits and timeouts", "what one client may hold, and for how long")
    limits.add_argument("--max-connections", type=int, default=512, metavar="N",
                        help="most open connections; one more is answered 503 and closed (default 512)")
    limits.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                        help="seconds a client has to send a request's headers (default 10)")
    limits.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                        help="seconds a client has to send a request's body; then 408 (default 30)")
    limits.add_argument("--send-timeout", type=float, default=30.0, metavar="S",
                        help="seconds a response may wait for a client that does not read it; then the"
                        " connection is closed and its request cancelled (default 30)")
    limits.add_argument("--keep-alive", type=float, default=5.0, metavar="S",
                        help="seconds an idle connection stays open between requests (default 5)")
    limits.add_argument("--stream-buffer", type=int, default=STREAM_BUFFER, metavar="N",
                        help="most stream events waiting for a client to read them; beyond it the request"
                        f" is cancelled (default {STREAM_BUFFER})")
    limits.add_argument("--shutdown-grace", type=float, default=5.0, metavar="S",
                        help="on SIGTERM/SIGINT, seconds for streams to end and requests to be answered"
                        " before connections are cut (default 5)")
    p.set_defaults(run=run)


def default_model_id(model: str | None) -> str:
    """What clients name the model by default: a directory's name (``./models/gpt2-small`` ->
    ``gpt2-small``), a file's stem, a hub id as given, ``demo`` for the demo model."""
    if not model:
        return "demo"
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve().name or model
    if path.is_file():
        return path.stem if path.suffix.lower() == ".onnx" else (path.resolve().parent.name or path.stem)
    return model


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a taken port is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        message = f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port or --host"
        raise OpswitchError(message) from None
    sock.listen(2048)
    return sock


def run(args: argparse.Namespace) -> int:
    return_large_blocks_to_the_os()  # a long run's freed caches leave the process
    missing = serve_package.missing_deps()  # (looked up at call time: a test replaces it)
    if missing:
        raise OpswitchError(f"opswitch serve needs the 'serve' extra ({', '.join(missing)} not installed):"
                            " pip install 'opswitch[serve]'")
    for flag, low in (("max_batch", 1), ("max_queue", 1), ("max_connections", 1), ("stream_buffer", 1)):
        if getattr(args, flag) < low:
            raise OpswitchError(f"--{flag.replace('_', '-')} must be at least {low}")
    for flag in ("header_timeout", "body_timeout", "send_timeout", "keep_alive", "shutdown_grace"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise OpswitchError(f"--{flag.replace('_', '-')} must be a positive number of seconds,"
                                f" got {value:g}")
    if not (math.isfinite(args.cache_mib) and args.cache_mib > 0):
        raise OpswitchError(f"--cache-mib must be a positive number of MiB, got {args.cache_mib:g}")
    if args.prefill_chunk < 0:
        raise OpswitchError(f"--prefill-chunk must be a number of tokens >= 0 (0 = off),"
                            f" got {args.prefill_chunk}")
    if not 0 <= args.port <= 65535:
        raise OpswitchError(f"--port must be 0..65535, got {args.port}")
    api_key = args.api_key or os.environ.get("OPSWITCH_API_KEY") or None
    sock = bind(args.host, args.port)

    # optional extra: serve (these import uvicorn/starlette, checked just above)
    from opswitch.serve.app import ServeApp
    from opswitch.serve.http import ConnectionLimits, serve

    console = Console(quiet=False)
    lm, summary = load(args)
    for line in summary:
        console.info(line)
    cache_bytes = int(args.cache_mib * 2**20)
    smallest = lm.kv_cache_bytes(1, 1)  # one prompt token, one new token
    if cache_bytes < smallest:
        raise OpswitchError(f"--cache-mib {args.cache_mib:g} cannot hold a single request's KV cache; the"
                            f" smallest budget that serves one is {smallest / 2**20:.4g} MiB")
    name = args.name or default_model_id(args.model)
    served = ServeApp(lm, name, max_batch=args.max_batch, max_queue=args.max_queue, cache_bytes=cache_bytes,
                      api_key=api_key, body_timeout=args.body_timeout, send_timeout=args.send_timeout,
                      stream_buffer=args.stream_buffer, grace=args.shutdown_grace,
                      prefill_chunk=args.prefill_chunk, prefix_cache=not args.no_prefix_cache)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not is_loopback(args.host) and api_key is None:
        console.info(f"warning: listening on {args.host}, reachable from other machines, without an API key:"
                     " anyone who can reach it can use it (set --api-key)")
    console.info(f"✓ Serving {name!r} at http://{shown}:{port}/v1 (max batch {args.max_batch},"
                 f" queue {args.max_queue}, KV cache {args.cache_mib:g} MiB); Ctrl-C stops")
    sys.stderr.flush()
    limits = ConnectionLimits(args.max_connections, args.header_timeout, args.keep_alive,
                              send_timeout=args.send_timeout)
    try:
        serve(served.build(), sock, limits, args.shutdown_grace, served.begin_shutdown, served.metrics,
              log_level=args.log_level, access_log=not args.no_access_log)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down gracefully
        pass
    console.info("✓ Server stopped")
    return 0
