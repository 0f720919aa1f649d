"""What tests/test_fork.py runs in a fresh interpreter: a parent with a sink open forks, the child does one thing
(exits, closes, writes, flushes, opens a sink of its own), then the parent goes on and closes.

Each function runs as ``python -c`` through :func:`run`, so a child of ``os.fork()`` can leave by a normal
interpreter exit (``sys.exit``: atexit handlers run) without running the rest of the test suite's process. What
the child saw is written to a JSON file beside the result; the parent's result says what it accepted.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cio_sync

ROOT = Path(__file__).resolve().parent.parent


def run(function: str, *args: Any, timeout: float = 120) -> dict[str, Any]:
    """Run ``function(*args)`` of this module in a fresh Python process; its JSON result (and the child's report
    under ``"child"``, stderr under ``"stderr"``)."""
    code = ("import json, sys\n"
            "from tests import fork_scenarios\n"
            f"result = fork_scenarios.{function}(*json.loads(sys.argv[1]))\n"
            "print('RESULT ' + json.dumps(result), flush=True)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert len(lines) == 1, done.stdout
    result: dict[str, Any] = json.loads(lines[0][len("RESULT "):])
    result["stderr"] = done.stderr
    return result


def _call(n: int) -> dict[str, Any]:
    return {"type": "track", "userId": f"user-{n}", "event": "Ordered", "messageId": f"m-{n}",
            "properties": {"n": n}}


def _identify(n: int) -> dict[str, Any]:
    return {"type": "identify", "userId": f"person-{n}", "traits": {"n": n, "plan": "pro"}}


def _attempt(report: dict[str, Any], what: str, action: Any) -> None:
    """Run ``action`` in the child and say in ``report`` how it ended: ``"ok"`` or the error's type and text."""
    try:
        action()
    except Exception as exc:  # what the child sees is the point of the test
        report[what] = {"error": type(exc).__name__, "message": str(exc)}
    else:
        report[what] = "ok"


def _in_child(action: str, sink: Any, report_path: str, own: dict[str, Any] | None, write: Any) -> None:
    """The child's part: do ``action`` with the inherited ``sink``, write what happened, leave by a normal exit."""
    report: dict[str, Any] = {"pid": os.getpid(), "closed": sink.closed}
    if action == "close":
        _attempt(report, "close", lambda: report.setdefault("closed_files", len(sink.close())))
    elif action == "write":
        _attempt(report, "write", write)
        _attempt(report, "flush", sink.flush)
    elif action == "with":
        def use() -> None:
            with sink:
                write()
        _attempt(report, "with", use)
    elif action == "own":  # a sink of the child's own, on its own folder (and spool or state)
        def own_sink() -> None:
            assert own is not None
            with cio_sync.AdvancedSink(own["root"], flush_interval=None, spool_dir=own.get("spool")) as mine:
                for n in range(own["calls"]):
                    mine.write(_call(100_000 + n))
        _attempt(report, "own", own_sink)
    Path(report_path).write_text(json.dumps(report))
    sys.exit(0)  # a normal exit: atexit handlers run, as they do when a forked worker returns


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def advanced(root: str, spool: str | None, action: str, report_path: str, own: dict[str, Any] | None = None, *,
             before: int = 40, after: int = 10) -> dict[str, Any]:
    """An AdvancedSink (memory buffer, or a spool) with ``before`` calls buffered forks; the child does ``action``;
    the parent writes ``after`` more calls and closes."""
    sink = cio_sync.AdvancedSink(root, flush_interval=None, spool_dir=spool, spool_sync="os")
    accepted = [sink.write(_call(n)) for n in range(before)]
    pid = os.fork()
    if pid == 0:
        _in_child(action, sink, report_path, own, lambda: sink.write(_call(999_999)))
    status = _wait(pid)
    accepted += [sink.write(_call(n)) for n in range(before, before + after)]
    published = sum(f.rows for f in sink.close())
    return {"child_exit": status, "accepted": accepted, "published_rows": published}


def _state_locked(state: str, root: str) -> bool:
    """Whether another sink is refused the state file (it is locked by its owner)."""
    try:
        other = cio_sync.StandardSink(root, workspace_id=1, state=state, flush_interval=None)
    except cio_sync.StateError:
        return True
    other.close()
    return False


def standard(root: str, state: str, action: str, report_path: str, *, before: int = 30,
             after: int = 10) -> dict[str, Any]:
    """A StandardSink on a state file, with ``before`` identify calls applied and not yet committed or published,
    forks; the child does ``action``; the parent checks that its state file is still locked, writes ``after`` more
    calls and closes."""
    sink = cio_sync.StandardSink(root, workspace_id=1, state=state, flush_interval=None, commit_every=1000)
    for n in range(before):
        sink.write(_identify(n))
    pid = os.fork()
    if pid == 0:
        _in_child(action, sink, report_path, None, lambda: sink.write(_identify(999_999)))
    status = _wait(pid)
    locked = _state_locked(state, root + "-other")
    for n in range(before, before + after):
        sink.write(_identify(n))
    published = sum(f.rows for f in sink.close())
    return {"child_exit": status, "locked_after_child": locked, "people": before + after,
            "published_rows": published}


#: The sink a worker of the pool below finds in its globals, as a module-level sink of a user's program would be.
_SINKS: dict[str, cio_sync.AdvancedSink] = {}


def _worker(n: int) -> dict[str, Any]:
    """A pool worker that uses the sink its parent opened (a mistake a user can make): what it saw."""
    sink = _SINKS["pool"]
    report: dict[str, Any] = {}
    _attempt(report, "write", lambda: sink.write(_call(500_000 + n)))
    _attempt(report, "flush", sink.flush)
    return report


def pool(root: str, spool: str | None, before: int = 40) -> dict[str, Any]:
    """A sink with ``before`` calls buffered, then a pool of forked workers (multiprocessing's fork start method)
    that each try to write to it and flush it; then the parent closes."""
    _SINKS["pool"] = sink = cio_sync.AdvancedSink(root, flush_interval=None, spool_dir=spool, spool_sync="os")
    accepted = [sink.write(_call(n)) for n in range(before)]
    with multiprocessing.get_context("fork").Pool(2) as workers:
        seen = workers.map(_worker, range(4))
    published = sum(f.rows for f in sink.close())
    return {"accepted": accepted, "workers": seen, "published_rows": published}
