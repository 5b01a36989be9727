"""An idle logger's drain thread sleeps until a record comes; the record that wakes it is
delivered without a flush and stamped within one drain interval of its call."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sinks_for_tests import ListSink
from steplog import Logger, Options
from waiting import wait_until

INTERVAL_S = 0.02
OPTIONS = Options(drain_interval_s=INTERVAL_S)
IDLE_S = 0.4
"""Twenty drain intervals without a record."""
ARRIVAL_S = 3.0
"""Well below the idle drain thread's longest sleep (5 s): a record that did not wake it
would arrive only after that."""


def _wakeups(thread: threading.Thread) -> int:
    """The thread's voluntary context switches so far (each wait that slept is one)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("voluntary_ctxt_switches")))


def _drain_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "steplog-drain"}


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux's /proc")
def test_an_idle_logger_does_not_wake_its_drain_thread_every_interval() -> None:
    sink = ListSink()
    others = _drain_threads()  # of loggers that earlier tests left to the exit hook
    logger = Logger(sinks=[sink], options=OPTIONS)
    try:
        (drain,) = _drain_threads() - others
        logger.log_scalar("x", 1.0, 0)
        assert logger.flush(10)
        time.sleep(IDLE_S)
        before = _wakeups(drain)
        time.sleep(1.0)  # 50 intervals
        assert _wakeups(drain) - before <= 2
    finally:
        assert logger.close(10)


LOG_CALLS: dict[str, Callable[[Logger], None]] = {
    "log_scalar": lambda logger: logger.log_scalar("x", 2.0, 1),
    "log_scalar without a step": lambda logger: logger.log_scalar("x", 2.0),
    "log_metrics": lambda logger: logger.log_metrics({"x": 2.0, "y": 3.0}, 1),
    "log_parameters": lambda logger: logger.log_parameters({"lr": 0.1}),
}


@pytest.mark.parametrize("call", list(LOG_CALLS), ids=list(LOG_CALLS))
def test_a_record_logged_after_an_idle_spell_is_delivered_without_a_flush(call: str) -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=OPTIONS)
    try:
        logger.log_scalar("x", 1.0, 0)
        assert logger.flush(10)
        time.sleep(IDLE_S)
        called_ms = time.time() * 1000
        LOG_CALLS[call](logger)
        assert wait_until(lambda: len(sink.records) > 1, ARRIVAL_S), "not delivered"
        stamp = sink.records[1].timestamp
        assert stamp - called_ms < 1000  # within one interval, and scheduling
    finally:
        assert logger.close(10)


def test_records_from_many_threads_after_idle_spells_all_arrive_in_order() -> None:
    # Calls from several threads, each round as the drain thread goes to rest: a call finds
    # the gate shut and wakes the thread, or finds it open (the thread still awake).
    sink = ListSink()
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.001))
    rounds, threads = 30, 4
    try:
        for r in range(rounds):
            time.sleep(0.003)  # a few intervals: the drain thread goes to rest
            workers = [threading.Thread(target=logger.log_scalar, args=(f"t{t}", float(r), r))
                       for t in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(10)
            expected = (r + 1) * threads
            assert wait_until(lambda e=expected: len(sink.records) >= e, ARRIVAL_S), (
                f"round {r}: a record waited for the drain thread's longest sleep")
        for t in range(threads):
            assert [rec.step for rec in sink.records if rec.name == f"t{t}"] == list(range(rounds))
    finally:
        assert logger.close(10)


def test_a_flush_after_an_idle_spell_waits_for_no_drain_interval() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=1.0))
    try:
        logger.log_scalar("x", 1.0, 0)
        assert logger.flush(10)
        for step in range(1, 4):
            time.sleep(1.2)  # an interval without a record: the drain thread rests
            logger.log_scalar("x", 1.0, step)  # wakes it, and it gathers for 1 s ...
            start = time.monotonic()
            assert logger.flush(10)  # ... unless a flush waits
            assert time.monotonic() - start < 0.5
        assert len(sink.records) == 4
    finally:
        assert logger.close(10)
