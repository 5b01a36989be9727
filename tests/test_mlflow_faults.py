"""The MLflow sink under real faults: a stopped server, and a proxy that resets, delays or 503s.

Every fault must surface as :class:`RetryableError` within the sink's timeout, and a retry of the
same batch after the fault must leave every point stored exactly once.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mlflow import MlflowClient

from fault_proxy import FaultProxy
from mlflow_support import MlflowServer, free_port
from steplog import Options, RetryPolicy
from steplog.errors import RetryableError
from steplog.loggers import MLFlowLogger
from steplog.records import Artifact, MetricRecord, Param, Scalar, Tag, now_ms
from steplog.sinks.mlflow import MLflowSink
from steplog.sinks.mlflow.client import _mlflow_errors
from steplog.sinks.mlflow.common import redact_text
from waiting import wait_until

pytestmark = pytest.mark.timeout(180)

QUICK_S = 2.0
"""A refused or reset connection must be reported within this many seconds."""


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    """A pass-through proxy in front of the session server."""
    with FaultProxy(mlflow_server.port, lifetime_s=150) as p:
        yield p


@pytest.fixture
def sinks() -> Iterator[list[MLflowSink]]:
    """Sinks a test opened; closed afterwards (best effort: the server may be down)."""
    opened: list[MLflowSink] = []
    yield opened
    for sink in opened:
        with contextlib.suppress(Exception):
            sink.close("FINISHED")


def open_sink(sinks: list[MLflowSink], url: str, timeout_s: float = 10.0) -> MLflowSink:
    sink = MLflowSink(
        f"faults-{uuid.uuid4().hex[:8]}", tracking_uri=url, request_timeout_s=timeout_s
    )
    sink.open()
    sinks.append(sink)
    return sink


def batch(key: str, steps: range) -> list[MetricRecord]:
    ts = now_ms()
    return [Scalar(key, float(s) * 0.25, s, ts) for s in steps]


def steps_stored(server: MlflowServer, run_id: str | None, key: str) -> list[int]:
    return [m["step"] for m in server.metric_history(run_id or "", key)]


def raises_retryable_within(limit_s: float, fn: Callable[[], Any]) -> RetryableError:
    start = time.monotonic()
    with pytest.raises(RetryableError) as info:
        fn()
    elapsed = time.monotonic() - start
    assert elapsed < limit_s, f"took {elapsed:.2f} s"
    return info.value


def test_stopped_server_raises_retryable_error_quickly_and_a_retry_after_restart_has_no_duplicates(
    restartable_mlflow_server: MlflowServer, sinks: list[MLflowSink]
) -> None:
    server = restartable_mlflow_server
    sink = open_sink(sinks, server.url)
    first, second = batch("loss", range(0, 500)), batch("loss", range(500, 1000))
    sink.write(first)

    server.stop()
    raises_retryable_within(QUICK_S, lambda: sink.write(second))
    raises_retryable_within(QUICK_S, lambda: sink.upload(Artifact("a.txt", now_ms(), data=b"a")))
    raises_retryable_within(QUICK_S, lambda: sink.close("FINISHED"))
    newcomer = MLflowSink("faults-newcomer", tracking_uri=server.url, request_timeout_s=10)
    raises_retryable_within(QUICK_S, newcomer.open)
    assert newcomer.run_id is None

    server.start()  # same port, same database
    sink.write(second)  # the pipeline's retry of the failed batch
    sink.write(first)  # a batch delivered twice (its acknowledgement lost) stores nothing new
    assert steps_stored(server, sink.run_id, "loss") == list(range(1000))
    sink.close("FINISHED")
    assert server.run(sink.run_id or "")["info"]["status"] == "FINISHED"


def test_connection_reset_raises_retryable_error_and_a_retry_has_no_duplicates(
    mlflow_server: MlflowServer, proxy: FaultProxy, sinks: list[MLflowSink]
) -> None:
    sink = open_sink(sinks, proxy.url)
    sink.write(batch("loss", range(0, 100)))
    proxy.set("reset")
    later = [*batch("loss", range(100, 200)), Param("lr", 0.1, now_ms()), Tag("t", "x", now_ms())]
    raises_retryable_within(QUICK_S, lambda: sink.write(later))
    raises_retryable_within(QUICK_S, lambda: sink.upload(Artifact("a.txt", now_ms(), data=b"a")))
    assert proxy.faults >= 2

    proxy.set("pass")
    sink.write(later)
    assert steps_stored(mlflow_server, sink.run_id, "loss") == list(range(200))
    params = mlflow_server.run(sink.run_id or "")["data"]["params"]
    assert params == [{"key": "lr", "value": "0.1"}]


def test_http_503_raises_retryable_error_with_the_servers_reason(
    mlflow_server: MlflowServer, proxy: FaultProxy, sinks: list[MLflowSink]
) -> None:
    sink = open_sink(sinks, proxy.url)
    proxy.set("503")
    error = raises_retryable_within(QUICK_S, lambda: sink.write(batch("loss", range(50))))
    assert "503" in str(error) and "TEMPORARILY_UNAVAILABLE" in str(error)
    raises_retryable_within(QUICK_S, lambda: sink.upload(Artifact("a.txt", now_ms(), data=b"a")))
    raises_retryable_within(QUICK_S, lambda: sink.close("FINISHED"))
    assert mlflow_server.metric_history(sink.run_id or "", "loss") == []

    proxy.set("pass")
    sink.write(batch("loss", range(50)))
    sink.close("FAILED")  # the retried close ends the run
    assert steps_stored(mlflow_server, sink.run_id, "loss") == list(range(50))
    assert mlflow_server.run(sink.run_id or "")["info"]["status"] == "FAILED"


def test_server_slower_than_the_timeout_raises_retryable_error_in_time_and_no_duplicates(
    mlflow_server: MlflowServer, proxy: FaultProxy, sinks: list[MLflowSink]
) -> None:
    timeout_s, delay_s = 1.0, 3.0
    sink = open_sink(sinks, proxy.url, timeout_s=timeout_s)
    records = batch("loss", range(300))
    proxy.set("delay", delay_s, only=b"/runs/log-batch")
    start = time.monotonic()
    with pytest.raises(RetryableError, match="timed out"):
        sink.write(records)
    elapsed = time.monotonic() - start
    assert timeout_s * 0.9 <= elapsed < timeout_s + 1.0, f"took {elapsed:.2f} s"

    # The request the sink gave up on still reaches the server, late...
    assert wait_until(lambda: len(steps_stored(mlflow_server, sink.run_id, "loss")) == 300,
                      15, interval_s=0.1)
    # ...and the pipeline's retry of the same batch adds nothing.
    proxy.set("pass")
    sink.write(records)
    assert steps_stored(mlflow_server, sink.run_id, "loss") == list(range(300))


def test_open_retried_after_a_lost_answer_reuses_the_run_it_created(
    mlflow_server: MlflowServer, proxy: FaultProxy, sinks: list[MLflowSink]
) -> None:
    name = f"faults-open-{uuid.uuid4().hex[:8]}"
    sink = MLflowSink(name, tracking_uri=proxy.url, request_timeout_s=0.5)
    sinks.append(sink)
    proxy.set("delay", 1.5, only=b"/runs/create")
    with pytest.raises(RetryableError):
        sink.open()
    assert sink.run_id is None

    def runs() -> list[dict[str, Any]]:
        exp = mlflow_server.api("experiments/get-by-name", experiment_name=name)["experiment"]
        found = mlflow_server.api(
            "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 10}
        )
        result: list[dict[str, Any]] = found.get("runs", [])
        return result

    # The late create did create a run.
    assert wait_until(lambda: len(runs()) == 1, 15, interval_s=0.1)
    proxy.set("pass")
    sink.open()  # the pipeline's retry
    (only_run,) = runs()
    assert sink.run_id == only_run["info"]["run_id"]


# -- through the logger: the pipeline's retries and bisection on top of the sink ----------------

FAST_RETRY = Options(retry=RetryPolicy(initial_s=0.05, max_s=0.5, jitter_s=0.05))


def test_logger_loses_nothing_and_duplicates_nothing_across_a_server_restart(
    restartable_mlflow_server: MlflowServer,
) -> None:
    server = restartable_mlflow_server
    logger = MLFlowLogger(
        f"faults-logger-{uuid.uuid4().hex[:8]}", tracking_uri=server.url, options=FAST_RETRY
    )
    try:
        for i in range(3000):
            logger.log_scalar("loss", i * 0.5, i)
        assert logger.flush(timeout=60)
        server.stop()
        start = time.monotonic()
        for i in range(3000, 6000):
            logger.log_scalar("loss", i * 0.5, i)
        logger.log_parameters({"lr": 0.01})
        assert time.monotonic() - start < 1.0  # the training loop never waits on the outage
        time.sleep(1.0)  # the worker meets the outage and retries
        assert not logger.flush(timeout=0.5)
        server.start()
        result = logger.close(timeout=90)
    finally:
        logger.close(timeout=10)
    assert result.ok and result.undelivered == 0 and result.rejected == 0, result
    assert steps_stored(server, logger.run_id, "loss") == list(range(6000))
    run = server.run(logger.run_id or "")
    assert run["info"]["status"] == "FINISHED"
    assert run["data"]["params"] == [{"key": "lr", "value": "0.01"}]


def test_logger_rides_out_resets_503s_and_timeouts_with_every_point_stored_once(
    mlflow_server: MlflowServer, proxy: FaultProxy
) -> None:
    logger = MLFlowLogger(
        f"faults-logger-{uuid.uuid4().hex[:8]}",
        tracking_uri=proxy.url,
        options=FAST_RETRY,
        request_timeout_s=1.0,
    )
    step = 0
    try:
        assert wait_until(lambda: logger.run_id is not None, 30, interval_s=0.1)  # run exists
        for mode in ("pass", "503", "reset", "delay", "pass"):
            proxy.set(mode, delay_s=2.0)
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                for _ in range(100):
                    logger.log_scalar("loss", step * 0.5, step)
                    step += 1
                time.sleep(0.05)
        result = logger.close(timeout=60)
    finally:
        proxy.set("pass")
        logger.close(timeout=10)
    assert result.ok and result.undelivered == 0, result
    assert logger.stats().retried > 0
    assert steps_stored(mlflow_server, logger.run_id, "loss") == list(range(step))


def test_logger_rejects_only_a_changed_param_and_a_bad_key_and_delivers_the_rest(
    mlflow_server: MlflowServer,
) -> None:
    logger = MLFlowLogger(f"faults-logger-{uuid.uuid4().hex[:8]}", tracking_uri=mlflow_server.url)
    try:
        with pytest.raises(ValueError, match="bad key!"):
            logger.log_scalar("bad key!", 1.0, 0)  # refused at the call, cheaply
        logger.log_parameters({"lr": 0.1})
        for i in range(100):
            logger.log_scalar("loss", float(i), i)
        logger.log_parameters({"lr": 0.2, "gamma": 0.99})  # same batch as the metrics around it
        for i in range(100, 200):
            logger.log_scalar("loss", float(i), i)
        result = logger.close(timeout=60)
    finally:
        logger.close(timeout=10)
    assert not result and result.rejected == 1 and result.undelivered == 1, result
    (rejection,) = result.losses
    assert "'lr' changed from '0.1' to '0.2'" in rejection.reason
    assert steps_stored(mlflow_server, logger.run_id, "loss") == list(range(200))
    params = {
        p["key"]: p["value"] for p in mlflow_server.run(logger.run_id or "")["data"]["params"]
    }
    assert params == {"lr": "0.1", "gamma": "0.99"}


def test_logger_close_on_a_dead_server_returns_within_its_timeout_and_counts_the_loss(
    restartable_mlflow_server: MlflowServer,
) -> None:
    server = restartable_mlflow_server
    logger = MLFlowLogger(
        f"faults-dead-{uuid.uuid4().hex[:8]}", tracking_uri=server.url, options=FAST_RETRY
    )
    assert logger.flush(timeout=60)  # the run exists
    server.stop()
    for i in range(100):
        logger.log_scalar("loss", float(i), i)
    start = time.monotonic()
    result = logger.close(timeout=2.0)
    elapsed = time.monotonic() - start
    assert elapsed < 3.0, f"close took {elapsed:.2f} s"
    assert not result
    assert result.undelivered == 100 and result.delivered == 0, result


def test_an_error_from_mlflows_client_never_carries_the_uris_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    client = MlflowClient(tracking_uri=f"http://user:S3cret@127.0.0.1:{free_port()}/prefix")
    with pytest.raises(RetryableError) as raised, _mlflow_errors():
        client.get_run("0" * 32)  # nothing listens there: MLflow quotes the URI it called
    assert "127.0.0.1" in str(raised.value) and "/prefix/api/" in str(raised.value)
    assert "S3cret" not in str(raised.value) and "user" not in str(raised.value)


@pytest.mark.parametrize("text, redacted", [
    ("http://user:S3cret@host:5000/api", "http://host:5000/api"),
    ("http://user:p@ss@host:5000/api", "http://host:5000/api"),  # urllib3 splits at the last @
    ("https://token@[::1]:5000/x and http://u:p@other/y", "https://[::1]:5000/x and http://other/y"),
    ("http://user:p?ss@host/x", "http://host/x"),  # MLflow quotes a URI it could not use
    ("http://user:p#ss@host/x", "http://host/x"),
    ("http://host:5000/x?owner=me@example.com", "http://host:5000/x?owner=me@example.com"),
    ("http://host/p@th and mail a@b.c", "http://host/p@th and mail a@b.c"),
])
def test_error_texts_lose_every_urls_user_and_password_and_keep_its_path(
    text: str, redacted: str,
) -> None:
    assert redact_text(text) == redacted
