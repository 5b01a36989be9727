"""Bounded polling for tests: a condition that becomes true soon, or a clear False."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0,
               interval_s: float = 0.005) -> bool:
    """Whether ``condition()`` became true within ``timeout_s``, asked every ``interval_s``
    (and once more at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
    return True
