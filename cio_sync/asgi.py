"""An HTTP intake that the real Segment and Customer.io client libraries send to unchanged: an ASGI application.

``cio_sync.asgi.app(sink, write_keys=...)`` serves any sink or :class:`~cio_sync.Pipeline` over the routes the
clients use (``POST /v1/batch``, ``/v1/identify`` ... and analytics.js's ``/v1/b``, ``/v1/t`` ...), so a service can
mount it in its own Starlette or FastAPI application, and ``cio-sync serve`` runs it (docs/serve.md).

What a client sees:

- **200** ``{"success": true}`` once every call the request carried that was accepted is as durable as the sink
  makes calls (with a spool: in the spool, fsynced, see ``sync()``); a batch whose calls were partly refused still
  gets 200, with ``"refused"`` (how many) and ``"errors"`` (index, code, message of each); the refused ones are in
  the sink's dead letters with ``keep_rejected=True``.
- **400** ``{"code", "message"}`` for a body that is not JSON, not a call or batch, a call over 32 KB or a batch over
  2,500 calls, or a request whose every call was refused; **401** for a missing or wrong write key; **413** for a
  body over 500 KB (after decompression: a gzip bomb is cut off at the limit); **415** for an encoding other than
  gzip; **408** for a body that does not arrive in time; **503** with ``Retry-After`` when the sink cannot take calls
  now (its memory budget is full while storage is down, or it is closing). Every error has a JSON body with
  ``code``: the Customer.io Python client retries a 4xx whose body lacks one.

Write keys are compared in constant time, never logged, and never stored in a call (``writeKey`` in a body or a
batch envelope is taken out). Nothing here logs a body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import orjson

from cio_sync._errors import BufferFull, CioSyncError, InvalidCall, SinkClosed, StorageError
from cio_sync.sinks.base import expand_batch

log = logging.getLogger("cio_sync.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The call type each route takes; ``None``: a batch. Segment's long names and analytics.js's short ones.
ROUTES: Final[Mapping[str, str | None]] = {
    "/v1/batch": None, "/v1/b": None,
    "/v1/identify": "identify", "/v1/i": "identify",
    "/v1/track": "track", "/v1/t": "track",
    "/v1/page": "page", "/v1/p": "page",
    "/v1/screen": "screen", "/v1/s": "screen",
    "/v1/group": "group", "/v1/g": "group",
    "/v1/alias": "alias", "/v1/a": "alias",
}

_JSON_HEADERS: Final = [(b"content-type", b"application/json")]
_OK: Final = orjson.dumps({"success": True})


@dataclass(frozen=True)
class Limits:
    """What one request may carry, as Segment documents it: ``call_bytes`` per call (its JSON), ``request_bytes``
    per request body (after decompression), ``batch_calls`` calls per batch; ``body_timeout`` seconds for the whole
    body to arrive; ``header_timeout`` seconds for a request's head (its line and headers: enforced by
    ``cio-sync serve``'s server, cio_sync.serve; an ASGI application never sees a head that did not arrive)."""

    call_bytes: int = 32 * 1024
    request_bytes: int = 500 * 1024
    batch_calls: int = 2500
    body_timeout: float = 10.0
    header_timeout: float = 10.0


class HttpError(Exception):
    """An answer other than 200: its status, a ``code`` and a ``message`` for the JSON body, extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, list(headers)


class _Disconnected(Exception):
    """The client went away before its body arrived: there is no one to answer."""


def _keys(write_keys: Mapping[str, str] | Iterable[str]) -> list[tuple[bytes, str]]:
    pairs = list(write_keys.items()) if isinstance(write_keys, Mapping) else [(k, "default") for k in write_keys]
    if not pairs:
        raise ValueError("write_keys: give at least one write key")
    keys = []
    for key, label in pairs:
        if not isinstance(key, str) or not key:
            raise ValueError("write_keys: each write key must be a non-empty string")
        keys.append((key.encode(), str(label)))
    return keys


class IntakeApp:
    """The ASGI application :func:`app` returns. ``ready`` is false once it drains (shutdown, or :meth:`drain`)."""

    def __init__(self, sink: Any, *, write_keys: Mapping[str, str] | Iterable[str], limits: Limits | None = None,
                 cors_origins: Iterable[str] = ("*",), retry_after: int = 5, threads: int = 8,
                 metrics: bool = True) -> None:
        self.sink = sink
        self.limits = limits or Limits()
        self._keys = _keys(write_keys)
        self._origins = frozenset(cors_origins)
        self._retry_after = str(int(retry_after)).encode()
        # The sinks are synchronous (a write appends to a spool, a sync fsyncs it): requests run them in threads, so
        # that concurrent requests share the spool's fsyncs (group commit) while the event loop keeps answering.
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cio-sync-intake")
        self._draining = False
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self.metrics = _Metrics(sink) if metrics else None

    # -- ASGI ----------------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            status, body, headers = await self._handle(scope, receive)
        except _Disconnected:
            return
        if self.metrics is not None:
            self.metrics.request(status)
        origin = self._cors_origin(scope)
        if origin is not None:
            headers = [*headers, (b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.drain()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def drain(self) -> None:
        """Stop taking calls (503 from now on, ``/ready`` says so) and wait for the requests in flight to finish."""
        self._draining = True
        while self._in_flight:
            self._idle = asyncio.Event()
            await self._idle.wait()
        self._pool.shutdown(wait=True)

    @property
    def ready(self) -> bool:
        return not self._draining and not getattr(self.sink, "closed", False)

    # -- requests --------------------------------------------------------------------------------------------------

    async def _handle(self, scope: Scope, receive: Receive) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        try:
            if method == "OPTIONS":
                return 204, b"", self._preflight_headers()
            if method in ("GET", "HEAD") and path in ("/health", "/ready", "/metrics"):
                return self._operations(path)
            route = ROUTES.get(path)
            if path not in ROUTES:
                raise HttpError(404, "not_found", f"no route {path}; calls go to /v1/batch or /v1/<type>")
            if method != "POST":
                raise HttpError(405, "method_not_allowed", f"{path} takes POST", [(b"allow", b"POST, OPTIONS")])
            if not self.ready:
                raise self._unavailable("the intake is shutting down")
            self._in_flight += 1
            try:
                return await self._post(scope, receive, route)
            finally:
                self._in_flight -= 1
                if not self._in_flight and self._idle is not None:
                    self._idle.set()
        except HttpError as exc:
            if self.metrics is not None and exc.status != 200:
                self.metrics.refused_request(exc.code)
            return exc.status, orjson.dumps({"code": exc.code, "message": exc.message}), [*_JSON_HEADERS,
                                                                                        *exc.headers]

    async def _post(self, scope: Scope, receive: Receive, route: str | None) -> tuple[int, bytes,
                                                                                     list[tuple[bytes, bytes]]]:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        raw = await self._body(receive)
        payload = _parse(self._decoded(raw, headers.get(b"content-encoding", b"identity")))
        label = self._authorize(headers.get(b"authorization"), payload)
        calls = self._calls(payload, route)
        loop = asyncio.get_running_loop()
        # No call of a body within the per-call limit can be over it: only a larger body is measured call by call.
        measure = len(raw) > self.limits.call_bytes or headers.get(b"content-encoding", b"").strip() != b""
        accepted, errors = await loop.run_in_executor(self._pool, self._accept, calls, measure)
        if self.metrics is not None:
            self.metrics.calls(label, accepted, errors)
        if errors and not accepted:
            first = errors[0]
            what = "the call was" if route is not None else f"all {len(errors)} calls were"
            raise HttpError(400, first["code"], f"{what} refused: {first['message']}")
        if errors:
            return 200, orjson.dumps({"success": True, "accepted": accepted, "refused": len(errors),
                                      "errors": errors}), _JSON_HEADERS
        return 200, _OK, _JSON_HEADERS

    async def _body(self, receive: Receive) -> bytes:
        limit, chunks, size = self.limits.request_bytes, [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                raise HttpError(408, "request_timeout",
                                f"the body did not arrive within {self.limits.body_timeout:g} s") from None
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, "request_too_large", f"the request body is over {limit:,} bytes (the limit "
                                                          "per batch request)")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _decoded(self, raw: bytes, encoding: bytes) -> bytes:
        encoding = encoding.strip().lower()
        if encoding in (b"", b"identity"):
            return raw
        if encoding != b"gzip":
            raise HttpError(415, "unsupported_encoding", f"Content-Encoding {encoding.decode(errors='replace')!r} "
                                                         "is not taken; send gzip or nothing")
        limit = self.limits.request_bytes
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            data = inflater.decompress(raw, limit + 1)  # a bomb stops here: never more than the limit in memory
        except zlib.error as exc:
            raise HttpError(400, "malformed_gzip", f"the gzip body cannot be read: {exc}") from None
        if len(data) > limit or inflater.unconsumed_tail:
            raise HttpError(413, "request_too_large", f"the request body is over {limit:,} bytes once decompressed "
                                                      "(the limit per batch request)")
        if not inflater.eof:
            raise HttpError(400, "malformed_gzip", "the gzip body ends before its end")
        return data

    def _authorize(self, header: bytes | None, payload: Any) -> str:
        given: bytes | None = None
        if header:
            scheme, _, value = header.partition(b" ")
            if scheme.lower() == b"basic":
                try:
                    given = base64.b64decode(value.strip(), validate=True).partition(b":")[0]
                except (binascii.Error, ValueError):
                    raise HttpError(401, "unauthorized", "the Authorization header is not valid Basic auth") from None
            elif scheme.lower() == b"bearer":
                given = value.strip()
        if not given and isinstance(payload, dict):
            key = payload.get("writeKey")
            if isinstance(key, str):
                given = key.encode()
        if not given:
            raise HttpError(401, "unauthorized", "no write key: send it as the Basic auth user name or as writeKey")
        label = None
        for key, name in self._keys:  # every key is compared, so the time does not say which one matched
            if hmac.compare_digest(given, key) and label is None:
                label = name
        if label is None:
            raise HttpError(401, "unauthorized", "the write key is not one this intake accepts")
        return label

    def _calls(self, payload: Any, route: str | None) -> list[Any]:
        if not isinstance(payload, dict):
            raise HttpError(400, "invalid_body", f"the body must be a JSON object, got {_json_type(payload)}")
        payload.pop("writeKey", None)  # never stored with the calls
        if route is not None:
            given = payload.get("type")
            if given is None:
                payload["type"] = route
            elif given != route:
                raise HttpError(400, "invalid_call", f"a call of type {given!r} sent to the {route} route")
            return [payload]
        batch = payload.get("batch")
        if not isinstance(batch, list):
            raise HttpError(400, "invalid_body", "a batch request needs a 'batch' array of calls")
        if len(batch) > self.limits.batch_calls:
            raise HttpError(400, "too_many_calls", f"the batch has {len(batch):,} calls; the limit is "
                                                   f"{self.limits.batch_calls:,} per request")
        for call in batch:
            if isinstance(call, dict):
                call.pop("writeKey", None)
        return list(expand_batch(payload))

    def _accept(self, calls: list[Any], measure: bool = True) -> tuple[int, list[dict[str, Any]]]:
        """Write the calls (in a worker thread) and make them durable; how many were accepted, and the refusals.
        ``measure``: check each call against the per-call limit (not needed when the whole body is within it)."""
        sink = self.sink
        errors: list[dict[str, Any]] = []
        prefetch = getattr(sink, "prefetch_message_ids", None)
        ids = [m for c in calls if isinstance(c, dict) and isinstance(m := c.get("messageId"), str)]
        try:
            # A batch's ids are looked up in the dedupe window at once, not call by call.
            with prefetch(ids) if callable(prefetch) and len(ids) > 1 else contextlib.nullcontext():
                accepted = self._write_all(calls, measure, errors)
            sync = getattr(sink, "sync", None)
            if accepted and callable(sync):
                self._sync(sync)
        except (BufferFull, SinkClosed) as exc:
            raise self._unavailable(str(exc)) from None
        except StorageError as exc:
            raise self._unavailable(f"storage is not taking calls: {exc}") from None
        except CioSyncError as exc:
            raise HttpError(500, "internal_error", f"{type(exc).__name__}: {exc}") from None
        return accepted, errors

    def _write_all(self, calls: list[Any], measure: bool, errors: list[dict[str, Any]]) -> int:
        """Write each call; how many were accepted (a retry the dedupe window drops counts: it is in). Refusals
        are added to ``errors``."""
        sink, limit = self.sink, self.limits.call_bytes
        accepted = 0
        for index, call in enumerate(calls):
            size = len(orjson.dumps(call)) if measure and isinstance(call, dict) else 0
            if size > limit:
                error = InvalidCall(f"the call is {size:,} bytes; the limit is {limit:,}", field="call")
                _refuse(sink, call, error)
                errors.append({"index": index, "code": "call_too_large", "message": str(error)})
                continue
            try:
                sink.write(call)  # a refused call is counted, and kept in the dead letters, by the sink
            except InvalidCall as exc:
                errors.append({"index": index, "code": "invalid_call", "message": str(exc)})
            else:
                accepted += 1
        return accepted

    def _sync(self, sync: Callable[[], None]) -> None:
        """Durable before 200: one fsync shared by the requests waiting on it. If the spool's fsync failed, the
        calls it covered are not durable there, and every ``sync()`` raises until they are published: publish them
        now (``flush()``) rather than answer 503 until the next timed publish; a storage that does not take them
        either is a 503."""
        try:
            sync()
        except StorageError as exc:
            flush = getattr(self.sink, "flush", None)
            if not callable(flush):
                raise
            log.warning("intake: the spool could not be synced (%s); publishing what it holds instead", exc)
            flush()
            sync()

    def _unavailable(self, why: str) -> HttpError:
        return HttpError(503, "unavailable", f"{why}; retry later", [(b"retry-after", self._retry_after)])

    # -- CORS and operations -----------------------------------------------------------------------------------------

    def _cors_origin(self, scope: Scope) -> bytes | None:
        origin = dict(scope.get("headers", [])).get(b"origin")
        if origin is None:
            return None
        if "*" in self._origins:
            return b"*"
        return origin if origin.decode(errors="replace") in self._origins else None

    def _preflight_headers(self) -> list[tuple[bytes, bytes]]:
        # analytics-next adds X-Retry-Count to each retry: without it here, the browser blocks every retry.
        return [(b"access-control-allow-methods", b"POST, OPTIONS"),
                (b"access-control-allow-headers", b"authorization, content-type, content-encoding, x-retry-count"),
                (b"access-control-max-age", b"86400")]

    def _operations(self, path: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        if path == "/health":
            return 200, orjson.dumps({"status": "alive"}), _JSON_HEADERS
        if path == "/ready":
            if self.ready:
                return 200, orjson.dumps({"status": "ready"}), _JSON_HEADERS
            raise self._unavailable("the intake is not taking calls")
        if self.metrics is None:
            raise HttpError(404, "not_found", "metrics are off for this intake")
        body, content_type = self.metrics.exposition()
        return 200, body, [(b"content-type", content_type)]


def _refuse(sink: Any, call: Any, error: InvalidCall) -> None:
    """Count a call refused here (over the size limit) as the sink counts its own refusals, in every sink it has."""
    parts = [getattr(sink, name, None) for name in ("advanced", "standard")]
    for part in [p for p in parts if p is not None] or [sink]:
        refuse = getattr(part, "refuse", None)
        if callable(refuse):
            refuse(call, error)


def _parse(body: bytes) -> Any:
    if not body.strip():
        raise HttpError(400, "malformed_json", "the body is empty")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HttpError(400, "malformed_json", f"the body is not JSON: {exc}") from None


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__)


class _Metrics:
    """Prometheus metrics of one intake (prometheus-client, the ``serve`` extra): requests by status, calls
    accepted by write key label and refused by reason, and the sink's publish lag and buffered bytes."""

    def __init__(self, sink: Any) -> None:
        try:
            import prometheus_client as prom
        except ImportError:  # pragma: no cover - the serve extra installs it
            self._prom = None
            return
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self._requests = prom.Counter("cio_sync_http_requests", "HTTP requests answered, by status", ["status"],
                                      registry=self.registry)
        self._accepted = prom.Counter("cio_sync_calls_accepted", "Calls accepted, by write key label", ["source"],
                                      registry=self.registry)
        self._refused = prom.Counter("cio_sync_calls_refused", "Calls or requests refused, by reason", ["reason"],
                                     registry=self.registry)
        self.registry.register(_SinkCollector(sink, prom))

    def request(self, status: int) -> None:
        if self._prom is not None:
            self._requests.labels(str(status)).inc()

    def refused_request(self, code: str) -> None:
        if self._prom is not None:
            self._refused.labels(code).inc()

    def calls(self, label: str, accepted: int, errors: list[dict[str, Any]]) -> None:
        if self._prom is None:
            return
        if accepted:
            self._accepted.labels(label).inc(accepted)
        for error in errors:
            self._refused.labels(error["code"]).inc()

    def exposition(self) -> tuple[bytes, bytes]:
        if self._prom is None:
            raise HttpError(501, "not_implemented", "install cio_sync[serve] (prometheus-client) for /metrics")
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST.encode()


class _SinkCollector:
    """The sink's stats as gauges, read at each scrape."""

    def __init__(self, sink: Any, prom: Any) -> None:
        self._sink, self._prom = sink, prom

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = getattr(self._sink, "stats", None)
        parts = [("", stats)] if stats is not None and hasattr(stats, "rows_buffered") else [
            (name, getattr(stats, name, None)) for name in ("advanced", "standard")]
        lag = GaugeMetricFamily("cio_sync_publish_lag_seconds", "Age of the oldest call not yet published",
                                labels=["sink"])
        held = GaugeMetricFamily("cio_sync_bytes_in_memory", "Bytes of rows held in memory", labels=["sink"])
        buffered = GaugeMetricFamily("cio_sync_rows_buffered", "Rows waiting to be published", labels=["sink"])
        duplicates = CounterMetricFamily("cio_sync_calls_duplicate", "Calls dropped as retries of calls taken "
                                         "within the dedupe window", labels=["sink"])
        if stats is not None and hasattr(stats, "calls_published"):  # a cio_sync.nats.Publisher: no buffers
            duplicates.add_metric(["nats"], stats.duplicates)
            published = CounterMetricFamily("cio_sync_calls_published", "Calls the stream acked", labels=["sink"])
            published.add_metric(["nats"], stats.calls_published)
            return [duplicates, published]
        for name, part in parts:
            if part is None:
                continue
            label = [name or "sink"]
            lag.add_metric(label, part.oldest_buffered_age or 0.0)
            held.add_metric(label, part.bytes_in_memory)
            buffered.add_metric(label, part.rows_buffered)
            duplicates.add_metric(label, getattr(part, "calls_duplicate", 0))
        return [lag, held, buffered, duplicates]


def app(sink: Any, *, write_keys: Mapping[str, str] | Iterable[str], limits: Limits | None = None,
        cors_origins: Iterable[str] = ("*",), retry_after: int = 5, threads: int = 8) -> IntakeApp:
    """An ASGI application taking Segment/Customer.io calls over HTTP into ``sink`` (any sink, or a Pipeline).

    ``write_keys`` maps each accepted write key to a label (metrics count calls by it; several keys may share the
    sink), or is an iterable of keys. ``limits`` are Segment's (32 KB a call, 500 KB a request, 2,500 calls a
    batch). ``cors_origins`` are the browser origins allowed to send (``"*"``: any). The application does not close
    the sink: its owner does (``cio-sync serve`` does after the server stopped).
    """
    return IntakeApp(sink, write_keys=write_keys, limits=limits, cors_origins=cors_origins,
                     retry_after=retry_after, threads=threads)
