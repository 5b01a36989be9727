"""Guarantee 4: every record is delivered, or rejected with a reason the user sees."""

from __future__ import annotations

import pytest

from sinks_for_tests import ListSink
from steplog import Logger, Options, PermanentError, RetryPolicy, RunStatus, SteplogWarning

FAST_RETRY = Options(drain_interval_s=0.005, retry=RetryPolicy(initial_s=0.01, max_s=0.05,
                                                               jitter_s=0.01))


def test_transient_failures_are_retried_until_the_batch_is_delivered_once() -> None:
    sink = ListSink(transient_failures=3)
    logger = Logger(sinks=[sink], options=FAST_RETRY)
    with pytest.warns(SteplogWarning, match="retrying"):
        for i in range(100):
            logger.log_scalar("x", float(i), i)
        assert logger.flush(10)
    assert [r.step for r in sink.records] == list(range(100))
    assert logger.stats().retried == 3
    assert logger.close(10)


def test_one_refused_record_is_isolated_and_the_rest_of_its_batch_is_delivered() -> None:
    sink = ListSink(refuse=lambda r: "bad value for key 'bad'" if r.name == "bad" else None)
    logger = Logger(sinks=[sink], options=FAST_RETRY)
    with pytest.warns(SteplogWarning, match="bad value"):
        for i in range(50):
            logger.log_metrics({"good": float(i), "bad": 0.0} if i == 20 else {"good": float(i)}, i)
        result = logger.close(10)
    assert [r.step for r in sink.records] == list(range(50))
    assert not result and result.rejected == 1 and result.undelivered == 1
    assert result.losses[0].record == "scalar 'bad' step 20"
    assert result.losses[0].kind == "rejected"
    assert "bad value" in result.losses[0].reason
    assert logger.stats().rejected == 1


def test_a_retry_window_that_runs_out_counts_the_batch_as_undelivered() -> None:
    sink = ListSink(transient_failures=10**6)
    options = Options(drain_interval_s=0.005, retry=RetryPolicy(initial_s=0.01, max_s=0.02,
                                                                jitter_s=0.0, window_s=0.2))
    logger = Logger(sinks=[sink], options=options)
    with pytest.warns(SteplogWarning):
        logger.log_scalar("x", 1.0)
        result = logger.flush(5)
    assert not result  # acknowledged, but not stored: the flush says so
    assert result.pending == 0 and result.failed == 1
    assert result.losses[0].kind == "failed"
    stats = logger.stats()
    assert stats.failed == 1 and stats.delivered == 0
    closed = logger.close(5)
    assert not closed and closed.undelivered == 1


def test_a_sink_that_refuses_to_open_rejects_its_records_with_the_reason() -> None:
    class NoOpen(ListSink):
        def open(self) -> None:
            raise PermanentError("HTTP 403: no access to experiment (test)")

    logger = Logger(sinks=[NoOpen()], options=FAST_RETRY)
    with pytest.warns(SteplogWarning, match="could not open"):
        logger.log_scalar("x", 1.0)
        result = logger.close(5)
    assert not result and result.rejected == 1 and result.undelivered == 1
    assert all("no access" in loss.reason for loss in result.losses)


@pytest.mark.filterwarnings("ignore::steplog.SteplogWarning")
def test_a_sink_unreachable_since_the_start_counts_its_records_undelivered_at_close() -> None:
    class Unreachable(ListSink):
        def open(self) -> None:
            raise ConnectionRefusedError("tracking server down (test)")

    logger = Logger(sinks=[Unreachable()], options=FAST_RETRY)
    for i in range(10):
        logger.log_scalar("x", float(i))
    assert not logger.flush(0.3)  # the run does not exist yet: nothing is acknowledged
    result = logger.close(0.5)
    assert not result
    assert result.undelivered == 10 and result.rejected == 0


def test_one_logger_fans_out_to_several_sinks_through_one_queue() -> None:
    a, b = ListSink(), ListSink(max_batch=3)
    logger = Logger(sinks=[a, b], options=FAST_RETRY)
    for i in range(10):
        logger.log_scalar("x", float(i))
    result = logger.close(10)
    assert result and result.delivered == 10  # records, each counted once
    assert result.sinks["list"].delivered == result.sinks["list#1"].delivered == 10
    assert [r.value for r in a.records] == [r.value for r in b.records] == [float(i) for i in
                                                                           range(10)]
    assert set(logger.stats().sinks) == {"list", "list#1"}


def test_a_value_that_cannot_be_read_back_is_rejected_and_the_rest_delivered() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=FAST_RETRY)
    with pytest.warns(SteplogWarning, match="could not capture"):
        logger.log_scalar("before", 1.0, 0)
        logger.log_metrics({"good": 1.0, "odd": SumsLikeAFloat()}, 0)  # type: ignore[dict-item]
        logger.log_scalar("after", 2.0, 0)
        result = logger.close(10)
    assert [r.name for r in sink.records] == ["before", "after"]  # nothing of the bad call
    assert result.rejected == 2 and "could not capture" in result.losses[0].reason
    assert not result and result.undelivered == 2


def test_a_refusal_of_the_whole_batch_is_not_split_record_by_record() -> None:
    class Revoked(ListSink):
        def write(self, records):  # type: ignore[no-untyped-def]
            self.attempts += 1
            raise PermanentError("HTTP 403 PERMISSION_DENIED", whole_batch=True)

    sink = Revoked(max_batch=64)
    logger = Logger(sinks=[sink], options=FAST_RETRY)
    with pytest.warns(SteplogWarning, match="PERMISSION_DENIED"):
        logger.log_metrics({f"m{k}": 1.0 for k in range(64)}, 0)
        result = logger.close(10)
    assert sink.attempts == 1
    assert result.rejected == 64


class SumsLikeAFloat:
    """Passes log_metrics' one-pass sum check at the call, but has no float value."""

    def __radd__(self, other: object) -> float:
        return 0.0


def test_a_refused_log_metrics_call_does_not_advance_the_automatic_steps() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=FAST_RETRY)
    with pytest.warns(SteplogWarning, match="could not capture"):
        logger.log_metrics({"good": 1.0, "odd": SumsLikeAFloat()})  # type: ignore[dict-item]
        logger.log_metrics({"good": 2.0, "odd": 3.0})
        logger.close(10)
    assert [(r.name, r.value, r.step) for r in sink.records] == [("good", 2.0, 0),
                                                                  ("odd", 3.0, 0)]


def test_flush_counts_refused_records_not_calls_and_stays_falsy_afterwards() -> None:
    sink = ListSink(refuse=lambda r: "refused (test)" if r.name.startswith("bad") else None)
    logger = Logger(sinks=[sink], options=FAST_RETRY)
    with pytest.warns(SteplogWarning, match="refused"):
        logger.log_metrics({"bad1": 1.0, "bad2": 1.0, "bad3": 1.0, "good": 1.0}, 0)
        first = logger.flush(10)
    assert not first and first.rejected == 3 == logger.stats().rejected
    assert {loss.record for loss in first.losses} == {f"scalar 'bad{k}' step 0" for k in (1, 2, 3)}
    logger.log_scalar("good", 2.0, 1)
    later = logger.flush(10)
    assert not later and later.pending == 0  # the run still lacks three records
    logger.close(10)


def test_a_flush_with_everything_stored_is_truthy() -> None:
    logger = Logger(sinks=[ListSink(), ListSink()], options=FAST_RETRY)
    logger.log_metrics({"a": 1.0, "b": 2.0}, 0)
    result = logger.flush(10)
    assert result and result.pending == result.rejected == result.failed == 0
    assert logger.close(10)


def test_a_run_that_could_not_be_ended_makes_close_falsy() -> None:
    class NoEnd(ListSink):
        def close(self, status: RunStatus) -> None:
            raise PermanentError("HTTP 403: cannot update the run (test)")

    logger = Logger(sinks=[NoEnd()], options=FAST_RETRY)
    logger.log_scalar("x", 1.0)
    with pytest.warns(SteplogWarning, match="could not end the run"):
        result = logger.close(10)
    assert not result and result.undelivered == 0
    assert [loss.kind for loss in result.losses] == ["run"]
