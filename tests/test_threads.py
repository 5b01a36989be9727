"""Guarantee 8: many threads may log at once; each thread's records keep their order."""

from __future__ import annotations

import threading

from sinks_for_tests import ListSink
from steplog import Logger, Options


def test_many_threads_logging_at_once_lose_nothing_and_keep_each_threads_order() -> None:
    sink = ListSink(max_batch=997)
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.002))
    threads_n, per_thread = 8, 5000
    start = threading.Barrier(threads_n)

    def work(k: int) -> None:
        start.wait()
        for i in range(per_thread):
            if i % 2:
                logger.log_scalar(f"t{k}", float(i), i)
            else:
                logger.log_metrics({f"t{k}": float(i)}, i)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    result = logger.close(30)
    assert result and result.delivered == threads_n * per_thread
    for k in range(threads_n):
        steps = [r.step for r in sink.records if r.name == f"t{k}"]
        assert steps == list(range(per_thread))


def test_automatic_steps_are_assigned_in_queue_order_across_threads() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.002))

    def work() -> None:
        for _ in range(1000):
            logger.log_scalar("shared", 1.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert logger.close(30)
    assert [r.step for r in sink.records] == list(range(4000))
