"""The seed-compatible API: registry, should_log, automatic steps, the no-op base logger."""

from __future__ import annotations

import pytest

from sinks_for_tests import ListSink
from steplog import FileLogger, Logger, Options


def test_create_builds_a_registered_logger(tmp_path) -> None:
    logger = Logger.create("file", output_dir=str(tmp_path))
    assert isinstance(logger, FileLogger)
    logger.close(10)
    assert type(Logger.create("blank")) is Logger


def test_create_with_an_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"known types: .*file"):
        Logger.create("tensorboard")


def test_register_adds_a_custom_logger() -> None:
    @Logger.register("custom-test")
    class Custom(Logger):
        pass

    assert type(Logger.create("custom-test")) is Custom


@pytest.mark.parametrize(
    ("freq", "expected"),
    [(1, list(range(10))), (3, [2, 5, 8]), (5, [4, 9])],
)
def test_should_log_fires_once_per_interval_like_the_seed(freq: int, expected: list[int]) -> None:
    logger = Logger(logging_freq=freq)
    assert [i for i in range(10) if logger.should_log(i)] == expected


def test_should_log_fires_once_per_interval_even_when_iterations_skip() -> None:
    logger = Logger(logging_freq=10)
    assert [i for i in (3, 9, 12, 15, 25, 26, 40) if logger.should_log(i)] == [9, 25, 40]


def test_the_base_logger_is_a_no_op_that_still_validates() -> None:
    logger = Logger()
    logger.log_scalar("x", 1.0)
    logger.log_metrics({"y": 2.0}, 3)
    logger.log_parameters({"a": 1})
    assert logger.stats().enqueued == 0
    with pytest.raises(TypeError):
        logger.log_scalar("x", "nan")  # type: ignore[arg-type]


def test_each_name_gets_its_own_automatic_step_counter() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.005))
    logger.log_scalar("a", 1.0)
    logger.log_scalar("a", 1.0)
    logger.log_scalar("b", 1.0)
    logger.log_metrics({"a": 1.0, "b": 1.0})
    logger.log_scalar("a", 1.0, 100)
    logger.log_scalar("a", 1.0)
    assert logger.close(10)
    assert [(r.name, r.step) for r in sink.records] == [
        ("a", 0), ("a", 1), ("b", 0), ("a", 2), ("b", 1), ("a", 100), ("a", 4)]


def test_stats_count_what_was_enqueued_and_delivered() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.005))
    logger.log_metrics({"a": 1.0, "b": 2.0})
    logger.log_scalar("c", 3.0)
    assert logger.flush(10)
    s = logger.stats()
    assert (s.enqueued, s.delivered, s.dropped, s.rejected, s.queue_depth) == (3, 3, 0, 0, 0)
    assert s.sinks["list"].delivered == 3
    logger.close(10)
