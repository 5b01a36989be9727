"""The logger's life has one owner: states, the close lock, deadlines, signals and exit."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from mlflow_support import free_port
from sinks_for_tests import DownSink, ListSink
from steplog import (
    FileLogger,
    Logger,
    LoggerClosedError,
    Options,
    PermanentError,
    RetryPolicy,
    RunStatus,
    State,
    SteplogWarning,
)
from steplog.records import MetricRecord

FAST = Options(drain_interval_s=0.005)


class SlowCloseSink(ListSink):
    """A backend whose run takes ``close_delay_s`` to end (a slow tracking server)."""

    def __init__(self, close_delay_s: float, **kw: float) -> None:
        super().__init__(**kw)
        self.close_delay_s = close_delay_s
        self.ending = threading.Event()

    def close(self, status: RunStatus) -> None:
        self.ending.set()
        time.sleep(self.close_delay_s)
        super().close(status)


class OverlapSink(ListSink):
    """Records whether ``close`` ever ran while one of its own calls was still running."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.in_call = 0
        self.overlaps = 0
        self.closed = threading.Event()

    def write(self, records: Sequence[MetricRecord]) -> None:
        self.in_call += 1
        try:
            super().write(records)
        finally:
            self.in_call -= 1

    def close(self, status: RunStatus) -> None:
        if self.in_call:
            self.overlaps += 1
        super().close(status)
        self.closed.set()


def closing_in_background(logger: Logger, timeout: float) -> threading.Thread:
    t = threading.Thread(target=logger.close, args=(timeout,), daemon=True)
    t.start()
    for _ in range(200):
        if logger.state is not State.OPEN:
            break
        time.sleep(0.005)
    assert logger.state is State.CLOSING
    return t


def test_a_logger_goes_from_open_through_closing_to_closed() -> None:
    logger = Logger(sinks=[SlowCloseSink(0.3)], options=FAST)
    assert logger.state is State.OPEN
    t = closing_in_background(logger, 10)
    t.join(10)
    assert logger.state is State.CLOSED


def test_flush_during_a_close_in_another_thread_returns_with_the_close_outcome() -> None:
    sink = SlowCloseSink(0.5)
    logger = Logger(sinks=[sink], options=FAST)
    logger.log_scalar("x", 1.0)
    t = closing_in_background(logger, 10)
    assert sink.ending.wait(5)  # the close is ending the run: the worker drained everything
    start = time.monotonic()
    result = logger.flush(timeout=5)
    assert time.monotonic() - start < 2.0
    assert result and result.pending == 0
    t.join(10)


def test_a_second_close_returns_at_its_own_deadline_while_the_first_still_runs() -> None:
    gate = threading.Event()
    logger = Logger(sinks=[ListSink(release=gate)], options=FAST)
    logger.log_scalar("x", 1.0)
    t = closing_in_background(logger, 30)
    start = time.monotonic()
    second = logger.close(timeout=0.5)
    elapsed = time.monotonic() - start
    gate.set()
    t.join(10)
    assert 0.4 <= elapsed < 1.0
    assert not second and second.timed_out
    assert logger.close(1)  # the first close finished: its result, which is truthy


def close_with_a_signal_during_it(
    logger: Logger, in_handler: Callable[[], object]
) -> tuple[list[object], object, float]:
    """Close ``logger`` on this thread while a SIGUSR1 handler runs ``in_handler`` 0.2 s in:
    (what the handler got, the close result, how long the close took). SIGUSR1, not SIGALRM:
    pytest-timeout's alarm must still be able to end a hung test."""
    inner: list[object] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: inner.append(in_handler()))
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        start = time.monotonic()
        outer = logger.close(timeout=10)
        return inner, outer, time.monotonic() - start
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)


def test_close_from_a_signal_handler_inside_close_on_the_same_thread_does_not_deadlock() -> None:
    logger = Logger(sinks=[SlowCloseSink(0.6)], options=FAST)
    logger.log_scalar("x", 1.0)
    inner, outer, elapsed = close_with_a_signal_during_it(logger, lambda: logger.close(5))
    assert len(inner) == 1 and not inner[0]  # answered at once: it cannot wait for itself
    assert outer and elapsed < 3.0


def test_close_without_a_timeout_is_bounded_by_the_default_deadline() -> None:
    logger = Logger(sinks=[DownSink()], options=Options(drain_interval_s=0.005, timeout_s=0.5))
    logger.log_scalar("x", 1.0)
    start = time.monotonic()
    with pytest.warns(SteplogWarning):
        result = logger.close()
    assert time.monotonic() - start < 1.5
    assert not result and result.undelivered == 1


def test_flush_without_a_timeout_is_bounded_by_the_default_deadline() -> None:
    logger = Logger(sinks=[DownSink()], options=Options(drain_interval_s=0.005, timeout_s=0.3))
    logger.log_scalar("x", 1.0)
    start = time.monotonic()
    with pytest.warns(SteplogWarning):
        assert not logger.flush()
    assert time.monotonic() - start < 1.0
    logger.close(0.5)


@pytest.mark.parametrize("call", ["log_parameters", "log_tags", "log_artifact", "log_scalar",
                                  "log_metrics", "save_agent"])
def test_every_log_call_during_close_raises_instead_of_being_lost(call: str, tmp_path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("x")
    gate = threading.Event()
    logger = Logger(sinks=[ListSink(release=gate)], options=FAST)
    logger.log_scalar("x", 1.0)
    t = closing_in_background(logger, 10)
    args: dict[str, tuple[object, ...]] = {
        "log_parameters": ({"a": 1},), "log_tags": ({"t": "v"},), "log_artifact": (f,),
        "log_scalar": ("y", 1.0), "log_metrics": ({"y": 1.0},), "save_agent": ({"k": 1},),
    }
    try:
        with pytest.raises(LoggerClosedError, match="closing"):
            getattr(logger, call)(*args[call])
    finally:
        gate.set()
        t.join(10)
    result = logger.close(1)
    assert result and result.delivered == 1


def test_a_timed_out_close_ends_the_run_only_after_the_running_write_returned() -> None:
    gate = threading.Event()
    sink = OverlapSink(release=gate)
    logger = Logger(sinks=[sink], options=FAST)
    logger.log_scalar("x", 1.0)
    result = logger.close(timeout=0.3)
    assert not result and result.timed_out
    assert sink.closed_with is None  # the write still runs: the run is not ended under it
    gate.set()
    assert sink.closed.wait(5)
    assert sink.overlaps == 0 and sink.closed_with == "FINISHED"


@pytest.mark.filterwarnings("ignore::steplog.SteplogWarning")
def test_close_with_a_system_sampler_stuck_on_a_full_queue_returns_within_its_timeout() -> None:
    pytest.importorskip("psutil")
    from steplog import MLFlowLogger

    options = Options(drain_interval_s=0.005, queue_size=2, lane_capacity=1, block_timeout_s=30)
    logger = MLFlowLogger("sampler", tracking_uri=f"http://127.0.0.1:{free_port()}",  # nobody there
                          log_system_metrics=True, system_metrics_interval_s=0.02,
                          options=options)
    logger.log_scalar("x", 1.0)
    time.sleep(0.5)  # the queue fills; the sampler now waits for room
    start = time.monotonic()
    result = logger.close(timeout=0.5)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0 and not result and result.undelivered >= 1


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1.0])
def test_a_non_finite_or_negative_timeout_raises_and_leaves_the_logger_open(
    timeout: float,
) -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=FAST)
    with pytest.raises(ValueError, match="finite"):
        logger.close(timeout=timeout)
    with pytest.raises(ValueError, match="finite"):
        logger.flush(timeout=timeout)
    assert logger.state is State.OPEN
    logger.log_scalar("x", 1.0)
    assert logger.close(10) and len(sink.records) == 1


def test_a_timeout_beyond_the_longest_wait_raises_and_leaves_the_logger_open() -> None:
    from steplog.retry import LONGEST_WAIT_S

    sink = ListSink()
    logger = Logger(sinks=[sink], options=FAST)
    for call in (logger.close, logger.flush):
        with pytest.raises(ValueError, match="at most"):
            call(timeout=LONGEST_WAIT_S * 10)
    with pytest.raises(ValueError, match=r"exit_timeout_s must be .* at most"):
        Options(exit_timeout_s=LONGEST_WAIT_S * 10)
    assert logger.state is State.OPEN
    logger.log_scalar("x", 1.0)
    assert logger.close(LONGEST_WAIT_S) and len(sink.records) == 1


def test_many_threads_closing_at_once_all_get_the_same_result() -> None:
    logger = Logger(sinks=[SlowCloseSink(0.2)], options=FAST)
    for i in range(100):
        logger.log_scalar("x", float(i))
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(logger.close(10)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert len(results) == 6 and all(r == results[0] for r in results)
    assert results[0]


def test_a_producer_blocked_on_a_full_queue_is_released_by_close() -> None:
    gate = threading.Event()
    options = Options(queue_size=2, lane_capacity=1, drain_interval_s=0.005, block_timeout_s=30)
    logger = Logger(sinks=[ListSink(release=gate, max_batch=1)], options=options)
    outcome: list[str] = []

    def produce() -> None:
        try:
            for i in range(100):
                logger.log_scalar("x", float(i))
            outcome.append("done")
        except LoggerClosedError:
            outcome.append("closed")

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    time.sleep(0.3)  # the producer now waits for room
    start = time.monotonic()
    logger.close(timeout=0.5)
    t.join(5)
    gate.set()
    assert outcome == ["closed"] and time.monotonic() - start < 2.0


def test_file_logger_on_a_read_only_directory_raises_at_construction(read_only_dir) -> None:
    with pytest.raises(OSError, match="Read-only"):
        FileLogger(read_only_dir)


def test_flush_from_a_signal_handler_on_the_closing_thread_answers_at_once() -> None:
    logger = Logger(sinks=[SlowCloseSink(0.6)], options=Options(drain_interval_s=0.005,
                                                                 timeout_s=5))
    logger.log_scalar("x", 1.0)
    inner, outer, elapsed = close_with_a_signal_during_it(logger, logger.flush)
    assert len(inner) == 1 and not inner[0]
    assert outer and elapsed < 2.0


def test_records_logged_from_other_threads_while_closing_are_delivered_or_refused() -> None:
    for _ in range(50):
        sink = ListSink()
        logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.001))
        accepted = [0, 0]

        def produce(k: int, logger: Logger = logger, accepted: list[int] = accepted) -> None:
            while True:
                try:
                    logger.log_scalar(f"t{k}", 1.0, accepted[k])
                except LoggerClosedError:
                    return
                accepted[k] += 1

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.002)
        result = logger.close(10)
        for t in threads:
            t.join(10)
        assert result and result.delivered == sum(accepted) == len(sink.records), result


@pytest.mark.filterwarnings("ignore::steplog.SteplogWarning")
def test_splitting_a_refused_batch_starts_no_attempt_after_the_deadline() -> None:
    starts: list[float] = []

    class SlowRefusing(ListSink):
        def write(self, records: Sequence[MetricRecord]) -> None:
            starts.append(time.monotonic())
            time.sleep(0.1)
            if any(r.name == "bad" for r in records):
                raise PermanentError("INVALID_PARAMETER_VALUE: bad (test)")
            super().write(records)

    logger = Logger(sinks=[SlowRefusing(max_batch=64)], options=Options(drain_interval_s=1.0))
    logger.log_metrics({**{f"m{k}": 1.0 for k in range(63)}, "bad": 1.0}, 0)
    start = time.monotonic()
    result = logger.close(timeout=0.25)
    deadline = start + 0.25
    time.sleep(1.0)  # let the lane finish what it started
    assert not result
    assert all(t < deadline for t in starts), [round(t - deadline, 3) for t in starts]


def test_worker_threads_survive_warnings_turned_into_errors() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sink = ListSink(transient_failures=2)
        logger = Logger(sinks=[sink], options=Options(
            drain_interval_s=0.005, retry=RetryPolicy(initial_s=0.01, max_s=0.02, jitter_s=0)))
        for i in range(10):
            logger.log_scalar("x", float(i), i)
        assert logger.flush(10)
        assert logger.close(10) and len(sink.records) == 10
