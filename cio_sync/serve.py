"""Run the HTTP intake (:mod:`cio_sync.asgi`) under uvicorn, with graceful shutdown on SIGTERM and SIGINT.

``cio-sync serve`` (cio_sync/cli.py) builds the sinks and calls :func:`run`. On SIGTERM or SIGINT: stop accepting
(new requests get 503, the listening socket closes), answer the requests in flight, close the sinks (publishing
what they hold), exit 0. uvicorn's own signal handling is not used: it re-raises the signal after its shutdown, so
the process would end by the signal (exit -15) instead of 0 after publishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any, Final

from cio_sync._errors import ConfigError
from cio_sync.asgi import IntakeApp

log = logging.getLogger("cio_sync.serve")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


#: What a client whose request head did not arrive in time is sent before its connection is closed.
_HEAD_TIMEOUT_BODY: Final = b'{"code":"request_timeout","message":"the request head did not arrive in time"}'
_HEAD_TIMEOUT: Final = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                        b"content-length: " + str(len(_HEAD_TIMEOUT_BODY)).encode() + b"\r\n\r\n" +
                        _HEAD_TIMEOUT_BODY)


def _protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a deadline for each request's head (its request line and headers).

    uvicorn times out an idle keep-alive connection, but not one that connects and never sends a whole head (it
    waits for ever: a slowloris holds connections and file descriptors). Here a connection must send its first
    request's head within ``header_timeout`` seconds of connecting, and each later head within as long of its first
    byte (before that, uvicorn's keep-alive timeout applies): a head begun is answered 408 (JSON, as every error
    here) and the connection closed; a connection that sent nothing is closed.
    The body has its own deadline in the application (``Limits.body_timeout``).
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadDeadline(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_begun = False

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self._head_begun:
                self.transport.write(_HEAD_TIMEOUT)
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_begun = True
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._head_begun = False
            super().on_headers_complete()

    return HeadDeadline


def _server(application: IntakeApp, host: str, port: int, body_timeout: float, header_timeout: float) -> Any:
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - the serve extra installs it
        raise ImportError("cio-sync serve needs uvicorn: pip install 'cio_sync[serve]'") from exc

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # ours are installed by run()
            yield

    # httptools, not h11: 2-4x the requests per CPU-second here (measured; uvicorn[standard] brings it).
    http: Any = _protocol(header_timeout) if _has("httptools") else "h11"
    config = uvicorn.Config(application, host=host, port=port, lifespan="on", log_level="warning", http=http,
                            access_log=False, timeout_keep_alive=int(max(body_timeout, 1)),
                            timeout_graceful_shutdown=30, server_header=False, date_header=False)
    return Server(config)


def _listen(host: str, port: int) -> socket.socket:
    try:
        listener = socket.create_server((host, port), backlog=2048)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {why}; choose another --port or --host") from None
    # TCP_NODELAY on the connections: asyncio sets it only on sockets made with IPPROTO_TCP, and create_server makes
    # them with protocol 0. Without it each answer (uvicorn writes its head and body apart) waits for the client's
    # delayed ACK, ~40 ms: 25 requests a second per connection (bench/serve.py). Accepted sockets inherit it.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


async def _serve(application: IntakeApp, host: str, port: int, on_listening: Callable[[str], None]) -> None:
    listener = _listen(host, port)
    limits = application.limits
    server = _server(application, host, port, limits.body_timeout, limits.header_timeout)
    loop = asyncio.get_running_loop()

    def stop(signum: int) -> None:
        log.warning("cio-sync serve: %s: draining, then publishing", signal.Signals(signum).name)
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        where = listener.getsockname()
        on_listening(f"http://{where[0]}:{where[1]}")
    try:
        await task
    except SystemExit as exc:  # uvicorn's way of saying that it could not start
        raise ConfigError(f"the server on {host}:{port} could not start (uvicorn exit {exc.code})") from None
    finally:
        listener.close()


def run(application: IntakeApp, sinks: list[Any], *, host: str, port: int) -> int:
    """Serve ``application`` until SIGTERM/SIGINT, then close ``sinks`` (publishing what they hold); returns 0."""

    def listening(url: str) -> None:
        print(f"cio-sync serve: listening on {url}", flush=True)

    try:
        asyncio.run(_serve(application, host, port, listening))
    finally:
        for sink in sinks:
            sink.close()
    print("cio-sync serve: stopped; everything accepted is published", file=sys.stderr, flush=True)
    return 0
