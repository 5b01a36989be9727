"""MLflow on PostgreSQL served by ``mlflow server --workers 3``, with several ``log-batch``
requests in flight per run: every point stored exactly once, and each key's latest value is its
last call's, also through connection resets and late requests, and through ``steplog sync``.

What the server stored is read from PostgreSQL itself (MLflow's ``metrics`` and
``latest_metrics`` tables), not through the client that wrote it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fault_proxy import FaultProxy
from mlflow_support import MlflowServer
from postgres_support import PostgresServer
from steplog import Options, RetryPolicy
from steplog.loggers import MLFlowLogger
from steplog.records import Scalars
from steplog.replay import replay_run
from steplog.runlog import RunJournal
from steplog.sinks.mlflow import MLflowSink
from steplog.sinks.mlflow.sink import IN_FLIGHT_ENV

pytestmark = pytest.mark.timeout(300)

IN_FLIGHT = 4
KEYS = [f"train/k{i}" for i in range(12)]
FAST_RETRY = Options(retry=RetryPolicy(initial_s=0.05, max_s=0.5, jitter_s=0.05))


def value(key_index: int, step: int) -> float:
    """Decreasing with the step: a store keeping the largest value, not the latest point,
    fails the latest-value check."""
    return 1_000_000.0 - step + key_index / 100


def expected(steps: int) -> dict[tuple[str, int], float]:
    return {(key, s): value(k, s) for k, key in enumerate(KEYS) for s in range(steps)}


def check_stored(postgres: PostgresServer, run_id: str | None,
                 points: dict[tuple[str, int], float]) -> None:
    """Each point once with its value, and each key's latest value its last step's."""
    assert run_id is not None
    rows = postgres.query(
        "mlflow",
        "SELECT key, step, count(*), min(value), max(value) FROM metrics WHERE run_uuid = %s "
        "GROUP BY key, step", run_id)
    stored = {(key, step): (n, lo, hi) for key, step, n, lo, hi in rows}
    assert stored.keys() == points.keys(), (
        f"missing {len(points.keys() - stored.keys())}, unexpected "
        f"{len(stored.keys() - points.keys())}")
    twice = {p: s for p, s in stored.items() if s[0] != 1}
    assert not twice, f"{len(twice)} points stored more than once, e.g. {next(iter(twice))}"
    wrong = {p for p, (_, lo, hi) in stored.items() if not lo == hi == points[p]}
    assert not wrong, f"{len(wrong)} points with a wrong value"
    last: dict[str, tuple[int, float]] = {}
    for (key, step), v in points.items():
        if key not in last or step > last[key][0]:
            last[key] = (step, v)
    latest = postgres.query(
        "mlflow", "SELECT key, step, value FROM latest_metrics WHERE run_uuid = %s", run_id)
    assert {key: (step, v) for key, step, v in latest} == last


def log_steps(logger: MLFlowLogger, steps: range) -> None:
    log = logger.log_scalar
    for s in steps:
        for k, key in enumerate(KEYS):
            log(key, value(k, s), s)


@pytest.fixture
def proxy(postgres_mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(postgres_mlflow_server.port, lifetime_s=250) as p:
        yield p


def test_logger_with_several_requests_in_flight_stores_every_point_once_and_the_last_as_latest(
    postgres_server: PostgresServer, postgres_mlflow_server: MlflowServer, proxy: FaultProxy
) -> None:
    logger = MLFlowLogger(f"pg-{uuid.uuid4().hex[:8]}", tracking_uri=proxy.url,
                          max_in_flight=IN_FLIGHT)
    try:
        log_steps(logger, range(1000))  # 12,000 points: writes of 4,000, 4 streams each
        result = logger.close(timeout=120)
    finally:
        logger.close(timeout=10)
    assert result.ok and result.delivered == 12_000, result
    # One keep-alive connection per request stream (more only if the server closed one idle).
    assert proxy.connections >= IN_FLIGHT
    check_stored(postgres_server, logger.run_id, expected(1000))


def test_connection_resets_and_late_requests_with_several_in_flight_lose_and_duplicate_nothing(
    postgres_server: PostgresServer, postgres_mlflow_server: MlflowServer, proxy: FaultProxy
) -> None:
    logger = MLFlowLogger(f"pg-faults-{uuid.uuid4().hex[:8]}", tracking_uri=proxy.url,
                          max_in_flight=IN_FLIGHT, options=FAST_RETRY, request_timeout_s=5.0)
    step = 0
    try:
        assert logger.flush(timeout=60)  # the run exists
        # "delay": requests reach the server after the client gave up and resent them, so
        # the same points are in flight twice, on different connections.
        for mode in ("pass", "reset", "pass", "delay", "pass"):
            proxy.set(mode, delay_s=6.0)
            end = time.monotonic() + 1.0
            while time.monotonic() < end:  # about 1,200 points/s: what a loaded server takes
                log_steps(logger, range(step, step + 10))
                step += 10
                time.sleep(0.1)
        proxy.set("pass")
        result = logger.close(timeout=120)
    finally:
        proxy.set("pass")
        logger.close(timeout=10)
    assert result.ok and result.undelivered == 0, result
    assert logger.stats().retried > 0
    check_stored(postgres_server, logger.run_id, expected(step))


def test_a_stream_that_fails_is_retried_alone_and_the_others_are_stored_once(
    postgres_server: PostgresServer, postgres_mlflow_server: MlflowServer, proxy: FaultProxy
) -> None:
    logger = MLFlowLogger(f"pg-stream-{uuid.uuid4().hex[:8]}", tracking_uri=proxy.url,
                          max_in_flight=IN_FLIGHT, options=FAST_RETRY)
    try:
        assert logger.flush(timeout=60)
        proxy.set("reset", only=b'"train/k0"')  # only the requests carrying this key
        log_steps(logger, range(1000))
        time.sleep(1.5)
        assert not logger.flush(timeout=0.1)
        proxy.set("pass")
        result = logger.close(timeout=120)
    finally:
        proxy.set("pass")
        logger.close(timeout=10)
    assert result.ok and result.undelivered == 0, result
    assert logger.stats().retried > 0
    check_stored(postgres_server, logger.run_id, expected(1000))


def test_sync_with_several_requests_in_flight_stores_every_point_once(
    postgres_server: PostgresServer, postgres_mlflow_server: MlflowServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = 1500
    experiment = f"pg-sync-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    journal = RunJournal(run_dir, [("mlflow", MLflowSink(
        experiment, tracking_uri=postgres_mlflow_server.url))])
    ts = int(time.time() * 1000) - 60_000
    for start in range(0, steps, 25):  # one frame per drained chunk of 25 steps
        rows = [(key, value(k, s), s) for s in range(start, start + 25)
                for k, key in enumerate(KEYS)]
        journal.append([Scalars(rows, ts + start, True)], len(rows))
    journal.write_manifest("FINISHED")
    assert journal.finish()
    monkeypatch.setenv(IN_FLIGHT_ENV, str(IN_FLIGHT))
    (result,) = replay_run(run_dir, timeout_s=120)
    assert result.error is None and result.records == steps * len(KEYS), result
    assert not run_dir.exists()  # every frame acknowledged: the journal is removed
    exp = postgres_mlflow_server.api("experiments/get-by-name", experiment_name=experiment)
    (run,) = postgres_mlflow_server.api(
        "runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]]})["runs"]
    assert run["info"]["status"] == "FINISHED"
    check_stored(postgres_server, run["info"]["run_id"], expected(steps))


def test_a_refused_point_in_one_stream_is_isolated_and_every_other_point_stored_once(
    postgres_server: PostgresServer, postgres_mlflow_server: MlflowServer,
) -> None:
    from steplog.records import Batch
    from steplog.replay import _write
    from steplog.retry import RetryPolicy as Policy

    sink = MLflowSink(f"pg-refused-{uuid.uuid4().hex[:8]}",
                      tracking_uri=postgres_mlflow_server.url, max_in_flight=IN_FLIGHT)
    sink.open()
    try:
        ts = int(time.time() * 1000)
        rows = [(key, value(k, s), s) for s in range(120) for k, key in enumerate(KEYS)]
        # MLflow refuses a negative timestamp: one point of one key, in one of the 4 streams.
        batch = Batch([Scalars(rows[:600], ts), Scalars([("train/k5", 0.0, 10_000)], -1),
                       Scalars(rows[600:], ts + 1)])
        reasons: list[str] = []
        refused = _write(sink, batch, Policy(initial_s=0.05, max_s=0.2), 60, reasons)
    finally:
        sink.close("FINISHED")
    assert refused == 1
    (reason,) = reasons  # the refused point's own reason, as MLflow gave it
    assert "timestamp" in reason.lower(), reason
    check_stored(postgres_server, sink.run_id, expected(120))
