"""``steplog sync RUN_DIR --to URI``: what an MLflow run lacks goes to a new run at ``URI``, once,
and an interrupted move continues into that same run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from fault_proxy import FaultProxy
from mlflow_support import MlflowServer, free_port
from steplog import MLFlowLogger, Options, RetryPolicy
from steplog.cli import main
from steplog.journal import Journal, JournalLockedError
from steplog.records import Scalars
from steplog.replay import SinkReplay, replay_run
from steplog.runlog import RunJournal
from steplog.sinks import FileSink
from steplog.sinks.mlflow import MLflowSink

QUICK = RetryPolicy(initial_s=0.05, max_s=0.2, jitter_s=0.0, window_s=1.0)


def unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def journal_of_a_dead_server(runs: Path, experiment: str, points: int, **kwargs: Any) -> Path:
    """The run directory of a logger whose MLflow server never answered: it journaled a param
    and ``points`` scalars of "loss" (steps 0..points-1), in several frames, and closed."""
    logger = MLFlowLogger(experiment, tracking_uri=f"http://127.0.0.1:{free_port()}",
                          options=Options(drain_interval_s=0.01, retry=QUICK,
                                          runs_dir=str(runs)), **kwargs)
    logger.log_parameters({"lr": 0.1})
    for i in range(points):
        logger.log_scalar("loss", 1.0 / (i + 1), i)
        if i % 500 == 499:
            time.sleep(0.03)  # the drain takes a chunk: one frame each
    result = logger.close(3)
    assert not result and result.sync is not None
    run_dir = Path(result.sync.split(" ", 2)[2])
    released(run_dir)
    return run_dir


def released(run_dir: Path, deadline_s: float = 30.0) -> None:
    """Return once the logger's worker let go of the journal (a close that timed out returns
    while its worker is still winding down)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            Journal.open(run_dir / "journal").close()
            return
        except JournalLockedError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


def runs_of(server: MlflowServer, experiment: str) -> list[dict[str, Any]]:
    found = server.api("experiments/get-by-name", experiment_name=experiment)
    exp_id = found["experiment"]["experiment_id"]
    runs: list[dict[str, Any]] = server.api("runs/search", {"experiment_ids": [exp_id]})["runs"]
    return runs


def steps(server: MlflowServer, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m["step"] for m in server.metric_history(run_id, key))


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_sync_to_delivers_every_point_into_a_new_run_with_the_runs_name_tags_and_status(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = unique("to-new-run")
    run_dir = journal_of_a_dead_server(tmp_path / "runs", experiment, 2000, run_name="ppo-3",
                                       tags={"team": "rl"})
    assert main(["sync", str(run_dir), "--to", mlflow_server.url]) == 0
    out = capsys.readouterr().out
    assert "2001 records sent" in out and "moved from http://127.0.0.1:" in out
    (run,) = runs_of(mlflow_server, experiment)
    assert run["info"]["run_name"] == "ppo-3"
    assert run["info"]["status"] == "FINISHED"  # as the logger closed
    assert tags(run)["team"] == "rl"
    assert "never existed" in tags(run)["steplog.moved_from"]
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"lr": "0.1"}
    assert steps(mlflow_server, run["info"]["run_id"]) == list(range(2000))
    assert not run_dir.exists()  # delivered whole: removed


def test_sync_to_run_twice_makes_one_run_and_stores_nothing_twice(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = unique("to-twice")
    runs = tmp_path / "runs"
    journal_of_a_dead_server(runs, experiment, 1000)
    assert main(["sync", str(runs), "--to", mlflow_server.url]) == 0
    assert main(["sync", str(runs), "--to", mlflow_server.url]) == 0
    assert "0 stored, 0 still kept" in capsys.readouterr().out
    (run,) = runs_of(mlflow_server, experiment)
    assert steps(mlflow_server, run["info"]["run_id"]) == list(range(1000))


def test_a_second_sync_of_a_run_the_first_delivered_and_removed_exits_0_saying_nothing_is_left(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = unique("twice-removed")
    run_dir = journal_of_a_dead_server(tmp_path / "runs", experiment, 1000)
    assert main(["sync", str(run_dir), "--to", mlflow_server.url]) == 0
    assert not run_dir.exists()  # delivered whole: removed
    capsys.readouterr()
    assert main(["sync", str(run_dir)]) == 0  # a retry loop, a cron job
    out = capsys.readouterr().out
    assert f"{run_dir.name}: delivered whole by an earlier steplog sync" in out
    assert "nothing left to deliver" in out and mlflow_server.url in out
    (run,) = runs_of(mlflow_server, experiment)
    assert steps(mlflow_server, run["info"]["run_id"]) == list(range(1000))


def test_show_of_a_run_a_sync_delivered_and_removed_says_where_its_records_went(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = journal_of_a_dead_server(tmp_path / "runs", unique("show-removed"), 10)
    assert main(["sync", str(run_dir), "--to", mlflow_server.url]) == 0
    capsys.readouterr()
    assert main(["show", str(run_dir)]) == 2  # nothing left here to show
    err = capsys.readouterr().err
    assert "was delivered whole by steplog sync at" in err and mlflow_server.url in err


def test_a_run_directory_that_never_existed_beside_a_delivered_one_is_still_an_error(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = journal_of_a_dead_server(tmp_path / "runs", unique("never"), 10)
    assert main(["sync", str(run_dir), "--to", mlflow_server.url]) == 0
    capsys.readouterr()
    assert main(["sync", str(run_dir.with_name(run_dir.name + "x"))]) == 2
    assert "does not exist" in capsys.readouterr().err


def interrupted_move(server: MlflowServer, run_dir: Path, proxy: FaultProxy) -> SinkReplay:
    """A ``--to proxy`` sync that the network cuts off after its first 2,000 records."""

    def cut(r: SinkReplay) -> None:
        if r.records >= 2000:
            proxy.set("reset")

    (result,) = replay_run(run_dir, timeout_s=1, to=proxy.url, progress=cut)
    proxy.set("pass")
    assert result.error is not None and result.pending > 0
    assert 2000 <= result.records < 5000
    return result


@pytest.mark.parametrize("again", [["--to", "proxy"], []], ids=["same --to", "without --to"])
def test_an_interrupted_sync_to_is_continued_into_the_same_new_run(
    mlflow_server: MlflowServer, tmp_path: Path, again: list[str]
) -> None:
    experiment = unique("to-resumed")
    run_dir = journal_of_a_dead_server(tmp_path / "runs", experiment, 5000)
    with FaultProxy(mlflow_server.port, lifetime_s=120) as proxy:
        interrupted_move(mlflow_server, run_dir, proxy)
        (run,) = runs_of(mlflow_server, experiment)
        moved = json.loads((run_dir / "run.json").read_text())["sinks"]["mlflow"]
        assert moved["target"]["run_id"] == run["info"]["run_id"]  # recorded before resuming
        assert moved["moved_from"]["tracking_uri"] != proxy.url
        args = [proxy.url if a == "proxy" else a for a in again]
        assert main(["sync", str(run_dir), *args]) == 0
    (run,) = runs_of(mlflow_server, experiment)  # still one run
    assert steps(mlflow_server, run["info"]["run_id"]) == list(range(5000))  # each point once
    assert run["info"]["status"] == "FINISHED"


def test_sync_to_another_uri_after_a_move_is_refused_and_keeps_everything(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = unique("to-elsewhere")
    run_dir = journal_of_a_dead_server(tmp_path / "runs", experiment, 5000)
    with FaultProxy(mlflow_server.port, lifetime_s=120) as proxy:
        first = interrupted_move(mlflow_server, run_dir, proxy)
        assert main(["sync", str(run_dir), "--to", mlflow_server.url]) == 1
        out = capsys.readouterr().out
        assert "already moved to a new run at " + proxy.url in out
        assert f"steplog sync {run_dir} --to {proxy.url}" in out  # how to finish it
        assert main(["show", str(run_dir)]) == 0
        shown = capsys.readouterr().out
        assert f"mlflow: {proxy.url} run " in shown and "(moved from http://127.0.0.1:" in shown
        (run,) = runs_of(mlflow_server, experiment)  # no second run
        assert len(steps(mlflow_server, run["info"]["run_id"])) <= first.records
        assert main(["sync", str(run_dir), "--to", proxy.url]) == 0
    assert steps(mlflow_server, run["info"]["run_id"]) == list(range(5000))


def test_sync_to_refuses_a_sink_that_is_not_mlflow_and_moves_the_others(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = unique("to-file")
    files = tmp_path / "files"
    files.mkdir()
    run_dir = tmp_path / "runs" / "run"
    dead = MLflowSink(experiment, tracking_uri=f"http://127.0.0.1:{free_port()}")
    journal = RunJournal(run_dir, [("file", FileSink(files)), ("mlflow", dead)])
    for base in range(0, 300, 100):
        journal.append([Scalars([("x", float(i), i) for i in range(base, base + 100)], 1, True)],
                       100)
    journal.write_manifest("FINISHED")
    assert journal.finish()

    assert main(["sync", str(run_dir), "--to", mlflow_server.url]) == 1
    out = capsys.readouterr().out
    assert "a file sink cannot be moved to an MLflow run" in out
    (run,) = runs_of(mlflow_server, experiment)
    assert steps(mlflow_server, run["info"]["run_id"], "x") == list(range(300))
    assert not (files / "scalars.jsonl").exists()  # refused: nothing went to the file run

    assert main(["sync", str(run_dir)]) == 0  # without --to it goes where it was going
    assert len((files / "scalars.jsonl").read_text().splitlines()) == 300
    assert len(runs_of(mlflow_server, experiment)) == 1
    assert not run_dir.exists()


def test_kept_uploads_follow_their_run_to_the_new_run(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = unique("to-uploads")
    runs = tmp_path / "runs"
    notes = tmp_path / "notes.txt"
    notes.write_text("kept, then moved")
    with FaultProxy(mlflow_server.port, lifetime_s=120) as proxy:
        logger = MLFlowLogger(experiment, tracking_uri=proxy.url,
                              options=Options(drain_interval_s=0.01, retry=QUICK,
                                              runs_dir=str(runs)))
        logger.log_scalar("loss", 0.0, 0)
        assert logger.flush(30)
        original = logger.run_id
        proxy.set("reset")  # the server is gone for this logger
        logger.log_scalar("loss", 1.0, 1)
        logger.log_artifact(notes)
        result = logger.close(5)
        assert not result and result.sync is not None
        released(Path(result.sync.split(" ", 2)[2]))
    assert main(["sync", str(runs), "--to", mlflow_server.url]) == 0
    out = capsys.readouterr().out
    assert "1 stored, 0 still kept" in out and "new run at " + mlflow_server.url in out
    (new,) = [r for r in runs_of(mlflow_server, experiment) if r["info"]["run_id"] != original]
    new_id = new["info"]["run_id"]
    assert steps(mlflow_server, new_id) == [1]  # only what the original run lacked
    assert {a["path"] for a in mlflow_server.artifacts(new_id)} == {"notes.txt"}
    assert tags(new)["steplog.moved_from"].endswith(f"run {original}")
    assert mlflow_server.run(new_id)["info"]["status"] == "FINISHED"
    assert not any(runs.rglob("upload.json"))


def test_kept_uploads_of_a_run_whose_records_all_arrived_move_to_a_new_run_of_their_own(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = unique("to-uploads-only")
    runs = tmp_path / "runs"
    notes = tmp_path / "notes.txt"
    notes.write_text("only this is missing")
    with FaultProxy(mlflow_server.port, lifetime_s=120) as proxy:
        logger = MLFlowLogger(experiment, tracking_uri=proxy.url,
                              options=Options(drain_interval_s=0.01, retry=QUICK,
                                              runs_dir=str(runs)))
        assert logger.flush(30)
        original = logger.run_id
        proxy.set("reset", only=b"/mlflow-artifacts/")  # the artifact store alone is gone
        logger.log_scalar("loss", 1.0, 1)
        logger.log_artifact(notes)
        result = logger.close(30)
        assert not result and result.sync is None  # every record arrived: no journal kept
    (kept,) = runs.rglob("upload.json")
    assert main(["sync", str(runs), "--to", mlflow_server.url]) == 0
    assert main(["sync", str(runs), "--to", mlflow_server.url]) == 0
    assert "0 stored, 0 still kept" in capsys.readouterr().out
    (new,) = [r for r in runs_of(mlflow_server, experiment) if r["info"]["run_id"] != original]
    assert {a["path"] for a in mlflow_server.artifacts(new["info"]["run_id"])} == {"notes.txt"}
    assert tags(new)["steplog.moved_from"].endswith(f"run {original}")
    assert not kept.exists()


def test_sync_to_a_uri_mlflow_cannot_use_is_refused_before_anything_moves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = journal_of_a_dead_server(tmp_path / "runs", unique("to-bad"), 10)
    before = (run_dir / "run.json").read_text()
    assert main(["sync", str(run_dir), "--to", "localhost:5000"]) == 2
    assert "did you mean http://localhost:5000" in capsys.readouterr().err
    assert (run_dir / "run.json").read_text() == before


def test_sync_to_a_local_file_store_is_refused_before_anything_moves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = journal_of_a_dead_server(tmp_path / "runs", unique("to-file"), 10)
    before = (run_dir / "run.json").read_text()
    assert main(["sync", str(run_dir), "--to", str(tmp_path / "mlruns")]) == 2
    assert "local file store" in capsys.readouterr().err
    assert (run_dir / "run.json").read_text() == before


def test_a_move_whose_new_run_was_never_created_can_be_sent_elsewhere(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = unique("to-nowhere")
    run_dir = journal_of_a_dead_server(tmp_path / "runs", experiment, 1000)
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert main(["sync", str(run_dir), "--to", nowhere, "--timeout", "1"]) == 1
    capsys.readouterr()
    assert main(["sync", str(run_dir), "--to", mlflow_server.url]) == 0
    (run,) = runs_of(mlflow_server, experiment)
    assert steps(mlflow_server, run["info"]["run_id"]) == list(range(1000))
    assert not (run_dir / "journal").exists()  # everything arrived there
