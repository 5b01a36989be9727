"""Retry policy: what is retried, how long, and that a deadline cuts a backoff short."""

from __future__ import annotations

import errno
import itertools
import ssl
import threading
import time

import pytest
import requests

from steplog import PermanentError, RetryableError, RetryPolicy
from steplog.retry import call_with_retry, is_retryable


@pytest.mark.parametrize(
    "exc",
    [RetryableError("x"), ConnectionRefusedError(), ConnectionResetError(), TimeoutError(),
     OSError("network down"), requests.ConnectionError("reset"), requests.Timeout("slow")],
)
def test_transient_errors_are_retryable(exc: BaseException) -> None:
    assert is_retryable(exc)


@pytest.mark.parametrize("exc", [PermanentError("bad key"), ValueError("x"), TypeError("bug"),
                                 KeyError("k")])
def test_rejections_and_bugs_are_permanent(exc: BaseException) -> None:
    assert not is_retryable(exc)


def test_a_retryable_failure_is_retried_until_it_succeeds() -> None:
    attempts = []

    def flaky() -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 4:
            raise RetryableError("503")
        return "ok"

    seen: list[BaseException] = []
    policy = RetryPolicy(initial_s=0.01, max_s=0.04, jitter_s=0.0)
    assert call_with_retry(flaky, policy, lambda: None, seen.append) == "ok"
    assert len(attempts) == 4 and len(seen) == 3
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.009 and gaps[-1] >= 0.035  # exponential, capped at max_s


def test_a_permanent_failure_is_raised_at_once() -> None:
    calls = []

    def refuse() -> None:
        calls.append(1)
        raise PermanentError("INVALID_PARAMETER_VALUE")

    with pytest.raises(PermanentError):
        call_with_retry(refuse, RetryPolicy(), lambda: None, lambda e: None)
    assert calls == [1]


def test_the_retry_window_bounds_how_long_one_call_is_retried() -> None:
    policy = RetryPolicy(initial_s=0.01, max_s=0.02, jitter_s=0.0, window_s=0.2)
    start = time.monotonic()
    with pytest.raises(RetryableError):
        call_with_retry(_always_down, policy, lambda: None, lambda e: None)
    assert 0.2 <= time.monotonic() - start < 0.5


def test_the_retry_window_counts_from_the_start_of_the_first_attempt() -> None:
    attempts = []

    def slow_and_down() -> None:
        attempts.append(1)
        time.sleep(0.3)
        raise RetryableError("503")

    policy = RetryPolicy(initial_s=0.01, max_s=0.01, jitter_s=0.0, window_s=0.5)
    with pytest.raises(RetryableError):
        call_with_retry(slow_and_down, policy, lambda: None, lambda e: None)
    # The second attempt ends past 0.5 s from the first one's start; counted from the first
    # failure (0.3 s), the window would have let a third attempt start.
    assert len(attempts) == 2


def test_a_backoff_longer_than_the_window_ends_with_the_window() -> None:
    attempts: list[float] = []

    def down() -> None:
        attempts.append(time.monotonic())
        raise RetryableError("503")

    policy = RetryPolicy(initial_s=0.1, max_s=30.0, jitter_s=0.0, window_s=0.5)
    start = time.monotonic()
    with pytest.raises(RetryableError):
        call_with_retry(down, policy, lambda: None, lambda e: None)
    assert time.monotonic() - start < 0.65  # not after the 0.4 s backoff that starts at 0.3 s
    assert all(t - start < 0.5 for t in attempts)  # no attempt starts after the window


def test_a_deadline_set_during_a_long_backoff_interrupts_it() -> None:
    deadline: list[float | None] = [None]
    policy = RetryPolicy(initial_s=30.0, max_s=30.0, jitter_s=0.0)
    threading.Timer(0.2, lambda: deadline.__setitem__(0, time.monotonic())).start()
    start = time.monotonic()
    with pytest.raises(RetryableError):
        call_with_retry(_always_down, policy, lambda: deadline[0], lambda e: None)
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("kwargs", [{"initial_s": 0}, {"initial_s": 2, "max_s": 1},
                                    {"jitter_s": -1}, {"window_s": -1}])
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def _always_down() -> None:
    raise RetryableError("connection refused")


@pytest.mark.parametrize(
    "exc",
    [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EROFS, "Read-only"),
     FileNotFoundError(errno.ENOENT, "No such file"), NotADirectoryError(errno.ENOTDIR, "x"),
     IsADirectoryError(errno.EISDIR, "x"), OSError(errno.ENAMETOOLONG, "x")],
)
def test_errors_that_mean_the_destination_cannot_work_are_permanent(exc: OSError) -> None:
    assert not is_retryable(exc)


@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, "No space left"), OSError(errno.EDQUOT, "Quota"),
            OSError(errno.EIO, "I/O error"), OSError(errno.ENETUNREACH, "unreachable")],
)
def test_errors_that_may_heal_are_retryable(exc: OSError) -> None:
    assert is_retryable(exc)


def test_no_attempt_starts_after_the_deadline_even_when_the_backoff_ends_at_it() -> None:
    starts: list[float] = []

    def down() -> None:
        starts.append(time.monotonic())
        raise RetryableError("connection refused")

    deadline = time.monotonic() + 0.15
    policy = RetryPolicy(initial_s=0.1, max_s=0.1, jitter_s=0.0)
    with pytest.raises(RetryableError):
        call_with_retry(down, policy, lambda: deadline, lambda e: None)
    assert starts and all(t < deadline for t in starts)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1])
@pytest.mark.parametrize("field", ["initial_s", "max_s", "jitter_s", "window_s"])
def test_non_finite_or_negative_retry_settings_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**{field: value})


def _requests_error(url: str) -> BaseException:
    try:
        requests.get(url, timeout=1)
    except requests.RequestException as exc:
        return exc
    raise AssertionError(f"{url} was fetched")


@pytest.mark.parametrize("url", ["htp://127.0.0.1/x", "http://", "127.0.0.1/x"],
                         ids=["unknown scheme", "no host", "no scheme"])
def test_a_url_requests_calls_invalid_is_permanent(url: str) -> None:
    assert not is_retryable(_requests_error(url))


def _wrapped_by_requests(cause: BaseException) -> BaseException:
    import urllib3

    reason = urllib3.exceptions.SSLError(cause)
    return requests.exceptions.SSLError(urllib3.exceptions.MaxRetryError(None, "/x", reason))  # type: ignore[arg-type]


@pytest.mark.parametrize("exc", [
    ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
    ssl.SSLError(1, "[SSL: TLSV1_ALERT_PROTOCOL_VERSION] tlsv1 alert protocol version"),
    _wrapped_by_requests(ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")),
], ids=["certificate", "protocol", "certificate through requests"])
def test_a_tls_setup_the_other_side_refuses_is_permanent(exc: BaseException) -> None:
    assert not is_retryable(exc)


@pytest.mark.parametrize("exc", [
    ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF)"),
    ssl.SSLWantReadError(2, "The operation did not complete (read)"),
    ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
    _wrapped_by_requests(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")),
], ids=["closed", "want read", "eof", "eof through requests"])
def test_a_tls_connection_that_ended_or_broke_is_retryable(exc: BaseException) -> None:
    assert is_retryable(exc)
