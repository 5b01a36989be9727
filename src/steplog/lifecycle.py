"""The one owner of a logger's life: its state, its close lock, its deadlines, and the process
hooks (exit, SIGTERM, fork) that end it.

States (diagram and guarantees in ``docs/lifecycle.md``)::

    OPEN --close()/exit--> CLOSING --delivered, runs ended, or deadline--> CLOSED
      \\--fork (in the child)--> INERT

* ``OPEN``: ``log_*`` calls are accepted; ``flush`` is a barrier.
* ``CLOSING``: a ``close`` runs; every ``log_*`` call raises ``LoggerClosedError``; ``flush``
  waits for the close, within its own deadline.
* ``CLOSED``: the close result is fixed; ``close`` returns it again; logging raises.
* ``INERT``: a forked child's copy: calls validate their arguments and record nothing, the
  parent alone delivers what was queued before the fork. (The logger of a rank that does not
  log under the rank policy is inert from the start, without a lifecycle: see
  :mod:`steplog.ranks`.)

Process hooks, installed when the first logger with a sink is built:

* **atexit**: every logger still open is closed, each within its ``exit_timeout_s``, all of them
  within the largest of those deadlines; a logger dropped without ``close()`` included. The run
  ends ``FAILED`` when the interpreter exits because of an uncaught exception, ``KILLED`` after
  SIGTERM or Ctrl-C, else ``FINISHED``. Records still undelivered are reported in one line on
  stderr per logger.
* **SIGTERM**: when the process had the default SIGTERM action, a handler raises
  ``SystemExit(143)`` in the main thread, so ``finally`` blocks run and the exit close flushes
  the loggers. While the main thread closes a logger, a SIGTERM does not interrupt it: the
  close finishes within its deadline, then ``SystemExit(143)`` is raised. During the exit close
  a SIGTERM is ignored: the process keeps the exit status it was leaving with.
  A handler installed by the application is left alone.
* **fork**: in a forked child every inherited open logger becomes ``INERT``; no thread starts,
  and SIGTERM gets its default action back (until the child creates a logger of its own).
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Protocol

from steplog.errors import LoggerClosedError
from steplog.notice import Notice
from steplog.pipeline import Options, Pipeline
from steplog.results import CloseResult, FlushResult, Stats
from steplog.retry import check_seconds
from steplog.sinks.base import RunStatus, Sink

__all__ = ["Lifecycle", "State", "terminated", "unclean_report"]

_FLUSH_POLL_S = 0.1


class State(enum.Enum):
    """Where a logger is in its life."""

    OPEN = "open"
    """``log_*`` calls are validated, captured and queued."""
    CLOSING = "closing"
    """A close runs: ``log_*`` calls raise ``LoggerClosedError``."""
    CLOSED = "closed"
    """The close result is fixed; ``close`` returns it again and ``log_*`` calls raise."""
    INERT = "inert"
    """A forked child's copy: calls are validated and nothing is recorded."""


class Helper(Protocol):
    """What feeds the logger or holds memory for it (the system-metrics sampler, the
    checkpoint buffers kept for reuse): stopped first at close."""

    def stop(self, timeout_s: float) -> None: ...


class Lifecycle:
    """Owns one logger's state, close lock and deadline, and its pipeline (``None`` without
    sinks). ``gate`` (a weak method of the logger) is called when the logger stops accepting
    records (``gate(False)``), so the logger's hot path can send every later call through
    :meth:`admit`, when an alarm waits for the training loop (``gate(False)``, then
    ``gate(True)`` once it was raised), and while the drain thread rests (see :meth:`rest`)."""

    def __init__(
        self,
        sinks: Sequence[Sink],
        options: Options,
        gate: weakref.WeakMethod[Callable[[bool], None]] | None = None,
    ) -> None:
        self.options = options
        self.state = State.OPEN
        self._gate = gate
        self._deadline: float | None = None
        self._lock = threading.Lock()
        """The close lock: one close runs at a time; others wait for it within their deadline."""
        self._closer: int | None = None
        self.closed = Notice()
        """Set once the close result is fixed (``CLOSED``)."""
        self._result: CloseResult | None = None
        self.helpers: list[Helper] = []
        self._alarm: Exception | None = None
        self._resting = False
        """Whether the gate is shut because the drain thread sleeps until a record comes."""
        self._connected = False
        """Whether the logger is built (:meth:`connect_gate`): until then the gate stays shut
        and nothing calls it."""
        self._gate_lock = threading.RLock()
        """Shutting or reopening the hot path's gate and what decides it (the state, a waiting
        alarm, the drain thread's rest) change together."""
        self.pipeline = Pipeline(sinks, options, self) if sinks else None
        if self.pipeline is not None:
            _register(self)

    # -- what the pipeline and the logger ask ----------------------------------------------
    @property
    def accepting(self) -> bool:
        """True while records are accepted (``OPEN``)."""
        return self.state is State.OPEN

    def deadline(self) -> float | None:
        """The close deadline (``time.monotonic()``), ``None`` until a close starts."""
        return self._deadline

    def admit(self) -> Pipeline | None:
        """The one check of every ``log_*`` path: the pipeline to queue the record on, or
        ``None`` when it is to be discarded (no sinks, or a forked child's copy); raises
        :class:`LoggerClosedError` once a close started."""
        state = self.state
        if state is State.OPEN:
            return self.pipeline
        if state is State.INERT:
            return None
        raise LoggerClosedError(
            f"this logger is {state.value}; records logged now would not be delivered. "
            "Create a new logger to log more"
        )

    def alarm(self, error: Exception) -> None:
        """Raise ``error`` once into the training loop, from its next ``log_*`` call (the first
        alarm wins; called from the worker). The hot path's gate shuts until then."""
        with self._gate_lock:
            if self._alarm is None and self.state is State.OPEN:
                self._alarm = error
                self._set_gate(False)

    def raise_alarm(self) -> None:
        """Raise the waiting alarm, if any (once), and reopen the hot path while the logger
        is open."""
        if self._alarm is None:
            return
        with self._gate_lock:
            error, self._alarm = self._alarm, None
            if error is None:
                return
            self._open_gate_if_clear()
        raise error

    def connect_gate(self) -> None:
        """Called once the logger is built: open its gate now if the logger is open, no alarm
        waits and the drain thread does not rest (the worker may have run meanwhile)."""
        with self._gate_lock:
            self._connected = True
            self._open_gate_if_clear()

    def rest(self) -> bool:
        """See :meth:`steplog.pipeline.options.Owner.rest`."""
        with self._gate_lock:
            if (not self._connected or self.state is not State.OPEN or self._alarm is not None
                    or self._resting):
                return False
            self._resting = True
            self._set_gate(False)
            return True

    def end_rest(self) -> None:
        """See :meth:`steplog.pipeline.options.Owner.end_rest`."""
        if not self._resting:  # the common case, without the lock
            return
        with self._gate_lock:
            if not self._resting:
                return
            self._resting = False
            self._open_gate_if_clear()
        if self.pipeline is not None:
            self.pipeline.wake()

    def _open_gate_if_clear(self) -> None:
        """Open the hot path's gate when nothing holds it shut: the logger is open, no alarm
        waits, the drain thread does not rest (called under ``_gate_lock``)."""
        if self.state is State.OPEN and self._alarm is None and not self._resting:
            self._set_gate(True)

    def _set_gate(self, open_: bool) -> None:
        if not self._connected:  # the logger is still being built: connect_gate decides
            return
        gate = self._gate() if self._gate is not None else None
        if gate is not None:  # held weakly: this lifecycle outlives a dropped logger
            gate(open_)

    def seconds(self, timeout: float | None) -> float:
        """``timeout`` checked (finite, >= 0), or the default ``Options.timeout_s``."""
        return self.options.timeout_s if timeout is None else check_seconds(timeout, "timeout")

    # -- flush -----------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> FlushResult:
        """See :meth:`steplog.Logger.flush`."""
        seconds = self.seconds(timeout)
        start = time.monotonic()
        end = start + seconds
        early = self.flush_at_once(start)
        if early is not None:
            return early
        p = self.pipeline
        assert p is not None
        if self.state is State.OPEN:
            barrier = p.flush_barrier()
            while not barrier.event.wait(min(_FLUSH_POLL_S, max(0.0, end - time.monotonic()))):
                if time.monotonic() >= end or self.closed.is_set():
                    break
            if barrier.event.is_set():
                if time.monotonic() < end:  # the cursors (a disk flush) only before the deadline
                    p.journal_checkpoint()
                return self.flush_result(start, ok=barrier.lost == 0, pending=0)
        # A close started: it delivers everything logged before this flush, or says it did not.
        return self.flush_after_close(start, self.closed.wait(max(0.0, end - time.monotonic())))

    def flush_at_once(self, start: float) -> FlushResult | None:
        """The result of a flush that has nothing to wait for (no pipeline, a forked child's
        copy, a signal handler on the closing thread); ``None`` when it must wait."""
        p = self.pipeline
        if p is None or self.state is State.INERT:
            return FlushResult(ok=True, pending=0, elapsed_s=0.0)
        if self._closer == threading.get_ident():
            # From a signal handler on the thread that is closing: it cannot wait for itself.
            return self.flush_result(start, ok=False, pending=p.unacknowledged())
        return None

    def flush_after_close(self, start: float, closed: bool) -> FlushResult:
        """The result of a flush that a close overtook: the close's outcome once it ended
        (``closed``), else not delivered."""
        p = self.pipeline
        assert p is not None
        if closed and self._result is not None:
            return self.flush_result(start, ok=self._result.ok, pending=p.unacknowledged())
        return self.flush_result(start, ok=False, pending=p.unacknowledged())

    def flush_result(self, start: float, ok: bool, pending: int) -> FlushResult:
        """A flush's result from the counters now (truthy only with ``ok`` and nothing pending)."""
        p = self.pipeline
        assert p is not None
        s = p.stats()
        return FlushResult(ok=ok and pending == 0, pending=pending,
                           elapsed_s=time.monotonic() - start, rejected=s.rejected,
                           failed=s.failed, dropped=s.dropped, losses=p.losses())

    # -- close -----------------------------------------------------------------------------
    def close(self, timeout: float | None = None, status: RunStatus = "FINISHED") -> CloseResult:
        """See :meth:`steplog.Logger.close`."""
        seconds = self.seconds(timeout)
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        start = time.monotonic()
        if self.state is State.INERT:
            return self.close_result(start, timed_out=False)
        if self._closer == threading.get_ident():
            # Re-entered on the closing thread (from a signal handler): it cannot wait for itself.
            return self.close_result(start, timed_out=True)
        shield = _Shield()  # before the lock: a SIGTERM now cannot leave the lock held
        locked = False
        try:
            locked = self._lock.acquire(timeout=seconds)
            if not locked:
                return self.close_result(start, timed_out=True)  # another close still runs
            if self._result is not None:
                return self._result
            self._closer = threading.get_ident()
            self._deadline = start + seconds
            self._stop_accepting(State.CLOSING)
            for helper in self.helpers:
                helper.stop(max(0.0, self._deadline - time.monotonic()))
            ended = self.pipeline.shut_down(status) if self.pipeline is not None else True
            self._result = self.close_result(start, timed_out=not ended)
            self.state = State.CLOSED
            self.closed.set()
            _unregister(self)
            return self._result
        finally:
            if locked:
                self._closer = None
                self._lock.release()
            shield.release()

    @property
    def result(self) -> CloseResult | None:
        """The result of the close, once one finished (``None`` before)."""
        return self._result

    def _stop_accepting(self, state: State) -> None:
        # The hot path's gate first: a call that finds the queue still open, then the state
        # changed, takes its record back (Logger._late) or the closer delivers it.
        with self._gate_lock:
            self._set_gate(False)
            self.state = state

    def close_result(self, start: float, timed_out: bool) -> CloseResult:
        """A close's result from the counters now (``timed_out``: the deadline passed first)."""
        p = self.pipeline
        elapsed = time.monotonic() - start
        if p is None:
            return CloseResult(ok=True, delivered=0, undelivered=0, dropped=0, rejected=0,
                               elapsed_s=elapsed, timed_out=False)
        s = p.stats()
        undelivered = s.undelivered
        losses = p.losses()
        if timed_out:
            losses = (*losses, *p.pending_losses())
        nothing_lost = undelivered == s.failed == s.rejected == s.dropped == 0
        run_errors = p.run_errors()
        return CloseResult(
            ok=nothing_lost and not timed_out and not run_errors,
            # A run that could not be ended is ended by the sync (its journal is kept).
            sync=p.sync_command() if not nothing_lost or timed_out or run_errors else None,
            delivered=s.delivered,
            undelivered=undelivered,
            dropped=s.dropped,
            rejected=s.rejected,
            failed=s.failed,
            elapsed_s=elapsed,
            timed_out=timed_out,
            losses=losses,
            sinks=s.sinks,
        )

    def stats(self) -> Stats:
        """See :meth:`steplog.Logger.stats`."""
        if self.pipeline is None:
            return Stats(enqueued=0, delivered=0, dropped=0, rejected=0, failed=0, retried=0,
                         queue_depth=0, lag_s=0.0, sinks={})
        return self.pipeline.stats()

    def describe(self) -> str:
        """Where the records go, for messages."""
        if self.pipeline is None:
            return "no sink"
        return ", ".join(r.sink.describe() for r in self.pipeline.runners)

    def after_fork_in_child(self) -> None:
        """The parent's threads do not exist here and its locks may be held: record nothing."""
        self.pipeline = None
        self._gate_lock = threading.RLock()
        self._alarm = None
        self._stop_accepting(State.INERT)


# -- process hooks ---------------------------------------------------------------------------

# Open lifecycles are held strongly until closed: a logger dropped without close() must still
# be flushed at exit.
_open: dict[Lifecycle, None] = {}
_lock = threading.Lock()
_installed = False
_exit_status: RunStatus = "FINISHED"
_exiting = False
_shielded = 0
_sigterm_pending = False
_sigterm_seen = False


class _Shield:
    """While the main thread closes a logger, SIGTERM is remembered instead of raised; the
    SystemExit it asks for is raised once the outermost close returns."""

    def __init__(self) -> None:
        global _shielded
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            _shielded += 1

    def release(self) -> None:
        global _shielded, _sigterm_pending
        if not self.active:
            return
        _shielded -= 1
        if _shielded == 0 and _sigterm_pending and not _exiting:
            _sigterm_pending = False
            raise SystemExit(128 + signal.SIGTERM)


def _register(life: Lifecycle) -> None:
    global _installed
    with _lock:
        _open[life] = None
        first, _installed = not _installed, True
    if first:
        import atexit

        atexit.register(_close_all)
        os.register_at_fork(after_in_child=_after_fork)
        _wrap_excepthook()
    _install_sigterm()  # also again in a forked child, which went back to the default


_sigterm_installed = False
"""Whether this process's SIGTERM handler is steplog's."""
_sigterm_pid = 0
"""The process that installed it."""


def _unregister(life: Lifecycle) -> None:
    with _lock:
        _open.pop(life, None)


def _close_all() -> None:
    """The exit close: every open logger, within the largest exit deadline (a SIGTERM that
    comes meanwhile is ignored). Afterwards SIGTERM has its default action again, so a later
    exit hook that hangs can still be stopped."""
    global _exiting
    _exiting = True
    try:
        _close_open_loggers()
    finally:
        _default_sigterm()


def _close_open_loggers() -> None:
    with _lock:
        pending = list(_open)
    if not pending:
        return
    deadline = time.monotonic() + max(life.options.exit_timeout_s for life in pending)
    for i, life in enumerate(pending):
        left = max(0.0, min(life.options.exit_timeout_s, deadline - time.monotonic()))
        try:
            result = life.close(timeout=left, status=_exit_status)
        except KeyboardInterrupt:
            for other in pending[i:]:  # none of them is closed now: each says what it keeps
                if other.state is not State.CLOSED:
                    print(unclean_report(other, None, "at exit", "interrupted"),
                          file=sys.stderr)
            return
        except Exception as exc:  # at exit, report and go on to the next logger
            print(f"steplog: closing a logger at exit failed: {exc!r}", file=sys.stderr)
            continue
        if not result:
            print(unclean_report(life, result, "at exit",
                                 "timed out" if result.timed_out else ""), file=sys.stderr)
        if result.timed_out and life.pipeline is not None:
            # The lanes die with the process: what they had staged is kept or lost by now.
            life.pipeline.remove_staging()


def unclean_report(life: Lifecycle, result: CloseResult | None, when: str, how: str) -> str:
    """One line for a close that did not end cleanly: how many records did not arrive, where
    they were going, why, and the ``steplog sync`` command that delivers them later.
    ``when``: "at exit", say; ``how``: "timed out", "interrupted" or empty."""
    stats = life.stats()
    undelivered = result.undelivered if result is not None else stats.undelivered
    reasons = life.pipeline.reasons() if life.pipeline is not None else []
    how = f" ({how})" if how else ""
    reason = f"; reason: {reasons[0]}" if reasons else ""
    sync = result.sync if result is not None else None
    if sync is None and life.pipeline is not None:
        sync = life.pipeline.sync_command()
    pipeline = life.pipeline
    stopped = pipeline.journal_error if pipeline is not None and pipeline.journal_stopped else None
    if sync is not None and undelivered and stopped is not None:
        reason += (f"; {stopped}, so it keeps only those logged before: deliver those later "
                   f"with: {sync}")
    elif sync is not None and undelivered:
        reason += f"; the journal keeps them: deliver them later with: {sync}"
    elif sync is not None:
        reason += f"; end the run later with: {sync}"
    if undelivered:
        what = (f"{undelivered} of {stats.enqueued + stats.dropped} records were not delivered "
                f"to {life.describe()}")
    else:
        what = f"every record arrived, but a run did not end cleanly ({life.describe()})"
    return f"steplog: {when}{how}, {what}{reason}"


def _after_fork() -> None:
    global _lock, _sigterm_installed, _shielded, _sigterm_pending, _exiting, _sigterm_seen
    global _exit_status
    # The parent's close, exit close or SIGTERM in progress is not the child's.
    _shielded, _sigterm_pending, _exiting, _sigterm_seen = 0, False, False, False
    _exit_status = "FINISHED"
    if _sigterm_installed:
        # First: the child has no logger to flush, so SIGTERM ends it at once, as it would
        # without steplog (a process pool terminates its workers so). A logger the child
        # creates installs the handler again.
        _sigterm_installed = False
        _default_sigterm()
    _lock = threading.Lock()
    inherited = list(_open)
    _open.clear()  # the parent delivers what it queued; the child closes nothing
    for life in inherited:
        life.after_fork_in_child()


def _default_sigterm() -> None:
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except (ValueError, OSError):  # forked from a thread that is not the main one
        pass


def _wrap_excepthook() -> None:
    previous = sys.excepthook

    def hook(
        exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        global _exit_status
        if not issubclass(exc_type, (SystemExit, KeyboardInterrupt)):
            _exit_status = "FAILED"
        elif issubclass(exc_type, KeyboardInterrupt):
            _exit_status = "KILLED"
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def _install_sigterm() -> None:
    global _sigterm_installed, _sigterm_pid
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main interpreter, or no signals here
        return
    _sigterm_installed = True
    _sigterm_pid = os.getpid()


def terminated() -> bool:
    """True once steplog's SIGTERM handler ran in this process."""
    return _sigterm_seen


def _on_sigterm(signum: int, frame: Any) -> None:
    global _exit_status, _sigterm_pending, _sigterm_seen
    if os.getpid() != _sigterm_pid:
        # A forked child that got SIGTERM before its fork hook ran (or inside another hook,
        # where an exception would be ignored and the signal lost): the default action.
        _default_sigterm()
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _exit_status = "KILLED"
    _sigterm_seen = True
    if _exiting:
        return  # the exit close is running: let it finish within its deadline
    if _shielded:
        _sigterm_pending = True  # raised when the close in progress returns
        return
    raise SystemExit(128 + signum)
