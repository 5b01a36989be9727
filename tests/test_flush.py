"""Guarantee 3: flush is a barrier with an honoured timeout."""

from __future__ import annotations

import threading
import time

from sinks_for_tests import DownSink, ListSink
from steplog import Logger, Options

FAST = Options(drain_interval_s=0.005)


def test_flush_returns_only_after_a_slow_sink_acknowledged_everything_before_it() -> None:
    sink = ListSink(delay_s=0.2, max_batch=100)
    logger = Logger(sinks=[sink], options=FAST)
    for i in range(250):
        logger.log_scalar("x", float(i), i)
    result = logger.flush()
    assert result
    assert result.pending == 0
    assert len(sink.records) == 250
    assert result.elapsed_s >= 0.2
    logger.close(10)


def test_flush_does_not_wait_for_records_logged_after_it() -> None:
    gate = threading.Event()
    sink = ListSink()
    logger = Logger(sinks=[sink], options=FAST)
    logger.log_scalar("before", 1.0)
    assert logger.flush(10)
    sink.release = gate  # from now on the backend hangs until the gate opens
    logger.log_scalar("after", 2.0)
    start = time.monotonic()
    assert not logger.flush(0.2)
    assert time.monotonic() - start < 1.0
    gate.set()
    assert logger.close(10)


def test_flush_with_a_timeout_returns_falsy_on_time_and_says_what_is_pending() -> None:
    gate = threading.Event()
    sink = ListSink(release=gate)
    logger = Logger(sinks=[sink], options=FAST)
    for i in range(10):
        logger.log_scalar("x", float(i))
    start = time.monotonic()
    result = logger.flush(timeout=0.3)
    elapsed = time.monotonic() - start
    assert not result
    assert result.pending == 10
    assert 0.3 <= elapsed < 0.8
    gate.set()
    assert logger.flush(10)
    assert logger.close(10)


def test_flush_against_an_unreachable_backend_times_out_on_time() -> None:
    logger = Logger(sinks=[DownSink()], options=FAST)
    logger.log_scalar("x", 1.0)
    start = time.monotonic()
    result = logger.flush(0.5)
    assert not result and result.pending == 1
    assert time.monotonic() - start < 1.0
    closed = logger.close(0.5)
    assert not closed and closed.undelivered == 1
    assert time.monotonic() - start < 2.0


def test_flush_waits_for_uploads_too(tmp_path) -> None:
    sink = ListSink(delay_s=0.1)
    logger = Logger(sinks=[sink], options=FAST)
    f = tmp_path / "a.txt"
    f.write_text("payload")
    logger.log_artifact(f)
    assert logger.flush(10)
    assert sink.upload_bytes == [b"payload"]
    logger.close(10)


def test_flush_on_a_logger_without_sinks_is_immediately_true() -> None:
    assert Logger().flush(0)


def test_concurrent_flushes_all_return() -> None:
    sink = ListSink(delay_s=0.01, max_batch=10)
    logger = Logger(sinks=[sink], options=FAST)
    results: list[bool] = []

    def worker(k: int) -> None:
        for i in range(50):
            logger.log_scalar(f"t{k}", float(i))
        results.append(bool(logger.flush(30)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 4
    assert logger.close(10)
