"""How the MLflow sink cuts a batch into request streams for several requests in flight, and
how ``max_in_flight`` is given (no server needed)."""

from __future__ import annotations

import pytest

from steplog.records import Batch, Param, Scalar, Scalars
from steplog.sinks.mlflow import MLflowSink
from steplog.sinks.mlflow.sink import IN_FLIGHT_ENV, SQLITE_MAX_BATCH
from steplog.sinks.mlflow.streams import key_streams, scalars_only

URL = "http://127.0.0.1:9"


def points(streams: list[list[object]]) -> list[list[tuple[str, float, int]]]:
    """Each stream's points as (key, value, step), in request order."""
    return [[(m.name, m.value, m.step) for chunk in s for m in chunk.metrics]  # type: ignore
            for s in streams]


def test_no_key_is_in_two_streams_and_each_keys_points_keep_their_order() -> None:
    rows = [(f"k{i % 7}", float(i), i // 7) for i in range(7000)]
    batch = Batch([Scalars(rows[:3000], 1), Scalar("k3", -1.0, 5000, 2), Scalars(rows[3000:], 3)])
    streams = points(key_streams(batch, 4))  # type: ignore[arg-type]
    assert len(streams) == 4
    keys = [{k for k, _, _ in s} for s in streams]
    assert sum(map(len, keys)) == len(set().union(*keys)) == 7
    every = [(k, v, s) for k, v, s in rows[:3000]] + [("k3", -1.0, 5000)] + rows[3000:]
    for key in {k for k, _, _ in every}:
        (stream,) = [s for s in streams if any(k == key for k, _, _ in s)]
        assert [p for p in stream if p[0] == key] == [p for p in every if p[0] == key]


def test_streams_are_balanced_by_point_count_and_requests_hold_at_most_1000_points() -> None:
    rows = [(f"k{i % 8}", 0.0, i) for i in range(8000)]
    streams = key_streams(Batch([Scalars(rows, 1)]), 4)
    assert [sum(len(c.metrics) for c in s) for s in streams] == [2000] * 4
    assert all(len(c.metrics) <= 1000 for s in streams for c in s)


def test_a_single_key_or_one_in_flight_gives_one_stream() -> None:
    one_key = Batch([Scalars([("loss", 0.0, i) for i in range(2500)], 1)])
    assert [len(c.metrics) for c in key_streams(one_key, 4)[0]] == [1000, 1000, 500]
    assert len(key_streams(one_key, 4)) == 1
    many = Batch([Scalars([(f"k{i}", 0.0, i) for i in range(10)], 1)])
    assert len(key_streams(many, 1)) == 1


def test_params_keep_the_batch_on_one_ordered_request_sequence() -> None:
    assert scalars_only(Batch([Scalars([("a", 1.0, 0)], 1), Scalar("b", 1.0, 0, 1)]))
    assert not scalars_only(Batch([Scalars([("a", 1.0, 0)], 1), Param("lr", 0.1, 1)]))


def test_a_server_write_takes_one_request_per_stream_in_flight() -> None:
    assert MLflowSink("e", tracking_uri=URL).max_batch == 1000
    assert MLflowSink("e", tracking_uri=URL, max_in_flight=4).max_batch == 4000
    # A sqlite store is written by the sink host, not over REST: its batch size is its own.
    assert (MLflowSink("e", tracking_uri="sqlite:///x.db", max_in_flight=4).max_batch
            == SQLITE_MAX_BATCH)


def test_max_in_flight_comes_from_the_environment_when_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(IN_FLIGHT_ENV, "3")
    assert MLflowSink("e", tracking_uri=URL).max_in_flight == 3
    assert MLflowSink("e", tracking_uri=URL, max_in_flight=2).max_in_flight == 2
    target = MLflowSink("e", tracking_uri=URL, max_in_flight=2).target()
    assert target is not None and target["max_in_flight"] == 2
    assert MLflowSink.reattach(target).max_in_flight == 3  # a sync follows the environment
    monkeypatch.delenv(IN_FLIGHT_ENV)
    assert MLflowSink.reattach(target).max_in_flight == 2  # else what the logger had


@pytest.mark.parametrize(("value", "error"), [
    (0, ValueError), (65, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError),
    ("4", TypeError),
])
def test_a_bad_max_in_flight_raises_at_the_call(value: object, error: type) -> None:
    with pytest.raises(error, match="max_in_flight"):
        MLflowSink("e", tracking_uri=URL, max_in_flight=value)  # type: ignore[arg-type]


def test_a_bad_in_flight_environment_variable_raises_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(IN_FLIGHT_ENV, "many")
    with pytest.raises(ValueError, match=IN_FLIGHT_ENV):
        MLflowSink("e", tracking_uri=URL)
