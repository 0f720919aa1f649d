"""What the publisher and the worker share: the NATS client's event loop thread, connecting, the stream's names."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

from cio_sync._errors import ConfigError, MissingBackend, StorageError

try:
    import nats
    import nats.errors
    import nats.js.errors
except ImportError as exc:  # pragma: no cover - the extra is installed wherever the tests run
    raise MissingBackend("cio_sync.nats needs nats-py: pip install 'cio_sync[nats]'") from exc

T = TypeVar("T")

#: Where a stream records how many partitions its subjects are split into (publishers and workers must agree).
PARTITIONS_KEY: Final = "cio_sync.partitions"

#: What a NATS operation raises when the cluster is unreachable, has no leader or does not answer in time.
NATS_ERRORS: Final[tuple[type[BaseException], ...]] = (nats.errors.Error, OSError, TimeoutError, asyncio.TimeoutError)


def server_list(servers: list[str] | str) -> list[str]:
    """The URLs of ``servers``: a list, or one string of comma-separated URLs."""
    urls = [u.strip() for u in servers.split(",")] if isinstance(servers, str) else [str(u).strip() for u in servers]
    if not urls or not all(urls):
        raise ConfigError("give at least one NATS server URL (nats://host:4222, or several, comma-separated)")
    return urls


def check_stream_name(stream: str) -> str:
    """``stream`` if it can name a stream, its subjects and its key-value buckets (letters, digits, '-', '_')."""
    if not stream or not all(c.isascii() and (c.isalnum() or c in "-_") for c in stream):
        raise ConfigError(f"stream name {stream!r} must be letters, digits, '-' or '_' (it names NATS subjects "
                          "and key-value buckets)")
    return stream


def person_key(data: dict[str, Any]) -> str:
    """The id that decides a call's partition: ``userId``, else ``anonymousId`` (an alias goes by its ``userId``,
    the id the person keeps), else the ``messageId``."""
    for name in ("userId", "anonymousId", "messageId"):
        value = data.get(name)
        if value is not None and value != "":
            return value if isinstance(value, str) else str(value)
    return ""


def partition_of(key: str, partitions: int) -> int:
    """The partition of a person key: the first 8 bytes of BLAKE2b-64 of its UTF-8, as a big-endian unsigned
    integer, modulo ``partitions``. Stable across processes, hosts and Python versions (unlike ``hash()``)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


class LoopThread:
    """An asyncio event loop on a daemon thread of its own, for a NATS client driven from synchronous code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coroutine`` on the loop and wait up to ``timeout`` seconds for its result."""
        future = self.submit(coroutine)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


async def connect(servers: list[str], *, name: str, timeout: float, on_error: Any) -> Any:
    """A NATS connection to ``servers`` that reconnects for ever once made (a node that dies is left for another);
    :class:`~cio_sync.StorageError` if no server answers within ``timeout`` seconds."""
    connected = False
    failures: list[BaseException] = []

    async def errors(exc: Exception) -> None:
        if connected:
            await on_error(exc)
        else:
            failures.append(exc)  # said once, in the error, rather than logged at every try

    try:
        nc = await asyncio.wait_for(
            nats.connect(servers, name=name, connect_timeout=min(5.0, timeout), max_reconnect_attempts=-1,
                         reconnect_time_wait=0.5, error_cb=errors), timeout)
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        why = describe(failures[-1]) if failures else describe(exc)
        raise StorageError(f"cannot connect to NATS at {', '.join(servers)} within {timeout:g}s: {why}") from None
    connected = True
    return nc


def describe(exc: BaseException) -> str:
    """A NATS failure in words (for errors and stats)."""
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return "the stream has no leader (no JetStream server answered)"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class StreamFound:
    """What :func:`ensure_stream` found (or made): the stream's partitions and replicas."""

    def __init__(self, partitions: int, replicas: int) -> None:
        self.partitions, self.replicas = partitions, replicas


#: The partitions a stream is split into when whoever creates it does not say.
DEFAULT_PARTITIONS: Final = 16


async def ensure_stream(nc: Any, js: Any, stream: str, *, partitions: int | None, replicas: int | None,
                        duplicate_window: float, timeout: float) -> StreamFound:
    """Find the stream ``stream`` or create it: subjects ``<stream>.*``, work-queue retention (a message stays until
    a worker acked it, which it does once the call is in a published file), file storage, ``replicas`` copies
    (default 3 when the cluster has 3 or more nodes, else 1), the duplicate window, and its partition count in its
    metadata. ``partitions=None`` takes an existing stream's count (or :data:`DEFAULT_PARTITIONS` for a new one);
    a count that differs from the stream's is a :class:`~cio_sync.ConfigError`."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: BaseException | None = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            return await _ensure_stream(nc, js, stream, partitions=partitions, replicas=replicas,
                                        duplicate_window=duplicate_window)
        except ConfigError:
            raise
        except NATS_ERRORS as exc:
            # Until the cluster has a meta leader, JetStream's API answers 503 or not at all.
            last = exc
            await asyncio.sleep(0.2)
    raise StorageError(f"JetStream stream {stream!r} could not be found or created within {timeout:g}s: "
                       f"{describe(last) if last is not None else 'no answer'}")


async def _ensure_stream(nc: Any, js: Any, stream: str, *, partitions: int | None, replicas: int | None,
                         duplicate_window: float) -> StreamFound:
    from nats.js import api

    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        nodes = len(nc._server_info.get("connect_urls") or []) or 1
        config = api.StreamConfig(
            name=stream, subjects=[f"{stream}.*"], storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.WORK_QUEUE,
            num_replicas=replicas or (3 if nodes >= 3 else 1), duplicate_window=duplicate_window,
            metadata={PARTITIONS_KEY: str(partitions or DEFAULT_PARTITIONS)},
            description="calls taken by cio_sync intakes, partitioned by person",
        )
        try:
            info = await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # "stream name already in use": another process created it first
                raise ConfigError(f"JetStream refused to create stream {stream!r}: {exc}") from exc
            info = await js.stream_info(stream)
    config = info.config
    if f"{stream}.*" not in (config.subjects or []):
        raise ConfigError(f"stream {stream!r} exists with subjects {config.subjects}, not {stream}.* as a cio_sync "
                          "stream has")
    recorded = (config.metadata or {}).get(PARTITIONS_KEY)
    if recorded is None or not recorded.isdigit() or int(recorded) < 1:
        raise ConfigError(f"stream {stream!r} does not say how many partitions it has (metadata {PARTITIONS_KEY}): "
                          "it was not made by cio_sync")
    if partitions is not None and int(recorded) != partitions:
        raise ConfigError(f"stream {stream!r} is split into {recorded} partitions, not {partitions}: every publisher "
                          "and worker of a stream must use the same number")
    return StreamFound(int(recorded), int(config.num_replicas or 1))
