"""Error classification and the retry policy the pipeline applies to every sink call."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from steplog.errors import PermanentError, RetryableError

__all__ = ["RetryPolicy", "call_with_retry", "is_retryable"]

T = TypeVar("T")

_SLEEP_SLICE_S = 0.05


def is_retryable(exc: BaseException) -> bool:
    """True when trying the same call again may succeed.

    Retryable: :class:`RetryableError`, connection problems and timeouts (``OSError`` including
    ``ConnectionError``, ``TimeoutError``, ``socket.timeout``). Everything else, including
    :class:`PermanentError`, is permanent: a bug or a rejection does not heal by waiting.
    """
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, (RetryableError, OSError, TimeoutError, socket.timeout)):
        return True
    # requests/urllib3 wrap socket errors in their own ConnectionError/Timeout classes, which
    # do not all derive from OSError; recognise them by name to avoid importing either.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectionError", "Timeout", "ProtocolError", "ChunkedEncodingError"})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    ``initial_s`` doubles after each failed attempt up to ``max_s``; up to ``jitter_s`` of random
    delay is added. ``window_s`` bounds how long one batch is retried (``None``: until the
    logger's close deadline, so an outage of any length loses nothing while the logger is open).
    """

    initial_s: float = 0.1
    max_s: float = 10.0
    jitter_s: float = 0.5
    window_s: float | None = None

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s or self.jitter_s < 0:
            raise ValueError(f"invalid retry policy {self!r}")
        if self.window_s is not None and self.window_s < 0:
            raise ValueError("window_s must be >= 0 or None")


class _StopAtDeadline(tenacity.stop.stop_base):
    """Stop once the (changing) deadline has passed."""

    def __init__(self, deadline: Callable[[], float | None]) -> None:
        self._deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        d = self._deadline()
        return d is not None and time.monotonic() >= d


def _report(state: tenacity.RetryCallState, on_retry: Callable[[BaseException], None]) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    if exc is not None:
        on_retry(exc)


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    deadline: Callable[[], float | None],
    on_retry: Callable[[BaseException], None],
) -> T:
    """Return ``fn()``, retrying retryable failures per ``policy``.

    ``deadline()`` gives a ``time.monotonic()`` instant after which no new attempt starts (or
    ``None``); it is read again during every backoff, so a close that shortens it interrupts a
    long sleep within 50 ms. The last exception is re-raised when retrying stops.
    """

    def sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            d = deadline()
            if now >= end or (d is not None and now >= d):
                return
            time.sleep(min(_SLEEP_SLICE_S, end - now))

    stop: tenacity.stop.stop_base = _StopAtDeadline(deadline)
    if policy.window_s is not None:
        stop = tenacity.stop_any(stop, tenacity.stop_after_delay(policy.window_s))
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_retryable),
        wait=tenacity.wait_exponential(multiplier=policy.initial_s, max=policy.max_s)
        + tenacity.wait_random(0, policy.jitter_s),
        stop=stop,
        sleep=sleep,
        before_sleep=lambda state: _report(state, on_retry),
        reraise=True,
    )
    return retrying(fn)
