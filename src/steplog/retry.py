"""Error classification and the retry policy the pipeline applies to every sink call.

What an error means decides whether it is retried (the table is in ``docs/lifecycle.md``):

* **permanent at once**: :class:`~steplog.errors.PermanentError` (HTTP 4xx but 408/429, a bad
  key, an unknown URI scheme), ``OSError`` whose errno says the destination cannot work as it is
  (permission denied, read-only file system, no such file, not a directory, name too long...),
  a directory copy that met missing, dangling or unreadable entries (``shutil.Error``), a TLS
  setup the two sides cannot agree on or a URL requests/urllib3 call invalid
  (:func:`setup_refused`), and any other exception (a bug or a refusal does not heal by
  waiting);
* **retryable within the deadline**: :class:`~steplog.errors.RetryableError` (HTTP 408/429/5xx),
  connection refused/reset/aborted, timeouts, any other TLS error (a connection that ended or
  broke), a full disk or quota, an unreachable network, I/O errors, ``OSError`` without an
  errno, and the connection errors of requests/urllib3.
"""

from __future__ import annotations

import errno
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from steplog.errors import PermanentError, RetryableError

__all__ = ["LONGEST_WAIT_S", "PERMANENT_ERRNOS", "RetryPolicy", "call_with_retry", "check_seconds",
           "is_retryable", "setup_refused"]

T = TypeVar("T")

_SLEEP_SLICE_S = 0.05

PERMANENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
    errno.EEXIST, errno.ENAMETOOLONG, errno.EINVAL, errno.ELOOP, errno.EXDEV, errno.EFBIG,
    errno.EBADF, errno.ENOTEMPTY, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODEV, errno.ENXIO,
})  # fmt: skip
"""``OSError`` errnos that mean the destination cannot work as it is: retrying cannot help."""


_TLS_HANDSHAKE = frozenset({
    "WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
    "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE", "NO_SHARED_CIPHER", "NO_CIPHERS_AVAILABLE",
})  # fmt: skip
"""OpenSSL's reasons for a TLS setup the two sides cannot agree on when met in the handshake
(plain HTTP at the other end, a protocol or cipher neither takes); met later, on a connection
already set up, the same reason means a damaged stream."""
_TLS_REFUSED = frozenset({
    "CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_PROTOCOL_VERSION", "TLSV1_ALERT_UNKNOWN_CA",
    "TLSV1_ALERT_ACCESS_DENIED", "TLSV1_UNRECOGNIZED_NAME", "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    "SSLV3_ALERT_HANDSHAKE_FAILURE", "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
})  # fmt: skip
"""OpenSSL's reasons (a failed check, or the other side's alert) for a certificate, protocol
or cipher that one side refuses: every new connection fails the same way."""
_TLS_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
_BAD_REQUEST = frozenset({"InvalidURL", "InvalidSchema", "MissingSchema", "InvalidHeader",
                          "InvalidProxyURL", "LocationParseError", "LocationValueError",
                          "URLSchemeUnknown"})
"""requests/urllib3 errors of a URL or header that no retry makes valid."""


def setup_refused(exc: BaseException) -> bool:
    """``exc`` (or an error it wraps: requests wraps urllib3's, which wraps ``ssl``'s) says
    the connection cannot work as set up: a TLS certificate, protocol or cipher the other side
    refuses, or a URL or header requests/urllib3 call invalid. Retrying cannot help."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen or len(seen) > 20:
            continue
        seen.add(id(e))
        names = {cls.__name__ for cls in type(e).__mro__}
        if names & _BAD_REQUEST or "SSLCertVerificationError" in names:
            return True
        if "SSLError" in names:  # its errno is OpenSSL's, not the OS's: read its reason
            found = _TLS_REASON.search(str(e))
            reason = getattr(e, "reason", None) or (found.group(1) if found else None)
            if isinstance(reason, str) and (
                    reason in _TLS_REFUSED or (reason in _TLS_HANDSHAKE and _in_handshake(e))):
                return True
        todo += [e.__cause__, e.__context__, *e.args, getattr(e, "reason", None)]
    return False


def _in_handshake(exc: BaseException) -> bool:
    """``exc`` was raised while a TLS connection was being set up (``do_handshake`` is among
    the frames it passed through), not on one already set up."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "do_handshake":
            return True
        tb = tb.tb_next
    return False


def is_retryable(exc: BaseException) -> bool:
    """True when trying the same call again may succeed (see the module docstring)."""
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, RetryableError):
        return True
    if setup_refused(exc):
        return False
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "SSLError" in names:  # a TLS connection that ended or broke (not set up wrongly)
        return True
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    if isinstance(exc, shutil.Error):
        return False  # a tree copy that met missing, dangling or unreadable entries
    if isinstance(exc, OSError):
        return exc.errno not in PERMANENT_ERRNOS
    # requests/urllib3 wrap socket errors in their own ConnectionError/Timeout classes, which
    # do not all derive from OSError; recognise them by name to avoid importing either.
    return bool(names & {"ConnectionError", "Timeout", "ProtocolError", "ChunkedEncodingError"})


LONGEST_WAIT_S = min(1e9, threading.TIMEOUT_MAX)
"""The longest wait a deadline may ask for (about 31 years, where the platform's lock waits
allow it)."""


def check_seconds(value: object, what: str, *, allow_zero: bool = True) -> float:
    """Return ``value`` as seconds, or raise: ``TypeError`` for a non-number, ``ValueError`` for
    NaN, an infinity, a negative number (and zero unless ``allow_zero``) or more than
    :data:`LONGEST_WAIT_S`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not (seconds >= 0 if allow_zero else seconds > 0) or not seconds <= LONGEST_WAIT_S:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{what} must be a finite number of seconds {bound} and at most "
                         f"{LONGEST_WAIT_S:g}, got {value!r}")
    return seconds


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
        check_seconds(self.initial_s, "initial_s", allow_zero=False)
        check_seconds(self.max_s, "max_s", allow_zero=False)
        check_seconds(self.jitter_s, "jitter_s")
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s must be >= initial_s in {self!r}")
        if self.window_s is not None:
            check_seconds(self.window_s, "window_s")


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
    long sleep within 50 ms, and before every attempt but the first. ``policy.window_s`` counts
    from the start of the first attempt. The last exception is re-raised when retrying stops.
    The first attempt is a plain call: the retry machinery is built only after it failed (a
    worker thread calls this once per batch, on the training process's GIL).
    """
    started = time.monotonic()
    try:
        return fn()
    except BaseException as exc:
        if not is_retryable(exc):
            raise
        first = exc
    return _retry_after(first, fn, policy, deadline, on_retry, started)


def _retry_after(
    first: BaseException,
    fn: Callable[[], T],
    policy: RetryPolicy,
    deadline: Callable[[], float | None],
    on_retry: Callable[[BaseException], None],
    started: float,
) -> T:
    """Go on after the first attempt failed with ``first`` (retryable), as if tenacity had
    made that attempt: it is reported, backed off from and counted toward the window."""
    last: list[BaseException] = [first]
    replayed = [first]
    if policy.window_s is not None:  # the window ends retrying as the deadline does
        window_end = started + policy.window_s
        close_deadline = deadline

        def deadline() -> float | None:
            d = close_deadline()
            return window_end if d is None else min(d, window_end)

    def attempt() -> T:
        if replayed:
            raise replayed.pop()
        d = deadline()
        if d is not None and time.monotonic() >= d:
            raise last[-1]  # the backoff ended at the deadline: no attempt starts after it
        try:
            return fn()
        except BaseException as exc:
            last[:] = [exc]
            raise

    def sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            d = deadline()
            if now >= end or (d is not None and now >= d):
                return
            time.sleep(min(_SLEEP_SLICE_S, end - now))

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_retryable),
        wait=tenacity.wait_exponential(multiplier=policy.initial_s, max=policy.max_s)
        + tenacity.wait_random(0, policy.jitter_s),
        stop=_StopAtDeadline(deadline),
        sleep=sleep,
        before_sleep=lambda state: _report(state, on_retry),
        reraise=True,
    )
    return retrying(attempt)
