"""The cases: what one child process runs and times. Each returns a :class:`Outcome`; the setup (loading the
traffic, encoding it, creating a bucket) happens before the clock starts.

Every cio_sync case uses the sink's defaults (``max_rows``, ``max_bytes``, ``max_buffer_bytes``) except
``flush_interval=None``: the timer thread would make runs differ by when it fires, and a run is shorter than its
default interval anyway. Timing includes ``close()``, which publishes the last files. The outage cases are the
exception: storage fails for the whole run, under a budget of ``Job.budget_mib``, and what they measure is memory.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from fsspec.implementations.memory import MemoryFileSystem

import cio_sync
from bench import traffic


@dataclass
class Job:
    """What the parent asks one child to do: the case, its input, where to write."""

    case: str
    traffic: str
    calls: int
    folder: str
    s3: dict[str, Any] | None = None
    #: ``max_buffer_bytes`` of the outage cases, in MiB.
    budget_mib: float | None = None


@dataclass
class Outcome:
    """One timed run: how many calls in how long, and what it wrote."""

    calls: int
    seconds: float
    files: list[int] = field(default_factory=list)  # the size in bytes of each data file written
    #: The most ``SinkStats.bytes_in_memory`` said the sink held (what ``max_buffer_bytes`` bounds), sampled every
    #: 10,000 calls: set beside peak RSS, it shows how far the sink's accounting is from the memory it takes.
    accounted_peak_mib: float | None = None
    #: The outage cases: the budget, the peak RSS while storage was down (before it came back and the sink
    #: published everything), what ended the run ("BufferFull" or "end of stream") and the rows then published.
    budget_mib: float | None = None
    peak_rss_mib: float | None = None
    stopped_by: str | None = None
    published_rows: int | None = None


#: RSS (MiB) when the clock last started: what the process held before the case began its work.
rss_at_start: list[float] = []


def _proc_status_mib(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_now_mib() -> float:
    """Resident set size now; the peak so far where /proc is missing."""
    return _proc_status_mib("VmRSS") or peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set size of this process since it started.

    VmHWM, not ``getrusage``: on Linux ``ru_maxrss`` also counts the parent's RSS at the moment it forked us (the
    high-water mark of the memory image ``exec`` replaced), which would charge every case with the parent's traffic.
    ``ru_maxrss`` (KiB on Linux, bytes on macOS) is the fallback elsewhere.
    """
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _start() -> float:
    rss_at_start.append(rss_now_mib())
    return time.perf_counter()


def _clock() -> float:
    return time.perf_counter()


def _sizes(folder: Path) -> list[int]:
    """Sizes of the data files under ``folder``, leaving out the sink's bookkeeping and manifests."""
    sizes = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith("_")]
        sizes += [os.path.getsize(os.path.join(root, n)) for n in names if not n.startswith((".", "_"))]
    return sizes


# -- baselines -----------------------------------------------------------------------------------------------------


def raw_pyarrow(job: Job) -> Outcome:
    """What a careful user writes by hand: nested objects to JSON text, ``Table.from_pylist``, ``write_table``
    (zstd), one file, no validation."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    calls = traffic.load(job.traffic, job.calls)
    path = Path(job.folder) / "raw.parquet"
    start = _start()
    rows = []
    for call in calls:
        row = dict(call)
        for key in traffic.NESTED:
            value = row.get(key)
            if value is not None:
                row[key] = orjson.dumps(value).decode()
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), path, compression="zstd")
    return Outcome(len(calls), _clock() - start, [path.stat().st_size])


def orjson_lines(job: Job) -> Outcome:
    """The cheapest durable-enough thing: each call as a JSON line, one file."""
    calls = traffic.load(job.traffic, job.calls)
    path = Path(job.folder) / "calls.jsonl"
    start = _start()
    dumps = orjson.dumps
    with open(path, "wb") as f:
        for call in calls:
            f.write(dumps(call) + b"\n")
    return Outcome(len(calls), _clock() - start, [path.stat().st_size])


def dlt_filesystem(job: Job) -> Outcome:
    """dlt's filesystem destination to Parquet on local disk, nested objects kept as JSON (``max_table_nesting=0``,
    the same shape cio_sync writes). Pipeline creation is timed: a user pays it on every run."""
    folder = Path(job.folder)
    os.environ.update({
        "RUNTIME__DLTHUB_TELEMETRY": "false",  # no network calls from a benchmark
        "DLT_DATA_DIR": str(folder / "dlt-data"),
        "DLT_PROJECT_DIR": str(folder),
    })
    import dlt

    calls = traffic.load(job.traffic, job.calls)
    start = _start()
    pipeline = dlt.pipeline(pipeline_name="bench", pipelines_dir=str(folder / "pipelines"), dataset_name="calls",
                            destination=dlt.destinations.filesystem(bucket_url=str(folder / "bucket")))
    pipeline.run(dlt.resource(calls, name="calls", max_table_nesting=0), loader_file_format="parquet")
    elapsed = _clock() - start
    return Outcome(len(calls), elapsed, [s for s in _sizes(folder / "bucket") if s])


# -- cio_sync ------------------------------------------------------------------------------------------------------


def _advanced(fmt: str, *, as_bytes: bool = False, spool: str | None = None) -> Callable[[Job], Outcome]:
    def run(job: Job) -> Outcome:
        calls: list[Any] = traffic.load(job.traffic, job.calls)
        if as_bytes:
            calls = [orjson.dumps(c) for c in calls]  # what an HTTP server or a queue hands over
        folder = Path(job.folder)
        return _timed_sink(lambda published: cio_sync.AdvancedSink(
            str(folder / "bucket"), format=fmt, flush_interval=None, on_publish=published,
            spool_dir=folder / "spool" if spool else None, spool_sync=spool or "always",
        ), calls)

    return run


Sink = cio_sync.AdvancedSink | cio_sync.StandardSink
Published = Callable[[cio_sync.WrittenFile], None]


def _timed_sink(make: Callable[[Published], Sink], calls: Iterable[Any]) -> Outcome:
    """Open the sink, write every call, close it; the clock covers all three."""
    written: list[int] = []
    count = accounted = 0
    start = _start()
    with make(lambda f: written.append(f.bytes)) as sink:
        write = sink.write
        for count, call in enumerate(calls, 1):
            write(call)
            if not count % 10_000:
                accounted = max(accounted, sink.stats.bytes_in_memory)
    return Outcome(count, _clock() - start, written, accounted / 2**20)


def _standard(commit_every: int) -> Callable[[Job], Outcome]:
    def run(job: Job) -> Outcome:
        calls = traffic.load(job.traffic, job.calls)
        folder = Path(job.folder)
        return _timed_sink(lambda published: cio_sync.StandardSink(
            str(folder / "bucket"), workspace_id=1, state=folder / "state.sqlite", flush_interval=None,
            on_publish=published, commit_every=commit_every,
        ), calls)

    return run


def _s3(fmt: str, *, large: bool = False) -> Callable[[Job], Outcome]:
    """To SeaweedFS S3, into a fresh bucket. ``large``: one file per call type for the whole run (no size or row
    cut, no buffer budget), so the biggest file passes the multipart threshold (2 x 16 MiB parts) and goes up in
    parts."""

    def run(job: Job) -> Outcome:
        import s3fs

        assert job.s3 is not None, "an S3 case needs the server's storage options"
        pool = traffic.load(job.traffic)
        calls: Iterable[Any] = traffic.stream(pool, job.calls) if large else pool[:job.calls]
        fs = s3fs.S3FileSystem(**job.s3)
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        fs.mkdir(bucket)
        try:
            limits: dict[str, Any] = {"max_rows": None, "max_bytes": None, "max_buffer_bytes": None} if large else {}
            return _timed_sink(lambda published: cio_sync.AdvancedSink(
                f"s3://{bucket}/raw", format=fmt, storage_options=job.s3, flush_interval=None,
                on_publish=published, **limits,
            ), calls)
        finally:
            fs.rm(bucket, recursive=True)

    return run


def _large_local(fmt: str) -> Callable[[Job], Outcome]:
    """The local-disk twin of the large S3 case: the same calls, the same settings."""

    def run(job: Job) -> Outcome:
        pool = traffic.load(job.traffic)
        return _timed_sink(lambda published: cio_sync.AdvancedSink(
            str(Path(job.folder) / "bucket"), format=fmt, flush_interval=None, on_publish=published, max_rows=None,
            max_bytes=None, max_buffer_bytes=None,
        ), traffic.stream(pool, job.calls))

    return run


def memory_growth(job: Job) -> Outcome:
    """Parquet with every default (files cut by ``max_rows`` / ``max_bytes``, one ``max_buffer_bytes`` budget) over
    a lazily generated stream of ``job.calls`` calls: peak RSS should not grow with the stream."""
    pool = traffic.load(job.traffic)
    return _timed_sink(lambda published: cio_sync.AdvancedSink(
        str(Path(job.folder) / "bucket"), format="parquet", flush_interval=None, on_publish=published,
    ), traffic.stream(pool, job.calls))


class Unreachable(MemoryFileSystem):  # type: ignore[misc]  # fsspec has no type hints
    """Storage that is down while ``down`` is set: every upload, listing and read raises ``ConnectionError``."""

    protocol = "bench-unreachable"
    down = True

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("storage unreachable (bench outage case)")

    def pipe_file(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().pipe_file(*args, **kwargs)

    def ls(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().ls(*args, **kwargs)

    def cat_file(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().cat_file(*args, **kwargs)


def small_calls(count: int) -> Iterator[dict[str, Any]]:
    """``count`` of the smallest calls there are: a track with a user id and an event name, no messageId (the
    sink makes one), as a fresh dict each."""
    for n in range(count):
        yield {"type": "track", "userId": f"user-{n % 1000}", "event": "Viewed"}


def _outage(small: bool, spool: bool) -> Callable[[Job], Outcome]:
    """Storage down for the whole run, ``max_buffer_bytes`` of ``job.budget_mib``. Without a spool the sink waits
    (``when_full="block"``, ``block_timeout=0.1``) and raises ``BufferFull`` once the budget is full: the run ends
    there. With a spool it spills and keeps accepting: the run writes ``job.calls`` calls. Then storage comes back
    and ``close()`` publishes every accepted call (not timed, not in the peak)."""

    def run(job: Job) -> Outcome:
        assert job.budget_mib, "an outage case needs a budget"
        budget = int(job.budget_mib * 2**20)
        calls = small_calls(job.calls) if small else traffic.stream(traffic.load(job.traffic), job.calls)
        fs = Unreachable(skip_instance_cache=True)
        writer = cio_sync.FsspecWriter(f"/outage-{uuid.uuid4().hex[:12]}", filesystem=fs,
                                       retry=cio_sync.RetryPolicy(attempts=1, initial_delay=0))
        accepted = accounted = 0
        stopped = "end of stream"
        start = _start()
        sink = cio_sync.AdvancedSink(writer, flush_interval=None, max_buffer_bytes=budget, block_timeout=0.1,
                                     spool_dir=Path(job.folder) / "spool" if spool else None, spool_sync="os")
        write = sink.write
        try:
            for call in calls:
                write(call)
                accepted += 1
                if not accepted % 10_000:
                    accounted = max(accounted, sink.stats.bytes_in_memory)
        except cio_sync.BufferFull:
            stopped = "BufferFull"
        seconds = _clock() - start
        accounted = max(accounted, sink.stats.bytes_in_memory)
        peak = peak_rss_mib()
        fs.down = False
        published = sum(f.rows for f in sink.close())
        return Outcome(accepted, seconds, accounted_peak_mib=accounted / 2**20, budget_mib=job.budget_mib,
                       peak_rss_mib=peak, stopped_by=stopped, published_rows=published)

    return run


#: Every case by key: (label, function).
CASES: dict[str, tuple[str, Callable[[Job], Outcome]]] = {
    "raw-pyarrow": ("raw pyarrow (from_pylist + write_table)", raw_pyarrow),
    "orjson-lines": ("orjson JSON lines", orjson_lines),
    "dlt": ("dlt filesystem, parquet", dlt_filesystem),
    "parquet": ("Advanced parquet, dicts in", _advanced("parquet")),
    "parquet-bytes": ("Advanced parquet, JSON bytes in", _advanced("parquet", as_bytes=True)),
    "csv": ("Advanced csv, dicts in", _advanced("csv")),
    "json": ("Advanced json, dicts in", _advanced("json")),
    "spool-os": ("Advanced parquet, spool sync=os", _advanced("parquet", spool="os")),
    "spool-interval": ("Advanced parquet, spool sync=interval", _advanced("parquet", spool="interval")),
    "spool-always": ("Advanced parquet, spool sync=always", _advanced("parquet", spool="always")),
    "s3-parquet": ("Advanced parquet, to S3", _s3("parquet")),
    "standard-1": ("Standard identify, SQLite, commit_every=1", _standard(1)),
    "standard-1000": ("Standard identify, SQLite, commit_every=1000", _standard(1000)),
    "large-local": ("Advanced json, large files, local", _large_local("json")),
    "large-s3": ("Advanced json, large files, to S3", _s3("json", large=True)),
    "memory": ("Advanced parquet, defaults, streamed", memory_growth),
    "outage-small": ("storage down, small calls, no spool", _outage(small=True, spool=False)),
    "outage-small-spool": ("storage down, small calls, spool", _outage(small=True, spool=True)),
    "outage-mixed": ("storage down, mixed calls, no spool", _outage(small=False, spool=False)),
    "outage-mixed-spool": ("storage down, mixed calls, spool", _outage(small=False, spool=True)),
}
