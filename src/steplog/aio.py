"""``aflush``, ``aclose`` and ``async with`` for asyncio and trio, on anyio.

No thread waits on behalf of a waiting task. The worker thread that completes a flush (the last
lane to acknowledge its barrier) or a close calls the callbacks subscribed to a
:class:`~steplog.notice.Notice`; an awaiting task's callback hands ``anyio.Event.set`` to its
event loop with the loop's own thread-safe, non-blocking entry (asyncio's
``call_soon_threadsafe``, trio's ``TrioToken.run_sync_soon``). ``anyio.from_thread.run_sync``
is not used there: it would make the worker wait until the loop runs the call, and a loop that
is itself blocked (in a synchronous ``flush``, say) would stall delivery.

Cancellation and deadlines:

* ``aflush`` that is cancelled, or whose ``timeout`` passes, unsubscribes at once; its barrier
  stays queued and is passed by the lanes like any other, so the logger is fully usable and
  nothing is left waiting.
* ``aclose`` runs the close on one thread of its own (``steplog-aclose``) and waits for it
  within ``timeout``. When the waiting task is cancelled or its timeout passes, the close goes
  on in the background within its own deadline: the logger stays ``CLOSING`` until it ends,
  then ``CLOSED``; a later ``close()``/``aclose()`` returns that close's result.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from steplog.lifecycle import Lifecycle, State
from steplog.notice import Notice
from steplog.results import CloseResult, FlushResult
from steplog.sinks.base import RunStatus

if TYPE_CHECKING:
    from steplog.loggers import Logger

__all__ = ["aclose", "aflush"]


async def aflush(logger: Logger, timeout: float | None = None) -> FlushResult:
    """See :meth:`steplog.Logger.aflush`."""
    life: Lifecycle = logger._life
    seconds = life.seconds(timeout)
    start = time.monotonic()
    end = start + seconds
    early = life.flush_at_once(start)
    if early is not None:
        return early
    p = life.pipeline
    assert p is not None
    if life.state is State.OPEN:
        barrier = p.flush_barrier()
        await _wait_any((barrier.event, life.closed), end)
        if barrier.event.is_set():
            if p.run_journal is not None:  # the cursors' disk flush stays off the loop
                # Within the deadline: the records arrived; the cursors only spare a later
                # `steplog sync` records that are stored already (it stores them once anyway).
                # A checkpoint left running may overlap a later close: the journal orders them.
                with anyio.move_on_after(max(0.0, end - time.monotonic())):
                    await anyio.to_thread.run_sync(p.journal_checkpoint, abandon_on_cancel=True)
            return life.flush_result(start, ok=barrier.lost == 0, pending=0)
    return life.flush_after_close(start, await _wait_any((life.closed,), end))


async def aclose(logger: Logger, timeout: float | None = None,
                 status: RunStatus = "FINISHED") -> CloseResult:
    """See :meth:`steplog.Logger.aclose`."""
    life: Lifecycle = logger._life
    seconds = life.seconds(timeout)
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    start = time.monotonic()
    end = start + seconds
    while True:
        if life.state is State.INERT:  # in a forked child, a job is the parent's: no thread
            return life.close(seconds, status)
        if life.state is State.CLOSED:  # the close's result is fixed: returned at once
            return life.close(seconds, status)
        job = _jobs.get(life)
        if job is None or job.done.is_set():
            job = _jobs[life] = _CloseJob(life, max(0.0, end - time.monotonic()), status)
        if not await _wait_any((job.done,), end):
            return life.close_result(start, timed_out=True)
        if job.error is not None:
            raise job.error
        assert job.result is not None
        if _closed(life):
            return life.close(0.0, status)
        if time.monotonic() >= end:
            return job.result
        # That job only gave up waiting for another close (its own, shorter deadline, or a
        # close() in another thread): wait on, within this call's deadline.


def _closed(life: Lifecycle) -> bool:
    """Whether the logger is closed now (its state may have changed during a wait)."""
    return life.state is State.CLOSED


class _CloseJob:
    """One logger's close, running on a thread of its own; ``done`` is set when it returned."""

    def __init__(self, life: Lifecycle, seconds: float, status: RunStatus) -> None:
        self.done = Notice()
        self.result: CloseResult | None = None
        self.error: BaseException | None = None
        thread = threading.Thread(target=self._run, args=(life, seconds, status),
                                  name="steplog-aclose", daemon=True)
        thread.start()

    def _run(self, life: Lifecycle, seconds: float, status: RunStatus) -> None:
        try:
            self.result = life.close(seconds, status)
        except BaseException as exc:  # handed to the awaiting task
            self.error = exc
        finally:
            self.done.set()


_jobs: weakref.WeakKeyDictionary[Lifecycle, _CloseJob] = weakref.WeakKeyDictionary()


async def _wait_any(notices: Sequence[Notice], end: float) -> bool:
    """Wait until one of ``notices`` is set (True) or ``time.monotonic()`` reaches ``end``
    (False), without blocking the event loop; cancellation unsubscribes and propagates."""
    if any(n.is_set() for n in notices):
        return True
    event = anyio.Event()
    call_soon = _loop_entry()

    def wake() -> None:  # on the worker thread that set the notice
        with contextlib.suppress(Exception):  # the loop is gone, and with it the waiter
            call_soon(event.set)

    try:
        for n in notices:
            if not n.subscribe(wake):
                return True
        with anyio.move_on_after(max(0.0, end - time.monotonic())):
            await event.wait()
        return any(n.is_set() for n in notices)
    finally:
        for n in notices:
            n.unsubscribe(wake)


def _loop_entry() -> Callable[[Callable[[], Any]], Any]:
    """The running loop's thread-safe, non-blocking way to schedule a call on it."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    return loop.call_soon_threadsafe
