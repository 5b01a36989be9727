"""Process life: close open loggers at exit and on SIGTERM, and make them inert after a fork.

* **atexit**: every logger still open is closed, each within its ``exit_timeout_s``, all of them
  within the largest of those deadlines; a logger dropped without ``close()`` included. The run
  ends ``FAILED`` when the interpreter is exiting because of an uncaught exception, ``KILLED``
  after SIGTERM, else ``FINISHED``.
* **SIGTERM**: when the process had the default SIGTERM action, the first logger installs a
  handler that raises ``SystemExit(143)`` in the main thread, so ``finally`` blocks run and the
  atexit close flushes the loggers. A handler installed by the application is left alone.
* **fork**: in a forked child (a DataLoader worker, say) every inherited logger becomes inert:
  its calls still validate their arguments but record nothing, ``flush``/``close`` return at once,
  and no thread is started. The parent alone delivers what was queued before the fork, so
  nothing is sent twice. A child that wants to log creates its own logger.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
import weakref
from types import TracebackType
from typing import Any, Protocol

from steplog.sinks.base import RunStatus

__all__ = ["register"]


class _Closable(Protocol):
    def close(self, timeout: float | None = None, status: RunStatus = "FINISHED") -> Any: ...


class _ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


# Open pipelines are held strongly until closed: a logger dropped without close() must still
# be flushed at exit. Loggers are held weakly, only to make them inert in a forked child.
_open: dict[_Closable, float] = {}
_loggers: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_installed = False
_exit_status: RunStatus = "FINISHED"


def register(logger: _ForkAware, pipeline: _Closable, exit_timeout_s: float) -> None:
    """Close ``pipeline`` at exit within ``exit_timeout_s`` unless it is closed before, and make
    ``logger`` inert in forked children (hooks installed on first use)."""
    global _installed
    with _lock:
        _open[pipeline] = exit_timeout_s
        _loggers.add(logger)
        if _installed:
            return
        _installed = True
    atexit.register(_close_all)
    os.register_at_fork(after_in_child=_after_fork)
    _wrap_excepthook()
    _install_sigterm()


def unregister(pipeline: _Closable) -> None:
    with _lock:
        _open.pop(pipeline, None)


def _close_all() -> None:
    with _lock:
        pending = list(_open.items())
    if not pending:
        return
    deadline = time.monotonic() + max(timeout for _, timeout in pending)
    for pipeline, timeout in pending:
        left = max(0.0, min(timeout, deadline - time.monotonic()))
        try:
            pipeline.close(timeout=left, status=_exit_status)
        except Exception as exc:  # at exit, report and go on to the next logger
            print(f"steplog: closing a logger at exit failed: {exc!r}", file=sys.stderr)


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    _open.clear()  # the parent delivers what it queued; the child closes nothing
    for lg in list(_loggers):
        lg._after_fork_in_child()
    _loggers.clear()


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
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main interpreter, or no signals here
        return


def _on_sigterm(signum: int, frame: Any) -> None:
    global _exit_status
    _exit_status = "KILLED"
    raise SystemExit(128 + signum)
