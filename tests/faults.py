"""The fault-injection harness: real full disks, and failing writes, fsyncs and renames at chosen points.

Two tools, used by the fault tests of every write point (spool, state, local writer, loader):

- :class:`SmallDisk`: a small tmpfs mounted for one test (Linux, as root; skipped with the reason elsewhere), with
  :meth:`SmallDisk.fill` to leave only a few bytes free and :meth:`SmallDisk.free` to give the space back. What
  fails there is the kernel's own ENOSPC, for SQLite, the spool and the writer alike.
- faultfs (``tests/faultfs/faultfs.c``): a small library loaded with ``LD_PRELOAD`` into a child process that wraps
  libc's file-writing calls and, for files under one path prefix, fails the n-th ``write``/``fsync``/``rename``/
  ``link``/``create``/... with ENOSPC or EIO (optionally writing half the bytes first, as a filling disk does), for
  as many calls as asked, or kills the process with SIGKILL right at that call. :func:`run_child` runs a function
  of ``tests.fault_scenarios`` in such a child; inside it, :func:`faults` controls the injector.

Sweeps count the calls of a clean run first (:meth:`Faults.total`), then fail each write point in turn.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errnos
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(__file__).resolve().parent / "faultfs" / "faultfs.c"
OPS = ("create", "write", "fsync", "truncate", "rename", "link", "unlink")
ENOSPC = errnos.ENOSPC
EIO = errnos.EIO


class Unavailable(RuntimeError):
    """The harness cannot run here (not Linux, no C compiler, not root for tmpfs); the message says why."""


# -- faultfs -----------------------------------------------------------------------------------------------------


def faultfs_library() -> Path:
    """The compiled faultfs library, built once per version of its source into the system temp directory."""
    if not sys.platform.startswith("linux"):
        raise Unavailable("faultfs wraps glibc's calls: Linux only")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"cio-sync-faultfs-{digest}"
    library = folder / "libfaultfs.so"
    if library.exists():
        return library
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise Unavailable("no C compiler (gcc) to build tests/faultfs/faultfs.c")
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"libfaultfs.{os.getpid()}.so"
    result = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(partial), str(SOURCE), "-ldl"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise Unavailable(f"could not build faultfs: {result.stderr.strip()[-500:]}")
    os.replace(partial, library)
    return library


@dataclass
class Faults:
    """The faultfs injector of this process (a child started by :func:`run_child`)."""

    lib: ctypes.CDLL

    def arm(self, ops: str | tuple[str, ...] = "write", *, nth: int = 1, count: int = 1, errno: int = ENOSPC,
            partial: bool = False, kill: str | None = None) -> None:
        """From now on, fail the ``nth`` counted call of ``ops`` (and the ``count - 1`` after it) with ``errno``;
        with ``partial`` a failing write first writes half its bytes; ``kill="before"``/``"after"`` sends SIGKILL
        at that call instead of failing it. Counting starts again at every arm."""
        names = ops if isinstance(ops, str) else ",".join(ops)
        unknown = set(names.split(",")) - {*OPS, "all"}
        if unknown:
            raise ValueError(f"unknown faultfs ops {sorted(unknown)}; known: {OPS}")
        kill_mode = {None: 0, "before": 1, "after": 2}[kill]
        self.lib.faultfs_arm(names.encode(), ctypes.c_long(nth), ctypes.c_long(count), errno, int(partial),
                             kill_mode)

    def disarm(self) -> None:
        """Stop failing: the disk has room again."""
        self.lib.faultfs_disarm()

    def total(self, op: str) -> int:
        """Calls of ``op`` on files under the prefix since the process started (or :meth:`reset_totals`)."""
        return int(self.lib.faultfs_total(op.encode()))

    def totals(self) -> dict[str, int]:
        return {op: self.total(op) for op in OPS}

    def reset_totals(self) -> None:
        self.lib.faultfs_reset_totals()

    @property
    def seen(self) -> int:
        """Counted calls since the last :meth:`arm`."""
        return int(self.lib.faultfs_seen())

    @property
    def failures(self) -> int:
        """Calls failed since the last :meth:`arm`."""
        return int(self.lib.faultfs_failures())

    def set_prefix(self, path: str | os.PathLike[str]) -> None:
        """Only files under ``path`` are counted and failed (files opened before this call are not tracked)."""
        self.lib.faultfs_set_prefix(os.fspath(path).encode())

    @contextlib.contextmanager
    def failing(self, ops: str | tuple[str, ...] = "write", **arm: Any) -> Iterator[Faults]:
        """Fail as :meth:`arm` says within the block; the fault clears when it ends."""
        self.arm(ops, **arm)
        try:
            yield self
        finally:
            self.disarm()


def faults() -> Faults:
    """The injector of this process; raises :class:`Unavailable` outside a faultfs child."""
    lib = ctypes.CDLL(None)
    if not hasattr(lib, "faultfs_arm"):
        raise Unavailable("this process was not started with faultfs (see run_child)")
    for name in ("faultfs_total", "faultfs_seen", "faultfs_failures"):
        getattr(lib, name).restype = ctypes.c_long
    return Faults(lib)


@dataclass
class ChildResult:
    """How a child ended: its exit code (negative: the signal that killed it), its result, its stderr."""

    returncode: int
    result: Any
    stderr: str

    @property
    def killed(self) -> bool:
        return self.returncode == -9


def run_child(function: str, *args: Any, prefix: str | os.PathLike[str], timeout: float = 300,
              env: dict[str, str] | None = None, **arm: Any) -> ChildResult:
    """Run ``function(*args)`` in a Python child with faultfs watching ``prefix``: a function of
    ``tests.fault_scenarios``, or any importable one as ``"package.module:function"``.

    ``arm`` (ops, nth, count, errno, partial, kill) arms the injector from the start, through the environment, so a
    fault can hit the child's first write; the child can also arm it itself with :func:`faults`. The function's
    return value (JSON) is the result; a child killed by faultfs has ``killed`` true and no result.
    """
    library = faultfs_library()
    result_file = Path(tempfile.mkstemp(prefix="cio-sync-fault-result-", suffix=".json")[1])
    variables = {**os.environ, "LD_PRELOAD": str(library), "FAULTFS_PREFIX": os.fspath(prefix),
                 "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    if arm:
        ops = arm.pop("ops", "write")
        variables.update({
            "FAULTFS_OPS": ops if isinstance(ops, str) else ",".join(ops),
            "FAULTFS_NTH": str(arm.pop("nth", 1)), "FAULTFS_COUNT": str(arm.pop("count", 1)),
            "FAULTFS_ERRNO": str(arm.pop("errno", ENOSPC)), "FAULTFS_PARTIAL": str(int(arm.pop("partial", False))),
            "FAULTFS_KILL": str({None: 0, "before": 1, "after": 2}[arm.pop("kill", None)]),
        })
        if arm:
            raise TypeError(f"unknown arm options {sorted(arm)}")
    module, _, name = function.rpartition(":")
    code = ("import importlib, json, sys\n"
            f"module = importlib.import_module({module or 'tests.fault_scenarios'!r})\n"
            f"result = getattr(module, {name!r})(*json.loads(sys.argv[1]))\n"
            "with open(sys.argv[2], 'w') as f:\n"
            "    json.dump(result, f)\n"
            "if isinstance(result, dict) and result.get('_exit'):\n"
            "    import os\n"
            "    os._exit(0)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(args), str(result_file)], env=variables,
                              cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout, check=False)
        text = result_file.read_text()
        result = json.loads(text) if text.strip() else None
    finally:
        result_file.unlink(missing_ok=True)
    return ChildResult(done.returncode, result, done.stderr.decode(errors="replace")[-4000:])


# -- a small disk ------------------------------------------------------------------------------------------------


class SmallDisk:
    """A tmpfs of ``size`` bytes mounted at ``path`` for one test: a real disk that fills up."""

    def __init__(self, path: Path, size: int = 16 * 2**20, inodes: int | None = None) -> None:
        if not sys.platform.startswith("linux"):
            raise Unavailable("a small tmpfs needs Linux")
        if os.geteuid() != 0:
            raise Unavailable("mounting a small tmpfs needs root")
        if shutil.which("mount") is None:
            raise Unavailable("no mount command")
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise Unavailable(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.path = path
        self.size = size
        self._filler = path / ".filler"

    @property
    def available(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Take all the free space but ``leave`` bytes (rounded to pages): writes beyond it fail with ENOSPC."""
        with open(self._filler, "ab") as f:
            chunk = b"\0" * 2**20
            while self.available > leave:
                want = self.available - leave
                try:
                    f.write(chunk[: min(len(chunk), max(want, 1))])
                    f.flush()
                except OSError as exc:
                    if exc.errno != ENOSPC:
                        raise
                    break

    def free(self) -> None:
        """Give every byte taken by :meth:`fill` back."""
        self._filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)


# -- what a trial left behind -------------------------------------------------------------------------------------


def published_ids(root: Path, column: str = "messageId") -> Counter[str]:
    """How many times each value of ``column`` appears in the data files directly under ``root`` (Parquet, CSV and
    JSON lines; bookkeeping folders and dot-files are not data)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    found: Counter[str] = Counter()
    if not root.exists():
        return found
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.name.startswith((".", "_")):
            continue
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        elif path.suffix == ".csv":
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={column: pa.string()}))
        elif path.suffix == ".json":
            found.update(str(json.loads(line)[column]) for line in path.read_text().splitlines() if line.strip())
            continue
        else:
            continue
        if column in table.column_names:
            found.update(str(v) for v in table.column(column).to_pylist())
    return found


def leftovers(*folders: Path) -> list[str]:
    """Temporary files left anywhere under ``folders``: what a clean run never leaves behind."""
    found = []
    for folder in folders:
        if folder.exists():
            found += [str(p) for p in folder.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or
                                                                              ".tmp." in p.name)]
    return sorted(found)
