"""Guarantee 3: flush is a barrier with an honoured timeout."""

from __future__ import annotations

import itertools
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


def test_a_drain_error_loses_only_what_it_held_with_the_reason_and_flushes_still_return(
    tmp_path, monkeypatch
) -> None:
    from steplog.runlog import RunJournal

    append = RunJournal.append
    failing = threading.Event()

    def append_or_fail(self: RunJournal, parts: list, count: int) -> int:  # type: ignore[type-arg]
        if failing.is_set():
            raise RuntimeError("injected drain fault")
        return append(self, parts, count)

    monkeypatch.setattr(RunJournal, "append", append_or_fail)
    sink = ListSink()
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.005, journal=True,
                                                  runs_dir=str(tmp_path)))
    for i in range(10):
        logger.log_scalar("x", float(i), i)
    assert logger.flush(10)
    failing.set()
    for i in range(10, 20):
        logger.log_scalar("x", float(i), i)
    result = logger.flush(10)
    assert not result and result.elapsed_s < 5
    (loss,) = result.losses
    assert loss.records == 10 and "injected drain fault" in loss.reason
    assert loss.record == "10 records of one drained chunk"  # not a record that arrived
    failing.clear()
    for i in range(20, 30):
        logger.log_scalar("x", float(i), i)
    closed = logger.close(10)
    assert not closed and closed.rejected == 10 and closed.undelivered == 10
    assert logger.stats().enqueued == 30
    assert [r.step for r in sink.records] == [*range(10), *range(20, 30)]


def test_a_timed_out_flush_and_close_count_the_chunk_the_drain_thread_holds() -> None:
    sink = ListSink(delay_s=1.0, max_batch=1)
    logger = Logger(sinks=[sink], options=Options(lane_capacity=1, drain_interval_s=0.01))
    logger.log_scalar("a", 0.0, 0)
    time.sleep(0.1)  # the lane holds it, and the sink sleeps on it
    for i in range(1, 5001):
        logger.log_scalar("a", float(i), i)
    time.sleep(0.2)  # the drain thread holds the rest, waiting for room in the lane
    result = logger.flush(0.5)
    assert not result and result.pending >= 5001 - len(sink.records)
    closed = logger.close(0.5)
    assert closed.timed_out
    assert sum(loss.records for loss in closed.losses) >= closed.undelivered


def test_the_enqueued_count_never_goes_back_while_records_come() -> None:
    import sys

    logger = Logger(sinks=[ListSink()], options=Options(drain_interval_s=0.001))
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            for i in range(200):
                logger.log_scalar("a", 1.0, i)
            time.sleep(0.0005)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches everywhere, as on a loaded machine
    producer = threading.Thread(target=produce)
    producer.start()
    try:
        seen = [logger.stats().enqueued for _ in range(3000)]
    finally:
        stop.set()
        producer.join(10)
        sys.setswitchinterval(interval)
    logger.close(30)
    assert all(a <= b for a, b in itertools.pairwise(seen))


def test_a_chunk_partly_handed_to_the_lanes_is_counted_once_in_what_a_flush_lacks() -> None:
    sink = ListSink(delay_s=3.0, max_batch=1)
    logger = Logger(sinks=[sink], options=Options(lane_capacity=1, drain_interval_s=0.5))
    logger.log_scalar("a", 0.0, 0)
    logger.log_scalar("a", 0.5, 1)
    time.sleep(0.8)  # one being written for 3 s, one waiting: the lane is full
    for i in range(2, 102):
        logger.log_scalar("a", float(i), i)
    logger.log_text("a note", "note")  # the uploads lane takes it; the scalars wait for room
    time.sleep(0.8)
    result = logger.flush(0.2)
    assert not result and result.pending <= 103 - len(sink.records)
    logger.close(0.3)
