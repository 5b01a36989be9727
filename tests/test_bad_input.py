"""Guarantee 6: bad input fails at the call site with a clear error."""

from __future__ import annotations

import json
import threading
from fractions import Fraction
from pathlib import Path

import pytest

from steplog import FileLogger, Logger, Options, SteplogWarning
from steplog.paths import safe_relpath


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "C:\\x", "\\\\host\\x",
                                  "", "a\x00b", "..", "./.."])
def test_names_that_would_escape_the_run_directory_raise_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        safe_relpath(name)


@pytest.mark.parametrize(("name", "expected"), [("a/b.txt", "a/b.txt"), ("a\\b", "a/b"),
                                                ("./a//b", "a/b"), ("a/./b/", "a/b")])
def test_relative_names_are_normalised(name: str, expected: str) -> None:
    assert safe_relpath(name) == expected


def test_log_artifact_with_an_escaping_name_raises(tmp_path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("x")
    logger = FileLogger(tmp_path / "run")
    with pytest.raises(ValueError):
        logger.log_artifact(f, name="../outside.txt")
    with pytest.raises(ValueError):
        logger.log_file(f, name="/abs")
    assert logger.close(10)
    assert not (tmp_path / "outside.txt").exists()


def test_a_missing_file_raises_file_not_found_at_the_call(tmp_path) -> None:
    logger = FileLogger(tmp_path)
    with pytest.raises(FileNotFoundError):
        logger.log_artifact(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError):
        logger.log_file(tmp_path / "nope.bin", name="files")
    logger.close(10)


@pytest.mark.parametrize("name", [1, None, b"loss"])
def test_a_non_string_metric_name_raises_type_error(name: object) -> None:
    with pytest.raises(TypeError):
        Logger().log_scalar(name, 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_metric_name_raises_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        Logger().log_scalar(name, 1.0)


def test_a_bad_iteration_raises_type_error() -> None:
    with pytest.raises(TypeError):
        Logger().log_scalar("x", 1.0, "3")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Logger().log_metrics({"x": 1.0}, 2.5)  # type: ignore[arg-type]


def test_log_metrics_requires_a_mapping() -> None:
    with pytest.raises(TypeError):
        Logger().log_metrics([("x", 1.0)])  # type: ignore[arg-type]


@pytest.mark.parametrize("freq", [0, -1, 1.5])
def test_logging_freq_must_be_a_positive_int(freq: object) -> None:
    with pytest.raises(ValueError):
        Logger(logging_freq=freq)  # type: ignore[arg-type]


def test_log_figure_requires_a_figure(tmp_path) -> None:
    with pytest.raises(TypeError):
        FileLogger(tmp_path).log_figure(object(), "fig")


def test_an_int_too_large_for_a_float_raises_value_error_at_the_call() -> None:
    logger = Logger()
    with pytest.raises(ValueError, match="too large"):
        logger.log_metrics({"a": 10**400})
    with pytest.raises(ValueError, match="too large"):
        logger.log_scalar("a", 10**400)
    with pytest.raises(ValueError, match="too large"):
        logger.log_metrics({"a": 1.5, "b": 10**400})


@pytest.mark.parametrize(("metrics", "error", "key"), [
    ({"a": 10**400, "b": -(10**400), "c": 1.0}, ValueError, "'a'"),  # sums to a plain float
    ({"c": 1.0, "b": -(10**400)}, ValueError, "'b'"),
    ({"c": 1.0, "s": "1.5"}, TypeError, "'s'"),
    ({"c": 1, "n": None}, TypeError, "'n'"),
    ({"c": 1.0, "f": Fraction(10**400)}, ValueError, "'f'"),  # a numbers.Real too large
])
def test_a_refused_metrics_dict_raises_at_the_call_naming_the_key_and_logs_nothing_of_it(
    metrics: dict[str, object], error: type[Exception], key: str, tmp_path: Path
) -> None:
    logger = FileLogger(tmp_path)
    with pytest.raises(error, match=key):
        logger.log_metrics(metrics, 0)  # type: ignore[arg-type]
    logger.log_metrics({"c": 2.0}, 1)
    result = logger.close(30)
    assert result and not result.losses
    rows = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert [(r["name"], r["value"], r["step"]) for r in rows] == [("c", 2.0, 1)]


@pytest.mark.parametrize("step", [2**63, -(2**63) - 1, 10**30])
def test_a_step_outside_signed_64_bit_raises_value_error_at_the_call(step: int, tmp_path) -> None:
    logger = FileLogger(tmp_path)
    f = tmp_path / "a.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="64-bit"):
        logger.log_scalar("x", 1.0, step)
    with pytest.raises(ValueError, match="64-bit"):
        logger.log_metrics({"x": 1.0}, step)
    with pytest.raises(ValueError, match="64-bit"):
        logger.log_artifact(f, step=step)
    assert logger.close(10)
    assert logger.stats().enqueued == 0


def test_the_largest_signed_64_bit_steps_are_accepted(tmp_path) -> None:
    logger = FileLogger(tmp_path)
    logger.log_scalar("x", 1.0, 2**63 - 1)
    logger.log_scalar("x", 2.0, -(2**63))
    assert logger.close(10)


@pytest.mark.parametrize("field", ["drain_interval_s", "block_timeout_s", "timeout_s",
                                   "exit_timeout_s"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_durations_in_options_raise(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        Options(**{field: value})


def test_save_agent_with_an_object_that_cannot_be_copied_raises_at_the_call(tmp_path) -> None:
    logger = FileLogger(tmp_path)
    with pytest.raises(TypeError, match="cannot snapshot"):
        logger.save_agent({"lock": threading.Lock()})
    assert logger.close(10)
    assert not (tmp_path / "agent.pth").exists()


def test_save_agent_with_an_object_that_cannot_be_serialised_is_rejected_with_the_reason(
    tmp_path,
) -> None:
    logger = FileLogger(tmp_path)
    logger.save_agent({"policy": lambda x: x})  # copied at the call, pickled on the worker
    with pytest.warns(SteplogWarning, match="rejected artifact 'agent.pth'"):
        result = logger.close(10)
    assert not result and result.rejected == 1
    assert "lambda" in result.losses[0].reason
    assert not (tmp_path / "agent.pth").exists()


@pytest.mark.parametrize(("uri", "hint"), [("localhost:5000", "http://localhost:5000"),
                                           ("127.0.0.1:5000", "http://127.0.0.1:5000"),
                                           ("ftp://host/x", "ftp"), ("http:///nohost", "no host"),
                                           ("./mlruns", "file store")])
def test_a_tracking_uri_mlflow_cannot_use_raises_at_construction(uri: str, hint: str) -> None:
    from steplog import MLFlowLogger

    with pytest.raises(ValueError, match=hint):
        MLFlowLogger("exp", tracking_uri=uri)


@pytest.mark.parametrize("uri", ["databricks", "databricks-uc", "sqlite:///x.db",
                                 "postgresql+psycopg2://u@h/db", "https://h:5000/prefix"])
def test_tracking_uris_mlflow_knows_are_accepted(uri: str) -> None:
    from steplog.sinks.mlflow import tracking_uri_problem

    assert tracking_uri_problem(uri) is None


SURROGATE = "caf\udce9"
"""What ``os.fsdecode`` gives for the file name ``caf\xe9`` (Latin-1, not UTF-8)."""


@pytest.mark.parametrize("call", [
    lambda lg: lg.log_scalar(SURROGATE, 1.0, 0),
    lambda lg: lg.log_metrics({"ok": 1.0, SURROGATE: 2.0}, 0),
    lambda lg: lg.log_parameters({"lr": 0.1, SURROGATE: 1}),
    lambda lg: lg.log_parameters({"lr": 0.1, "data": SURROGATE}),
    lambda lg: lg.log_parameters({"lr": 0.1, "paths": ["a", SURROGATE]}),
    lambda lg: lg.log_tags({"ok": "yes", "dir": SURROGATE}),
], ids=["scalar", "metrics", "param name", "param", "param list", "tag"])
def test_a_text_utf8_cannot_encode_raises_value_error_at_the_call_and_queues_nothing(
    tmp_path, call
) -> None:
    logger = FileLogger(tmp_path / "run")
    with pytest.raises(ValueError, match="lone surrogate"):
        call(logger)
    result = logger.close(10)
    assert result and logger.stats().enqueued == 0


@pytest.mark.parametrize("call", [
    lambda lg, f: lg.log_artifact(f, type=SURROGATE),
    lambda lg, f: lg.log_artifact(f, metadata={"k": SURROGATE}),
    lambda lg, f: lg.log_artifact(f, aliases=[SURROGATE]),
    lambda lg, f: lg.log_artifact(f, name=SURROGATE),
    lambda lg, f: lg.log_artifact(f.with_name(SURROGATE)),  # its own name is not UTF-8
    lambda lg, f: lg.log_file(f, name=SURROGATE),
    lambda lg, f: lg.log_text("x", SURROGATE),
], ids=["type", "metadata", "alias", "name", "file name", "file under a name", "text name"])
def test_an_upload_text_utf8_cannot_encode_raises_value_error_at_the_call(tmp_path, call) -> None:
    f = tmp_path / "f.txt"
    f.write_text("x")
    f.with_name(SURROGATE).write_text("x")
    logger = FileLogger(tmp_path / "run")
    with pytest.raises(ValueError, match="lone surrogate"):
        call(logger, f)
    result = logger.close(10)
    assert result and logger.stats().enqueued == 0


@pytest.mark.parametrize("name", [None, 3])
def test_log_file_refuses_a_name_that_is_not_text(tmp_path, name: object) -> None:
    f = tmp_path / "f.txt"
    f.write_text("x")
    logger = FileLogger(tmp_path / "run")
    with pytest.raises(TypeError, match="name must be a str"):
        logger.log_file(f, name=name)  # type: ignore[arg-type]
    assert logger.close(10)
