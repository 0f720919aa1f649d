"""Stopping a service on SIGTERM (or any signal) the way Ctrl-C stops it, without losing what its sinks hold.

Python's default SIGTERM kills the process on the spot: no ``with`` block is left, no atexit handler runs, and a sink
without a spool loses its buffer. :class:`close_on_signals` installs handlers that, on one of its signals, stop the
process in order: the sinks are closed (what they hold is published; from then on writes are refused with
``SinkClosed``) and ``SystemExit(128 + signum)`` is raised in the main thread, so ``with`` blocks and ``finally``
clauses run and the process exits with the conventional status.

A Python signal handler runs in the main thread between two bytecodes, possibly in the middle of a sink's
``write()``. The Standard sink undoes a step that an exception interrupts, but the Advanced sink's buffers are
plain Python structures, and a close from inside a write would re-enter the sink's locks (and a counter's plain
lock: a deadlock). So the stop never happens while the main thread is inside cio_sync code (a ``write``,
``flush``, ``close``, a publish, a ``load``): the handler notes the signal and sets a profile hook
(``sys.setprofile``) on the main thread that stops the process at the first event after the outermost cio_sync
call returns. A write in flight therefore completes and returns (its call is published), or had not begun (then
``write()`` raises ``SystemExit`` before anything of it is kept). Between two calls of ``write_many`` or
``record_many`` is a stop point too, so a ``write_many`` fed by a generator that blocks can still be stopped. Under
another profiler (``cProfile``), a watcher thread delivers the signal again once the main thread is out instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import CodeType, FrameType, TracebackType
from typing import Any, Final, NoReturn, Protocol, Self

from cio_sync._errors import ConfigError
from cio_sync.publish.publisher import _OPEN
from cio_sync.sinks.base import BaseSink, expand_batch
from cio_sync.sinks.standard import StandardSink

log = logging.getLogger("cio_sync.signals")

Handler = Callable[[int, FrameType | None], Any] | int | None

#: How often the watcher (used under another profiler) looks whether the main thread left cio_sync code (seconds).
_POLL: Final = 0.002
#: Modules whose frames do not count as "inside a sink": the command line's own loops, and this module.
_TRANSPARENT: Final = frozenset({"cio_sync.cli", "cio_sync.__main__", __name__})
#: Functions of cio_sync where stopping is safe although they are cio_sync code: the loops that hand one call (or
#: record) at a time to ``write``/``record``, between two calls, and the pure expansion of a batch payload.
_STOP_POINTS: Final[frozenset[CodeType]] = frozenset({
    BaseSink.write_many.__code__,
    StandardSink.record_many.__code__,
    expand_batch.__code__,
    *(c for c in expand_batch.__code__.co_consts if isinstance(c, CodeType)),
})


def _sink_frame(frame: FrameType) -> bool | None:
    """True for a frame of cio_sync code where a stop could tear a sink's state, False for a stop point, ``None``
    for a frame that is not cio_sync's (or is transparent)."""
    module = frame.f_globals.get("__name__", "")
    if (module == "cio_sync" or module.startswith("cio_sync.")) and module not in _TRANSPARENT:
        return frame.f_code not in _STOP_POINTS
    return None


def _inside_sink(frame: FrameType | None) -> bool:
    """Whether the innermost cio_sync frame of this stack is one where a stop could tear a sink's state."""
    while frame is not None:
        kind = _sink_frame(frame)
        if kind is not None:
            return kind
        frame = frame.f_back
    return False


def _boundary(frame: FrameType | None) -> FrameType | None:
    """The outermost frame of the innermost run of cio_sync frames: once it returns, the main thread is out."""
    boundary = None
    while frame is not None:
        kind = _sink_frame(frame)
        if kind is False or (kind is None and boundary is not None):
            break
        if kind:
            boundary = frame
        frame = frame.f_back
    return boundary


class _Closable(Protocol):
    def close(self) -> object: ...


class close_on_signals:  # a class used like a function, as contextlib.suppress is
    """Publish what the sinks hold and exit when the process gets one of ``signals`` (default SIGTERM).

    Use it around the main loop of a service, in the main thread::

        with cio_sync.AdvancedSink("s3://bucket/raw") as sink, cio_sync.close_on_signals(sink):
            serve(sink)

    On entering, it installs a handler for each signal (the previous handlers come back on leaving). When one
    arrives it waits until the main thread is not inside cio_sync code (a write in flight completes or is refused
    whole, see the module's notes), then closes ``sinks`` in order — with none given, every sink still open in this
    process — and raises ``SystemExit(exit_code)``, by default ``128 + signum`` (143 for SIGTERM, 130 for SIGINT),
    in the main thread. A sink that cannot publish (storage down) is logged and keeps its spool, if it has one.
    A second signal while the first waits or while the sinks close means "now": it does what it does without this
    helper (SIGTERM kills the process, SIGINT raises ``KeyboardInterrupt``). :attr:`received` tells which signal
    stopped the process.

    Raises :class:`~cio_sync.ConfigError` for a signal that cannot be caught (SIGKILL, SIGSTOP) or is not a
    signal, an ``exit_code`` outside 0..255, and when entered outside the main thread (Python runs signal handlers
    only there).
    """

    def __init__(self, *sinks: _Closable, signals: Iterable[int] = (signal.SIGTERM,),
                 exit_code: int | None = None) -> None:
        chosen: list[signal.Signals] = []
        for number in signals:
            try:
                chosen.append(signal.Signals(number))
            except (TypeError, ValueError):
                raise ConfigError(f"close_on_signals: {number!r} is not a signal") from None
        uncatchable = {s.name for s in chosen} & {"SIGKILL", "SIGSTOP"}
        if uncatchable:
            raise ConfigError(f"close_on_signals: {', '.join(sorted(uncatchable))} cannot be caught")
        if not chosen:
            raise ConfigError("close_on_signals needs at least one signal")
        if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)
                                      or not 0 <= exit_code <= 255):
            raise ConfigError(f"exit_code must be an integer from 0 to 255, or None; got {exit_code!r}")
        for sink in sinks:
            if not callable(getattr(sink, "close", None)):
                raise ConfigError(f"close_on_signals takes sinks (objects with close()); got {type(sink).__name__}")
        self.sinks = sinks
        self.signals = tuple(dict.fromkeys(chosen))
        self.exit_code = exit_code
        #: The first of ``signals`` that arrived while this was active, or ``None``.
        self.received: int | None = None
        self._previous: dict[int, Handler] = {}
        self._active = False
        self._stopping = False
        self._redelivered = False
        self._holds = 0
        self._holds_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._boundary: FrameType | None = None
        self._left = False
        self._pid = 0

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self.signals)
        return f"close_on_signals({len(self.sinks) or 'every open'} sink(s), signals=({names}))"

    # -- the context -----------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("close_on_signals must be entered in the main thread: Python runs signal handlers "
                              "only there")
        if self._active:
            raise ConfigError("this close_on_signals is already active")
        self._pid = os.getpid()
        self._stopping = False
        self._redelivered = False
        self.received = None
        self._active = True
        try:
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._handle)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._restore()
        if exc_type is None and self.received is not None and not self._stopping:
            # The signal came while the block was finishing a sink call: honour it now that the block is over.
            self._stop(self.received)

    def _restore(self) -> None:
        self._active = False
        self._boundary = None
        if sys.getprofile() == self._profile:
            sys.setprofile(None)
        for number, previous in reversed(self._previous.items()):
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """A block that a signal does not interrupt: a stop waits until it ends (from any thread).

        For steps that must not be cut in two, such as writing a call and acknowledging it to the queue it came
        from: ``with guard.hold(): sink.write(message.body); message.ack()``.
        """
        with self._holds_lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._holds_lock:
                self._holds -= 1
                last = self._holds == 0
            if last and self._active and self.received is not None and not self._stopping:
                if threading.current_thread() is threading.main_thread():
                    self._stop_or_defer(sys._getframe())
                else:
                    self._deliver()

    def checkpoint(self) -> None:
        """Stop now if a signal arrived and is waiting (a safe point the caller vouches for, e.g. between two files
        of a load); otherwise return at once. Only the main thread can stop the process this way."""
        if (self._active and self.received is not None and not self._stopping
                and threading.current_thread() is threading.main_thread()):
            self._stop(self.received)

    # -- signals -------------------------------------------------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # A forked child inherited the handler: it has no business closing its parent's sinks.
            previous = self._previous.get(signum)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        if not self._active:
            return
        redelivered, self._redelivered = self._redelivered, False
        if self.received is not None and not redelivered:
            self._force(signum)
            return
        if self._stopping:
            return
        self.received = signum
        if self._holds:
            return  # the end of the last hold() stops the process
        self._stop_or_defer(frame)

    def _stop_or_defer(self, frame: FrameType | None) -> None:
        """Stop now if the main thread (at ``frame``) is out of cio_sync code, else as soon as it is."""
        assert self.received is not None
        if not _inside_sink(frame):
            self._stop(self.received)
        previous = sys.getprofile()
        if previous is not None and previous != self._profile:
            self._watch()  # someone else's profiler: do not take its place
            return
        self._boundary, self._left = _boundary(frame), False
        sys.setprofile(self._profile)

    def _profile(self, frame: FrameType, event: str, arg: object) -> None:
        """The main thread's profile hook while a stop waits: stop at the first event after the sink call
        returned (in its caller: a call, a return; before the caller does anything else)."""
        if not self._left:
            if event == "return" and frame is self._boundary:
                self._left = True
            return
        if self._stopping or not self._active or self.received is None or self._holds:
            sys.setprofile(None)
            return
        if _inside_sink(frame):  # straight into the next sink call: wait for that one
            self._boundary, self._left = _boundary(frame), False
            return
        sys.setprofile(None)
        self._stop(self.received)

    def _deliver(self) -> None:
        """Send the waiting signal to the main thread again (its handler decides afresh)."""
        main = threading.main_thread().ident
        if main is None or self.received is None:
            return
        self._redelivered = True
        with contextlib.suppress(OSError, ValueError):  # the main thread is gone
            signal.pthread_kill(main, self.received)

    def _force(self, signum: int) -> None:
        """A second signal while the first waits or while the sinks are being closed: the caller insists, so the
        signal does what it would do without this helper (SIGTERM kills, SIGINT raises KeyboardInterrupt)."""
        log.warning("%s again: stopping at once, without waiting to publish", signal.Signals(signum).name)
        self._stopping = True
        self._restore()
        signal.raise_signal(signum)

    def _watch(self) -> None:
        """Deliver the held signal again once the main thread is out of cio_sync code and no hold is active."""
        if self._watcher is not None and self._watcher.is_alive():
            return
        self._watcher = threading.Thread(target=self._redeliver, name="cio_sync-signals", daemon=True)
        try:
            self._watcher.start()
        except RuntimeError:  # interpreter shutdown: no new threads; the exit is under way anyway
            self._watcher = None

    def _redeliver(self) -> None:
        main = threading.main_thread().ident
        while self._active and not self._stopping and self.received is not None:
            time.sleep(_POLL)
            if not self._holds and not _inside_sink(sys._current_frames().get(main or 0)):
                self._deliver()
                time.sleep(_POLL)  # let the handler run before looking again

    def _stop(self, signum: int) -> NoReturn:
        self._stopping = True
        name = signal.Signals(signum).name
        targets: list[_Closable] = list(self.sinks) if self.sinks else _open_publishers()
        log.info("%s: publishing what %d sink(s) hold, then exiting", name, len(targets))
        for target in targets:
            try:
                target.close()
            except Exception as exc:
                label = getattr(target, "label", None) or repr(target)
                log.error("%s: could not publish what %s holds before exiting: %s", name, label, exc)
        raise SystemExit(self.exit_code if self.exit_code is not None else 128 + signum)


def _open_publishers() -> list[_Closable]:
    """Every sink's publisher still open in this process (another thread may open or close one meanwhile)."""
    for _ in range(10):
        try:
            return [p for p in list(_OPEN) if not p.closed]
        except RuntimeError:  # the set changed while it was copied
            continue
    return []
