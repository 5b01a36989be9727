"""Guarantee 7: the queue is bounded and the queue-full policy is visible in stats()."""

from __future__ import annotations

import threading
import time

import pytest

from sinks_for_tests import ListSink
from steplog import Logger, Options


def stalled_logger(policy: str, **kw: float) -> tuple[Logger, threading.Event]:
    gate = threading.Event()
    sink = ListSink(release=gate, max_batch=1)
    options = Options(queue_size=5, lane_capacity=1, full_policy=policy,  # type: ignore[arg-type]
                      drain_interval_s=0.005, **kw)
    logger = Logger(sinks=[sink], options=options)
    return logger, gate


def fill(logger: Logger, n: int) -> None:
    for i in range(n):
        logger.log_scalar("x", float(i), i)


def test_drop_policy_drops_and_counts_when_the_queue_is_full() -> None:
    logger, gate = stalled_logger("drop")
    fill(logger, 200)
    stats = logger.stats()
    assert stats.dropped > 0
    assert stats.queue_depth <= 5
    gate.set()
    result = logger.close(10)
    assert result.dropped == stats.dropped
    assert result.delivered + result.dropped == 200
    assert not result  # dropped records are undelivered, and close says so


def test_block_policy_waits_for_room_then_drops_after_its_timeout() -> None:
    logger, gate = stalled_logger("block", block_timeout_s=0.2)
    with pytest.warns(Warning, match="queue full"):
        start = time.monotonic()
        fill(logger, 30)
        elapsed = time.monotonic() - start
    stats = logger.stats()
    assert stats.dropped >= 1
    assert elapsed >= 0.2
    gate.set()
    logger.close(10)


def test_block_policy_loses_nothing_when_the_sink_catches_up() -> None:
    logger, gate = stalled_logger("block", block_timeout_s=10)
    threading.Timer(0.3, gate.set).start()
    start = time.monotonic()
    fill(logger, 50)
    assert time.monotonic() - start >= 0.2  # the producer really waited for room
    result = logger.close(10)
    assert result and result.delivered == 50 and result.dropped == 0


def test_stats_report_depth_and_lag_while_the_sink_is_stalled() -> None:
    logger, gate = stalled_logger("drop")
    fill(logger, 3)
    time.sleep(0.2)
    stats = logger.stats()
    assert stats.enqueued == 3
    assert stats.delivered == 0
    assert stats.lag_s >= 0.1
    gate.set()
    assert logger.close(10)
    assert logger.stats().delivered == 3
    assert logger.stats().lag_s == 0.0


def test_params_refused_by_a_close_while_waiting_for_room_are_counted_exactly() -> None:
    from steplog.errors import LoggerClosedError
    from steplog.records import Param

    sink = ListSink(delay_s=0.3, max_batch=1)
    logger = Logger(sinks=[sink], options=Options(queue_size=2, lane_capacity=1,
                                                  full_policy="block", drain_interval_s=0.01))
    for i in range(4):
        logger.log_scalar("a", 1.0, i)
    closer = threading.Timer(0.5, logger.close, args=(10,))
    closer.start()
    with pytest.raises(LoggerClosedError, match=r"(\d) of the 6 params") as raised:
        logger.log_parameters({f"p{i}": i for i in range(6)})
    closer.join(15)
    refused = int(str(raised.value).split(" of the 6")[0].rsplit(" ", 1)[1])
    delivered = [r.name for r in sink.records if type(r) is Param]
    assert len(delivered) == 6 - refused and refused > 0


def test_a_param_dropped_before_a_close_refuses_the_call_is_counted_once() -> None:
    from steplog.errors import LoggerClosedError

    release = threading.Event()
    sink = ListSink(release=release, max_batch=1)
    logger = Logger(sinks=[sink], options=Options(queue_size=1, lane_capacity=1,
                                                  full_policy="block", block_timeout_s=0.3,
                                                  drain_interval_s=0.01))
    try:
        for i in range(6):
            logger.log_scalar("a", float(i), i)
        closer = threading.Timer(0.45, logger.close, args=(0.3,))
        closer.start()
        with pytest.raises(LoggerClosedError, match=r"1 of the 2 params of this call were not "
                           r"logged, and 1 dropped by the queue-full policy"):
            logger.log_parameters({"a": 1, "b": 2})  # "a" waits 0.3 s and is dropped
        closer.join(10)
    finally:
        release.set()
    assert logger.stats().dropped >= 1  # "a", counted there and only there
