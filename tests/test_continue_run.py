"""Logging on into a run: ``MLFlowLogger(run_id=...)`` continues an existing MLflow run (a job
restarted after a pre-emption), and ``Logger.continued()`` gives a closed logger's run a new
logger (a later stage of the same job)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import mlflow
import pytest

from fault_proxy import FaultProxy
from mlflow_support import MlflowServer
from sinks_for_tests import ListSink
from steplog import FileLogger, Logger, MLFlowLogger, Options, RetryPolicy, State
from steplog.cli import main
from steplog.errors import SteplogWarning
from steplog.sinks.file import read_series

pytestmark = pytest.mark.timeout(180)

FAST = Options(drain_interval_s=0.01)
QUICK = RetryPolicy(initial_s=0.05, max_s=0.2, jitter_s=0.0, window_s=1.0)


def experiment() -> str:
    return f"continue-{uuid.uuid4().hex[:8]}"


def steps(server: MlflowServer, run_id: str, key: str) -> list[int]:
    return [m["step"] for m in server.metric_history(run_id, key)]


def runs_of(server: MlflowServer, name: str) -> list[dict[str, object]]:
    exp_id = server.api("experiments/get-by-name", experiment_name=name)[
        "experiment"]["experiment_id"]
    runs: list[dict[str, object]] = server.api("runs/search",
                                               {"experiment_ids": [exp_id]}).get("runs", [])
    return runs


def logged(logger: Logger, start: int, stop: int) -> Logger:
    for i in range(start, stop):
        logger.log_scalar("loss", 1.0 / (i + 1), i)
    return logger


def test_run_id_logs_on_into_the_existing_run_and_ends_it_again(
    mlflow_server: MlflowServer,
) -> None:
    name = experiment()
    first = logged(MLFlowLogger(name, tracking_uri=mlflow_server.url, options=FAST), 0, 100)
    first.log_parameters({"lr": 0.1})
    assert first.close(60)
    run_id = first.run_id or ""
    assert mlflow_server.run(run_id)["info"]["status"] == "FINISHED"

    second = MLFlowLogger(name, tracking_uri=mlflow_server.url, run_id=run_id, options=FAST)
    logged(second, 100, 200)
    second.log_parameters({"lr": 0.1})  # unchanged: accepted again, as MLflow does
    assert second.flush(60)
    assert second.run_id == run_id
    assert mlflow_server.run(run_id)["info"]["status"] == "RUNNING"
    assert second.close(60, status="KILLED")

    assert steps(mlflow_server, run_id, "loss") == list(range(200))
    assert len(runs_of(mlflow_server, name)) == 1
    assert mlflow_server.run(run_id)["info"]["status"] == "KILLED"


def test_a_continued_run_in_the_embedded_store_keeps_the_fast_path(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = logged(MLFlowLogger("embedded", tracking_uri=uri, log_system_metrics=False,
                                max_in_flight=1, options=FAST), 0, 1000)
    assert first.close(120)
    second = first.continued()
    assert isinstance(second, MLFlowLogger) and second.options is first.options
    logged(second, 1000, 2000)
    assert second.flush(120)
    assert mlflow.MlflowClient(uri).get_run(first.run_id or "").info.status == "RUNNING"
    assert second.close(120)

    assert second.run_id == first.run_id
    assert second.stats().sinks["mlflow"].info == {"metrics_path": "sqlite fast path"}
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(first.run_id or "", "loss")
    assert sorted(m.step for m in history) == list(range(2000))
    assert client.get_run(first.run_id or "").info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("embedded").experiment_id])) == 1


def test_a_run_that_does_not_exist_is_refused_with_the_reason(
    mlflow_server: MlflowServer,
) -> None:
    missing = uuid.uuid4().hex
    logger = MLFlowLogger(experiment(), tracking_uri=mlflow_server.url, run_id=missing,
                          options=FAST)
    with pytest.warns(SteplogWarning, match=f"MLflow run {missing} does not exist"):
        logged(logger, 0, 10)
        result = logger.close(60)
    assert not result and result.rejected == 10
    assert any("does not exist" in loss.reason for loss in result.losses)


def test_a_deleted_run_is_refused_with_how_to_restore_it(mlflow_server: MlflowServer) -> None:
    name = experiment()
    first = logged(MLFlowLogger(name, tracking_uri=mlflow_server.url, options=FAST), 0, 5)
    assert first.close(60)
    mlflow_server.api("runs/delete", {"run_id": first.run_id})

    second = MLFlowLogger(name, tracking_uri=mlflow_server.url, run_id=first.run_id,
                          options=FAST)
    with pytest.warns(SteplogWarning, match="is deleted; restore it"):
        logged(second, 5, 10)
        result = second.close(60)
    assert not result and result.rejected == 5
    assert steps(mlflow_server, first.run_id or "", "loss") == list(range(5))


def test_a_run_of_another_experiment_is_refused(mlflow_server: MlflowServer) -> None:
    first = logged(MLFlowLogger(experiment(), tracking_uri=mlflow_server.url, options=FAST),
                   0, 5)
    assert first.close(60)
    other = experiment()
    second = MLFlowLogger(other, tracking_uri=mlflow_server.url, run_id=first.run_id,
                          options=FAST)
    with pytest.warns(SteplogWarning, match=f"belongs to experiment '{first.experiment_name}'"):
        logged(second, 5, 10)
        assert not second.close(60)
    assert steps(mlflow_server, first.run_id or "", "loss") == list(range(5))


def test_what_a_continued_run_could_not_deliver_is_synced_into_that_run(
    restartable_mlflow_server: MlflowServer, tmp_path: Path,
) -> None:
    server = restartable_mlflow_server
    runs = tmp_path / "runs"
    name = experiment()
    options = Options(drain_interval_s=0.01, retry=QUICK, runs_dir=str(runs))
    first = logged(MLFlowLogger(name, tracking_uri=server.url, options=options), 0, 100)
    assert first.close(60)

    server.stop()
    second = logged(first.continued(), 100, 300)
    result = second.close(3)
    assert not result and result.sync is not None
    server.start()
    assert main(["sync", str(runs)]) == 0

    assert steps(server, first.run_id or "", "loss") == list(range(300))
    assert len(runs_of(server, name)) == 1
    assert server.run(first.run_id or "")["info"]["status"] == "FINISHED"


def test_a_sync_of_a_continued_runs_kept_upload_does_not_leave_the_run_running(
    restartable_mlflow_server: MlflowServer, tmp_path: Path,
) -> None:
    server = restartable_mlflow_server
    runs = tmp_path / "runs"
    options = Options(drain_interval_s=0.01, retry=QUICK, runs_dir=str(runs))
    first = logged(MLFlowLogger(experiment(), tracking_uri=server.url, options=options), 0, 10)
    assert first.close(60)
    notes = tmp_path / "notes.txt"
    notes.write_text("stage two")

    server.stop()
    second = first.continued()
    second.log_artifact(notes)
    result = second.close(30)  # its run never opened: the upload is kept for a sync
    assert not result and not result.timed_out
    server.start()
    assert main(["sync", str(runs)]) == 0

    run_id = first.run_id or ""
    assert [a["path"] for a in server.artifacts(run_id)] == ["notes.txt"]
    assert server.run(run_id)["info"]["status"] == "FINISHED"


def test_a_journal_left_by_the_earlier_logger_leaves_the_status_to_the_later_one(
    restartable_mlflow_server: MlflowServer, tmp_path: Path,
) -> None:
    server = restartable_mlflow_server
    runs = tmp_path / "runs"
    options = Options(drain_interval_s=0.01, retry=QUICK, runs_dir=str(runs))
    first = logged(MLFlowLogger(experiment(), tracking_uri=server.url, options=options), 0, 10)
    assert first.flush(60)
    server.stop()
    logged(first, 10, 20)
    result = first.close(3)
    assert not result and result.sync is not None  # kept for a later sync
    server.start()

    second = logged(first.continued(), 20, 30)
    assert second.close(60, status="FAILED")
    assert main(["sync", str(runs)]) == 0  # the first logger's journal

    run_id = first.run_id or ""
    assert steps(server, run_id, "loss") == list(range(30))
    assert server.run(run_id)["info"]["status"] == "FAILED"


def test_sync_to_moves_the_journals_of_a_continued_run_into_one_new_run(
    mlflow_server: MlflowServer, tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    name = experiment()
    options = Options(drain_interval_s=0.01, retry=QUICK, runs_dir=str(runs))
    with FaultProxy(mlflow_server.port, lifetime_s=120) as proxy:
        first = logged(MLFlowLogger(name, tracking_uri=proxy.url, options=options), 0, 10)
        assert first.flush(60)
        proxy.set("reset")  # that server is gone for good: what is kept goes elsewhere
        logged(first, 10, 20)
        assert not first.close(3)
        second = logged(first.continued(), 20, 30)
        assert not second.close(3, status="FAILED")

    assert main(["sync", str(runs), "--to", mlflow_server.url]) == 0

    moved = [r for r in runs_of(mlflow_server, name)
             if r["info"]["run_id"] != first.run_id]  # type: ignore[index]
    (run,) = moved
    info: dict[str, str] = run["info"]  # type: ignore[assignment]
    assert steps(mlflow_server, info["run_id"], "loss") == list(range(10, 30))
    assert info["status"] == "FAILED"


def test_a_run_is_continued_once(tmp_path: Path) -> None:
    first = FileLogger(tmp_path / "run", options=FAST)
    assert first.close(10)
    second = first.continued()
    with pytest.raises(RuntimeError, match="already continued by another logger"):
        first.continued()
    assert second.close(10)
    assert second.continued().close(10)


def test_a_logger_whose_close_timed_out_cannot_be_continued(tmp_path: Path) -> None:
    logger = Logger(sinks=[ListSink(delay_s=0.5)], options=FAST)
    logger.log_scalar("loss", 1.0, 0)
    assert logger.close(0.05).timed_out
    with pytest.raises(RuntimeError, match="close timed out"):
        Logger._check_continuable(logger)


def test_a_run_of_one_rank_among_several_cannot_be_continued(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                        "STEPLOG_GROUP": f"g{time.monotonic_ns()}"}.items():
        monkeypatch.setenv(name, value)
    logger = MLFlowLogger(experiment(), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          options=Options(ranks="own", runs_dir=str(tmp_path / "runs")))
    assert logger.close(120)
    with pytest.raises(NotImplementedError, match="one run each"):
        logger.continued()


def test_continued_needs_the_logger_closed_first(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path / "run", options=FAST)
    with pytest.raises(RuntimeError, match="close this FileLogger before"):
        logger.continued()
    assert logger.close(10)
    logger.continued().close(10)


def test_a_file_logger_continued_appends_to_its_run(tmp_path: Path) -> None:
    first = logged(FileLogger(tmp_path / "run", logging_freq=3, options=FAST), 0, 10)
    assert first.close(10)
    second = first.continued()
    assert isinstance(second, FileLogger) and second.logging_freq == 3
    logged(second, 10, 20)
    assert second.close(10)
    assert [s for s, _ in read_series(tmp_path / "run" / "scalars.jsonl")["loss"]] == \
        list(range(20))
    assert not (tmp_path / "run" / "previous").exists()


def test_a_logger_of_your_own_sinks_cannot_be_continued() -> None:
    logger = Logger(sinks=[ListSink()], options=FAST)
    assert logger.close(10)
    with pytest.raises(NotImplementedError, match="cannot log on into a run it ended"):
        logger.continued()


def test_an_inert_ranks_logger_continues_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("STEPLOG_RANKS", raising=False)
    logger = MLFlowLogger(experiment(), tracking_uri="sqlite:///never-created.db")
    assert logger.state is State.INERT
    assert logger.continued() is logger


@pytest.mark.parametrize("policy", ["all", "own"])
def test_run_id_under_a_rank_policy_that_splits_the_run_is_refused_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, policy: str,
) -> None:
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                        "STEPLOG_GROUP": f"g{time.monotonic_ns()}"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="continues one run"):
        MLFlowLogger(experiment(), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                     run_id=uuid.uuid4().hex, options=Options(ranks=policy))


def test_run_id_must_be_a_non_empty_string() -> None:
    with pytest.raises(ValueError, match="run_id must be a non-empty str"):
        MLFlowLogger(experiment(), tracking_uri="sqlite:///x.db", run_id="  ")
