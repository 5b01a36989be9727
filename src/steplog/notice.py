"""A one-shot event that also tells subscribers when it is set, on the thread that sets it.

Threads wait on it as on a ``threading.Event``; an event loop subscribes a callback that hands
the news to the loop (see :mod:`steplog.aio`), so no thread waits on its behalf.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

__all__ = ["Notice"]


class Notice(threading.Event):
    """A ``threading.Event`` that, when set, calls each subscribed callback once.

    Callbacks run on the setting thread (a worker): they must be quick and must not block.
    An exception in one is ignored (its waiter is gone) and the others still run.
    """

    def __init__(self) -> None:
        super().__init__()
        self._subscribers: list[Callable[[], object]] = []
        self._subscribers_lock = threading.Lock()

    def set(self) -> None:
        with self._subscribers_lock:
            super().set()
            subscribers, self._subscribers = self._subscribers, []
        for callback in subscribers:
            with contextlib.suppress(Exception):  # a waiter that went away: the others hear
                callback()

    def subscribe(self, callback: Callable[[], object]) -> bool:
        """Call ``callback`` once when this is set; False (and no call) when it already is."""
        with self._subscribers_lock:
            if self.is_set():
                return False
            self._subscribers.append(callback)
            return True

    def unsubscribe(self, callback: Callable[[], object]) -> None:
        """Forget ``callback`` if it was not called yet."""
        with self._subscribers_lock:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

    @property
    def subscribers(self) -> int:
        """Callbacks still waiting to be called."""
        return len(self._subscribers)
