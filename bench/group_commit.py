"""Group commit against per-row fsyncs: how many calls a second reach the spool durably.

Run ``python -m bench.group_commit [--seconds N] [--threads 1,8,64]``. For each thread count, each thread writes one
call and then waits until it is durable, in a loop, for N seconds, on an Advanced sink with a spool on local disk:

- ``always``: ``spool_sync="always"`` (the baseline): ``write()`` fsyncs its row before it returns;
- ``group``: ``spool_sync="group"``: ``write()`` then ``sync()``, which shares fsyncs between the threads waiting.

It prints calls/s and fsyncs/s (the spool's own count) for both, and the ratio of group to always, measured in the
same run. Publishing is left out (``flush_interval=None``, batches of 500,000 rows: none is cut while timed); the
spool sits under ``--folder`` (the system temp directory by default: put it on the disk you mean to measure). Not a
test: the figures depend on the disk.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import cio_sync


def run(policy: str, threads: int, seconds: float, folder: Path) -> tuple[float, float]:
    """Calls/s and fsyncs/s with ``threads`` threads each writing one call then making it durable, for ``seconds``."""
    work = Path(tempfile.mkdtemp(prefix=f"group-{policy}-{threads}-", dir=folder))
    sink = cio_sync.AdvancedSink(str(work / "target"), spool_dir=work / "spool", spool_sync=policy,
                                 flush_interval=None)
    assert sink.spool is not None
    counts = [0] * threads
    stop = threading.Event()
    start = threading.Barrier(threads + 1)

    def loop(n: int) -> None:
        call = {"type": "track", "userId": f"u{n}", "event": "Bench", "properties": {"n": n}}
        start.wait()
        done = 0
        while not stop.is_set():
            sink.write(call)
            if policy != "always":
                sink.sync()
            done += 1
        counts[n] = done

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    sink.write({"type": "track", "userId": "warm", "event": "Bench"})  # the segment exists before the clock starts
    sink.sync()
    before = sink.spool.fsyncs
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    took = time.perf_counter() - began
    fsyncs = sink.spool.fsyncs - before
    sink.close()
    shutil.rmtree(work, ignore_errors=True)
    return sum(counts) / took, fsyncs / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each run lasts (default 3)")
    parser.add_argument("--threads", default="1,8,64", help="thread counts, comma-separated (default 1,8,64)")
    parser.add_argument("--folder", type=Path, default=None, help="where the spools go (default: the temp dir)")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    print(f"spool under {folder}, {args.seconds:g} s a run; each thread: write one call, then wait until durable")
    print(f"{'threads':>7}  {'always calls/s':>14}  {'fsyncs/s':>9}  {'group calls/s':>13}  {'fsyncs/s':>9}  "
          f"{'calls/fsync':>11}  {'group/always':>12}")
    for threads in (int(t) for t in args.threads.split(",")):
        always, always_fsyncs = run("always", threads, args.seconds, folder)
        group, group_fsyncs = run("group", threads, args.seconds, folder)
        per_fsync = group / group_fsyncs if group_fsyncs else float("inf")
        print(f"{threads:>7}  {always:>14,.0f}  {always_fsyncs:>9,.0f}  {group:>13,.0f}  {group_fsyncs:>9,.0f}  "
              f"{per_fsync:>11.1f}  {group / always:>11.2f}x")


if __name__ == "__main__":
    main()
