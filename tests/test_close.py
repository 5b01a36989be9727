"""Guarantee 3 (close) and habit 7: close is bounded, idempotent, and final."""

from __future__ import annotations

import threading
import time

import pytest

from sinks_for_tests import ListSink
from steplog import FileLogger, Logger, LoggerClosedError, Options

FAST = Options(drain_interval_s=0.005)


def test_close_delivers_everything_and_ends_the_run_finished() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=FAST)
    for i in range(1000):
        logger.log_scalar("x", float(i))
    result = logger.close(10)
    assert result and result.delivered == 1000 and result.undelivered == 0
    assert len(sink.records) == 1000
    assert sink.closed_with == "FINISHED"


def test_close_twice_returns_the_same_result() -> None:
    logger = Logger(sinks=[ListSink()], options=FAST)
    logger.log_scalar("x", 1.0)
    first = logger.close(10)
    assert logger.close(10) == first


def test_logging_after_close_raises_a_clear_error(tmp_path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    logger.close(10)
    with pytest.raises(LoggerClosedError, match="closed"):
        logger.log_scalar("x", 1.0)
    with pytest.raises(LoggerClosedError):
        logger.log_metrics({"x": 1.0})
    with pytest.raises(LoggerClosedError):
        logger.log_parameters({"a": 1})


def test_a_closed_logger_without_sinks_also_refuses_logging() -> None:
    logger = Logger()
    assert logger.close()
    with pytest.raises(LoggerClosedError):
        logger.log_scalar("x", 1.0)


def test_close_with_a_hung_backend_returns_within_its_timeout_and_counts_the_loss() -> None:
    gate = threading.Event()
    sink = ListSink(release=gate)
    logger = Logger(sinks=[sink], options=FAST)
    for i in range(5):
        logger.log_scalar("x", float(i))
    start = time.monotonic()
    result = logger.close(0.5)
    elapsed = time.monotonic() - start
    gate.set()
    assert elapsed < 1.5
    assert not result
    assert result.timed_out
    assert result.undelivered == 5


def test_context_manager_closes_and_marks_a_failed_run() -> None:
    sink = ListSink()
    with pytest.raises(RuntimeError), Logger(sinks=[sink], options=FAST) as logger:
        logger.log_scalar("x", 1.0)
        raise RuntimeError("training crashed")
    assert sink.closed_with == "FAILED"
    assert [r.name for r in sink.records] == ["x"]


def test_close_status_is_passed_to_the_sink() -> None:
    sink = ListSink()
    Logger(sinks=[sink], options=FAST).close(10, status="KILLED")
    assert sink.closed_with == "KILLED"


def test_close_stops_the_worker_threads() -> None:
    before = {t.name for t in threading.enumerate()}
    logger = Logger(sinks=[ListSink()], options=FAST)
    logger.log_scalar("x", 1.0)
    logger.close(10)
    time.sleep(0.05)
    leftover = {t.name for t in threading.enumerate() if t.name.startswith("steplog")} - before
    assert leftover == set()


def test_close_does_not_wait_a_drain_interval_for_the_last_records() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=3600, timeout_s=30))
    logger.log_scalar("x", 1.0, 0)
    start = time.monotonic()
    result = logger.close()
    assert result and result.delivered == 1
    assert time.monotonic() - start < 2.0
