"""The journal of a logger with a remote sink, and ``steplog sync``: nothing is lost to a kill -9
or to a server that is down, and a sync run twice stores nothing twice."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from journal_support import journaled
from mlflow_support import MlflowServer, free_port
from steplog import MLFlowLogger, Options, RetryPolicy
from steplog.cli import main
from steplog.journal import Journal
from steplog.records import Scalars
from steplog.runlog import RunJournal
from steplog.sinks.mlflow import MLflowSink
from waiting import wait_until

QUICK = RetryPolicy(initial_s=0.05, max_s=0.2, jitter_s=0.0, window_s=1.0)


def run_ids(runs: Path) -> set[str]:
    ids = set()
    for manifest in runs.rglob("run.json"):
        for info in json.loads(manifest.read_text())["sinks"].values():
            if info["target"].get("run_id"):
                ids.add(info["target"]["run_id"])
    return ids


def history(server: MlflowServer, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return [(m["step"], m["value"], m["timestamp"])
            for m in server.metric_history(run_id, key)]



def test_records_of_a_process_killed_with_kill_9_are_delivered_once_by_sync(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    flushed = tmp_path / "flushed"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time
        from steplog import MLFlowLogger, Options
        lg = MLFlowLogger("sync-kill9", tracking_uri={mlflow_server.url!r},
                          options=Options(drain_interval_s=0.01))
        for i in range(20_000):
            lg.log_scalar("x", float(i), i)
        assert lg.flush(60)
        for i in range(20_000, 40_000):  # at full speed: more than the server takes in 0.3 s
            lg.log_scalar("x", float(i), i)
        pathlib.Path({str(flushed)!r}).write_text(str(i))
        time.sleep(60)
    """)], env={**os.environ, "STEPLOG_RUNS_DIR": str(runs)}, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not flushed.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flushed.exists(), child.communicate(timeout=10)[1][-3000:]
        time.sleep(0.3)  # part of the second half journaled, not yet stored
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    kept = journaled(runs)
    steps = [r.step for r in kept]
    assert steps == list(range(len(steps)))  # the journal holds a gap-free prefix, in order
    assert len(steps) >= 20_000  # everything before the flush, at least
    (run_id,) = run_ids(runs)
    assert len(history(mlflow_server, run_id, "x")) < len(steps)  # the kill cut delivery short

    assert main(["sync", str(runs)]) == 0
    assert main(["sync", str(runs)]) == 0  # a second sync finds nothing left to send
    out = capsys.readouterr().out
    stored = history(mlflow_server, run_id, "x")
    assert sorted(s for s, _, _ in stored) == steps  # each journaled point exactly once
    assert {(r.step, r.value, r.timestamp) for r in kept} == set(stored)
    assert "0 stored, 0 still kept" in out
    assert not any(runs.rglob("journal"))  # delivered whole: the journal is gone


def test_a_run_logged_while_the_server_was_down_is_created_and_filled_by_sync(
    restartable_mlflow_server: MlflowServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = restartable_mlflow_server
    runs = tmp_path / "runs"
    server.stop()
    experiment = f"sync-down-{time.monotonic_ns()}"
    logger = MLFlowLogger(experiment, tracking_uri=server.url, tags={"team": "rl"},
                          options=Options(drain_interval_s=0.01, retry=QUICK,
                                          runs_dir=str(runs)))
    logger.log_parameters({"lr": 0.1})
    for i in range(500):
        logger.log_scalar("loss", 1.0 / (i + 1), i)
    result = logger.close(3)
    assert not result and result.undelivered >= 500
    assert result.sync is not None and result.sync.startswith("steplog sync ")
    assert main(["sync", str(runs)]) == 1  # still down: everything stays kept
    capsys.readouterr()

    server.start()
    assert main(["sync", result.sync.split(" ", 2)[2]]) == 0
    assert "501 records" in capsys.readouterr().out
    exp_id = server.api("experiments/get-by-name", experiment_name=experiment)[
        "experiment"]["experiment_id"]
    found = server.api("runs/search", {"experiment_ids": [exp_id]})["runs"]
    assert len(found) == 1  # created once, by the sync
    run_id = found[0]["info"]["run_id"]
    assert [s for s, _, _ in history(server, run_id, "loss")] == list(range(500))
    assert {p["key"]: p["value"] for p in found[0]["data"]["params"]} == {"lr": "0.1"}
    assert {t["key"]: t["value"] for t in found[0]["data"]["tags"]}["team"] == "rl"
    assert server.run(run_id)["info"]["status"] == "FINISHED"  # as the logger closed
    assert main(["sync", str(runs)]) == 0
    assert len(history(server, run_id, "loss")) == 500


def test_a_run_that_could_not_be_created_fails_the_close_and_a_later_sync_creates_and_ends_it(
    restartable_mlflow_server: MlflowServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = restartable_mlflow_server
    server.stop()
    experiment = f"sync-never-opened-{time.monotonic_ns()}"
    logger = MLFlowLogger(experiment, tracking_uri=server.url,
                          options=Options(drain_interval_s=0.01, retry=QUICK,
                                          runs_dir=str(tmp_path / "runs")))
    result = logger.close(3)  # nothing logged, but the run was asked for
    assert not result and result.undelivered == 0
    assert [loss.kind for loss in result.losses] == ["run"]
    assert "never opened" in result.losses[0].reason
    assert result.sync is not None
    assert main(["show", result.sync.split(" ", 2)[2]]) == 0
    shown = capsys.readouterr().out
    assert "its run is not ended FINISHED" in shown and result.sync in shown

    server.start()
    assert main(["sync", result.sync.split(" ", 2)[2]]) == 0
    assert "its run was ended" in capsys.readouterr().out
    exp_id = server.api("experiments/get-by-name", experiment_name=experiment)[
        "experiment"]["experiment_id"]
    (run,) = server.api("runs/search", {"experiment_ids": [exp_id]})["runs"]
    assert run["info"]["status"] == "FINISHED"


def test_a_journal_every_sink_acknowledged_is_removed_at_close(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    logger = MLFlowLogger("sync-clean", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          options=Options(drain_interval_s=0.01, runs_dir=str(runs)))
    for i in range(1000):
        logger.log_scalar("x", float(i), i)
    assert logger.flush(120)
    assert list(runs.rglob("journal"))  # kept while the logger is open
    result = logger.close(120)
    assert result and result.sync is None
    assert [p.name for p in runs.iterdir()] == ["delivered.jsonl"]  # the run's line only


def run_its_logger_delivered(tmp_path: Path) -> tuple[Path, str]:
    """The directory of a run (under ``tmp_path/runs``) whose logger delivered it whole into a
    sqlite store and removed it, and that store's URI."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    logger = MLFlowLogger("sync-clean", tracking_uri=uri,
                          options=Options(drain_interval_s=0.01, runs_dir=str(tmp_path / "runs")))
    run_dir = Path(logger.run_dir or "")
    logger.log_scalar("x", 1.0, 0)
    assert logger.close(120)
    assert not run_dir.exists()
    return run_dir, uri


def test_sync_of_the_run_directory_a_logger_delivered_whole_exits_0_saying_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, uri = run_its_logger_delivered(tmp_path)
    assert main(["sync", str(run_dir)]) == 0  # the command printed at the start
    out = capsys.readouterr().out
    assert f"{run_dir.name}: delivered whole by its logger at" in out
    assert f"mlflow -> mlflow {uri}" in out
    assert main(["show", str(run_dir)]) == 2
    assert "was delivered whole by its logger at" in capsys.readouterr().err


@pytest.mark.parametrize("removed", ["whole", "but for run.json"])
def test_a_run_another_sync_delivered_after_this_sync_listed_it_is_reported_delivered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    removed: str,
) -> None:
    import steplog.replay

    run_dir, _ = run_its_logger_delivered(tmp_path)  # after this sync listed it
    if removed == "but for run.json":  # the removal is under way: run.json goes last
        run_dir.mkdir()
        (run_dir / "run.json").write_text("{}")
    monkeypatch.setattr(steplog.replay, "find_runs", lambda path: iter([run_dir]))
    assert main(["sync", str(run_dir.parent)]) == 0
    assert f"{run_dir.name}: delivered whole by its logger at" in capsys.readouterr().out
    assert not (run_dir / "journal").exists()  # not made again


def test_a_run_journal_that_cannot_write_its_manifest_leaves_the_journal_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import steplog.runlog
    from sinks_for_tests import JournaledListSink
    from steplog.journal import JournalView

    def full(path: Path, data: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(steplog.runlog, "replace_json", full)
    with pytest.raises(OSError, match="No space"):
        RunJournal(tmp_path / "run", [("journaled", JournaledListSink())])
    assert not JournalView(tmp_path / "run" / "journal").held
    Journal.open(tmp_path / "run" / "journal").close()


def test_a_failed_progress_write_warns_once_and_the_records_are_still_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from steplog import SteplogWarning

    def full(self: Journal, consumer: str, seq: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Journal, "ack", full)
    runs = tmp_path / "runs"
    logger = MLFlowLogger("sync-ack", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          options=Options(drain_interval_s=0.01, runs_dir=str(runs)))
    with pytest.warns(SteplogWarning, match="could not record mlflow's progress") as caught:
        for i in range(100):
            logger.log_scalar("x", float(i), i)
        assert logger.flush(120)
        logger.log_scalar("x", 100.0, 100)
        assert logger.flush(120)
    assert sum("progress" in str(w.message) for w in caught) == 1
    result = logger.close(120)
    assert result.delivered == 101


def test_a_run_a_sync_could_not_end_keeps_its_journal_and_the_next_sync_ends_it(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fault_proxy import FaultProxy

    runs = tmp_path / "runs"
    experiment = f"sync-end-{time.monotonic_ns()}"
    with FaultProxy(mlflow_server.port, lifetime_s=120) as proxy:
        proxy.set("reset")  # down for the whole run
        logger = MLFlowLogger(experiment, tracking_uri=proxy.url,
                              options=Options(drain_interval_s=0.01, retry=QUICK,
                                              runs_dir=str(runs)))
        for i in range(5):
            logger.log_scalar("x", float(i), i)
        result = logger.close(30)
        assert not result and not result.timed_out and result.sync is not None
        proxy.set("reset", only=b"/runs/update")  # back, but a run cannot be ended
        assert main(["sync", "--timeout", "2", str(runs)]) == 1
        out = capsys.readouterr().out
        assert "5 records sent" in out and "its run was not ended" in out
        assert "frames still kept" not in out
        assert list(runs.rglob("journal"))  # kept: the run still has to be ended
        (run_id,) = run_ids(runs)
        assert mlflow_server.run(run_id)["info"]["status"] == "RUNNING"
        proxy.set("reset")  # down again: this sync stops before it can end the run
        assert main(["sync", "--timeout", "1", str(runs)]) == 1
        assert list(runs.rglob("journal"))  # still kept: the run still has to be ended
        proxy.set("pass")
        capsys.readouterr()
        assert main(["sync", str(runs)]) == 0
        assert "nothing to send; its run was ended" in capsys.readouterr().out
    assert mlflow_server.run(run_id)["info"]["status"] == "FINISHED"
    assert [s for s, _, _ in history(mlflow_server, run_id, "x")] == list(range(5))
    assert not any(runs.rglob("journal"))


def test_a_run_its_logger_could_not_end_keeps_its_journal_until_a_sync_ends_it(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fault_proxy import FaultProxy

    runs = tmp_path / "runs"
    with FaultProxy(mlflow_server.port, lifetime_s=120) as proxy:
        logger = MLFlowLogger(f"logger-end-{time.monotonic_ns()}", tracking_uri=proxy.url,
                              options=Options(drain_interval_s=0.01, retry=QUICK,
                                              runs_dir=str(runs)))
        for i in range(5):
            logger.log_scalar("x", float(i), i)
        assert logger.flush(30)
        proxy.set("reset", only=b"/runs/update")
        result = logger.close(30)
        assert not result and result.delivered == 5 and result.sync is not None
        run_id = logger.run_id or ""
        assert mlflow_server.run(run_id)["info"]["status"] == "RUNNING"
        proxy.set("pass")
        assert main(["sync", str(runs)]) == 0
    assert "its run was ended" in capsys.readouterr().out
    assert mlflow_server.run(run_id)["info"]["status"] == "FINISHED"
    assert not any(runs.rglob("journal"))


def test_a_sync_killed_while_it_ends_the_run_leaves_the_end_to_the_next_sync(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fault_proxy import FaultProxy

    runs = tmp_path / "runs"
    with FaultProxy(mlflow_server.port, lifetime_s=120) as proxy:
        proxy.set("reset")  # down for the whole run
        logger = MLFlowLogger(f"sync-killed-{time.monotonic_ns()}", tracking_uri=proxy.url,
                              options=Options(drain_interval_s=0.01, retry=QUICK,
                                              runs_dir=str(runs)))
        for i in range(5):
            logger.log_scalar("x", float(i), i)
        assert not logger.close(30).timed_out
        proxy.set("delay", delay_s=60, only=b"/runs/update")  # the end hangs
        sync = subprocess.Popen([sys.executable, "-m", "steplog.cli", "sync", str(runs)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not run_ids(runs) and time.monotonic() < deadline:
                time.sleep(0.05)
            (run_id,) = run_ids(runs)
            while (len(history(mlflow_server, run_id, "x")) < 5
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            time.sleep(0.5)  # every frame written and acknowledged; the end is under way
        finally:
            os.killpg(sync.pid, signal.SIGKILL)
            sync.communicate(timeout=30)
        assert mlflow_server.run(run_id)["info"]["status"] == "RUNNING"
        proxy.set("pass")
        assert main(["sync", str(runs)]) == 0
        assert "nothing to send; its run was ended" in capsys.readouterr().out
    assert mlflow_server.run(run_id)["info"]["status"] == "FINISHED"
    assert [s for s, _, _ in history(mlflow_server, run_id, "x")] == list(range(5))


@pytest.mark.parametrize("part", ["journal", "run.json", "journal/lock"])
def test_sync_of_a_part_of_a_run_directory_syncs_that_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], part: str
) -> None:
    runs = tmp_path / "runs"
    logger = MLFlowLogger("sync-part", tracking_uri=f"http://127.0.0.1:{free_port()}",
                          options=Options(runs_dir=str(runs), retry=QUICK))
    logger.log_scalar("x", 1.0, 0)
    result = logger.close(30)
    assert not result and not result.timed_out
    run_dir = Path(logger.run_dir or "")
    target = run_dir / part
    if not target.exists():
        target = next((run_dir / "journal").iterdir())  # any file of the journal
    assert main(["sync", "--timeout", "1", str(target)]) == 1  # the server is still down
    out = capsys.readouterr().out
    assert f"{run_dir.name} -> mlflow" in out and "1 frames still kept" in out


def test_sync_of_a_file_outside_any_run_exits_2(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    stray = tmp_path / "notes.txt"
    stray.write_text("not a run")
    assert main(["sync", str(stray)]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err


def test_journaling_can_be_turned_off(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    logger = MLFlowLogger("sync-off", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          options=Options(journal=False, runs_dir=str(runs)))
    logger.log_scalar("x", 1.0, 0)
    assert logger.close(120)
    assert not runs.exists()


def test_the_exit_line_names_the_sync_command_for_records_the_server_never_got(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from steplog import MLFlowLogger, Options
        lg = MLFlowLogger("sync-exit", tracking_uri="http://127.0.0.1:{free_port()}",
                          options=Options(exit_timeout_s=2))
        for i in range(100):
            lg.log_scalar("x", float(i), i)
    """)], env={**os.environ, "STEPLOG_RUNS_DIR": str(runs)}, capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 0, proc.stderr
    (run,) = [p.parent for p in runs.rglob("run.json")]
    assert f"steplog sync {run}" in proc.stderr
    assert len(journaled(runs)) == 100


def test_records_that_failed_mid_run_stay_journaled_and_sync_delivers_them_once(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fault_proxy import FaultProxy

    runs = tmp_path / "runs"
    with FaultProxy(mlflow_server.port, lifetime_s=120) as proxy:
        logger = MLFlowLogger("sync-midrun", tracking_uri=proxy.url,
                              options=Options(drain_interval_s=0.01, retry=QUICK,
                                              runs_dir=str(runs)))
        for i in range(100):
            logger.log_scalar("x", float(i), i)
        assert logger.flush(30)
        proxy.set("reset", only=b"/runs/log-batch")
        for i in range(100, 200):
            logger.log_scalar("x", float(i), i)
        assert not logger.flush(30)  # retries ran out: failed
        proxy.set("pass")
        for i in range(200, 300):
            logger.log_scalar("x", float(i), i)
        result = logger.close(30)
        run_id = logger.run_id or ""
        assert not result and result.failed == 100 and result.sync is not None
        assert len(history(mlflow_server, run_id, "x")) == 200  # 100-199 missing
        assert main(["sync", str(runs)]) == 0
    steps = sorted(s for s, _, _ in history(mlflow_server, run_id, "x"))
    assert steps == list(range(300))  # the gap filled, nothing twice
    assert "0 stored, 0 still kept" in capsys.readouterr().out


def test_a_refusal_of_the_whole_request_keeps_the_journal_for_a_later_sync(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    logger = MLFlowLogger("sync-deleted", tracking_uri=mlflow_server.url,
                          options=Options(drain_interval_s=0.01, retry=QUICK,
                                          runs_dir=str(runs)))
    logger.log_scalar("x", 0.0, 0)
    assert logger.flush(30)
    run_id = logger.run_id or ""
    mlflow_server.api("runs/delete", {"run_id": run_id})  # the run is gone, for now
    for i in range(1, 50):
        logger.log_scalar("x", float(i), i)
    result = logger.close(10)
    assert not result and result.sync is not None  # refused, but kept: a sync can fix it
    assert main(["sync", str(runs)]) == 1  # still deleted: kept again
    capsys.readouterr()
    mlflow_server.api("runs/restore", {"run_id": run_id})
    assert main(["sync", str(runs)]) == 0
    assert sorted(s for s, _, _ in history(mlflow_server, run_id, "x")) == list(range(50))
    assert mlflow_server.run(run_id)["info"]["status"] == "FINISHED"


def test_a_close_whose_deadline_passes_while_the_journal_is_closing_still_names_the_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    finishing = threading.Event()
    may_finish = threading.Event()
    finish = RunJournal.finish

    def slow_finish(self: RunJournal, unended: dict[str, str] | None = None) -> bool:
        finishing.set()  # a slow disk under the journal's last write
        may_finish.wait(10)
        return finish(self, unended)

    monkeypatch.setattr(RunJournal, "finish", slow_finish)
    logger = MLFlowLogger("sync-slow-close", tracking_uri=f"http://127.0.0.1:{free_port()}",
                          options=Options(drain_interval_s=0.01, retry=QUICK,
                                          runs_dir=str(tmp_path / "runs")))
    logger.log_scalar("x", 1.0, 0)
    result = logger.close(4)  # the lane gives up after ~1 s, then the journal closes slowly
    may_finish.set()
    assert finishing.is_set() and result.timed_out
    assert result.sync is not None and result.sync.startswith("steplog sync ")


def test_an_unwritable_runs_directory_warns_and_the_logger_still_delivers(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from steplog import SteplogWarning

    with pytest.warns(SteplogWarning, match="cannot journal"):
        logger = MLFlowLogger("sync-nodir", tracking_uri=mlflow_server.url,
                              options=Options(runs_dir="/dev/null/runs"))
    logger.log_scalar("x", 1.0, 0)
    result = logger.close(30)
    assert result and logger.run_dir is None


def test_show_says_what_each_sink_still_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    logger = MLFlowLogger("sync-show", tracking_uri=f"http://127.0.0.1:{free_port()}",
                          options=Options(drain_interval_s=0.01, retry=QUICK,
                                          runs_dir=str(runs)))
    logger.log_parameters({"seed": 1})
    for i in range(10):
        logger.log_scalar("x", float(i), i)
    result = logger.close(3)
    assert not result and result.sync is not None
    run_dir = result.sync.split(" ", 2)[2]
    assert main(["show", run_dir]) == 0
    out = capsys.readouterr().out
    assert "closed with FINISHED" in out
    assert "run not created yet" in out and "lacks 11 records" in out
    assert f"steplog sync {run_dir}" in out


def test_past_its_disk_budget_the_journal_stops_with_one_error_and_delivery_goes_on(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from steplog import JournalStoppedError, SteplogWarning

    runs = tmp_path / "runs"
    logger = MLFlowLogger("sync-budget", tracking_uri=mlflow_server.url,
                          options=Options(drain_interval_s=0.01, runs_dir=str(runs),
                                          journal_max_bytes=4096))
    raised = []
    with pytest.warns(SteplogWarning, match="journal .* stopped"):
        for i in range(5000):
            try:
                logger.log_scalar("x", float(i), i)
            except JournalStoppedError as exc:
                raised.append(str(exc))
        assert logger.flush(60)  # delivered: flush does not raise
        try:
            logger.log_scalar("x", 5000.0, 5000)
        except JournalStoppedError as exc:
            raised.append(str(exc))
    assert len(raised) == 1
    assert "journal_max_bytes" in raised[0]
    assert logger.close(60)
    assert len(history(mlflow_server, logger.run_id or "", "x")) == 5001
    assert not any(runs.rglob("journal"))  # everything arrived: nothing left behind


def test_journal_options_are_checked() -> None:
    with pytest.raises(ValueError, match="journal_durability"):
        Options(journal_durability="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="journal_max_bytes"):
        Options(journal_max_bytes=0)
    with pytest.raises(ValueError, match="journal_max_bytes must be None or an int >= 16"):
        Options(journal_max_bytes=8)  # not even a segment's header


def test_the_journal_bookkeeping_forgets_frames_every_sink_went_past(tmp_path: Path) -> None:
    from sinks_for_tests import JournaledListSink

    journal = RunJournal(tmp_path / "run", [("journaled", JournaledListSink())])
    try:
        for i in range(1000):
            journal.append([Scalars([("x", float(i), i)], 0, True)], 1)
        journal.progress("journaled", 999, failed=False)
        time.sleep(1.05)  # progress is written at most once a second
        journal.progress("journaled", 1, failed=False)
        assert len(journal._ends) <= 2  # not one entry per frame of the whole run
        assert journal.journal.cursor("journaled") == 1000
    finally:
        journal.finish()


def journal_for(server: MlflowServer, run_dir: Path, points: int, per_frame: int = 100) -> str:
    """A run directory whose journal holds ``points`` scalars of "x" for a run of ``server``
    that was never created (as a logger writes it); the experiment's name."""
    experiment = f"sync-progress-{time.monotonic_ns()}"
    journal = RunJournal(run_dir, [("mlflow", MLflowSink(experiment, tracking_uri=server.url))])
    for base in range(0, points, per_frame):
        rows = [("x", float(i), i) for i in range(base, min(points, base + per_frame))]
        journal.append([Scalars(rows, 1_000 + base, True)], len(rows))
    journal.write_manifest("FINISHED")
    assert journal.finish()
    return experiment


def test_not_on_a_terminal_sync_prints_one_summary_line_per_sink_and_no_progress(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    journal_for(mlflow_server, run_dir, 3000)
    assert main(["sync", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # nothing per frame
    (line,) = [x for x in out.splitlines() if x.startswith("run ")]
    where = re.escape(mlflow_server.url) + r"/#/experiments/\d+/runs/\w+"
    assert re.fullmatch(
        r"run +run -> mlflow: 3000 records sent in \d+\.\d s \([\d,]+ records/s\), "
        rf"0 refused by the backend, into {where}", line), line


def test_on_a_terminal_sync_shows_one_line_per_sink_updated_in_place(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    journal_for(mlflow_server, run_dir, 3000)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "steplog.cli", "sync", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 0.2)[0]:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                shown += data
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    text = shown.decode()
    assert "\n" not in text  # one line, rewritten in place: nothing scrolls
    frames = [f for f in text.split("\r") if f.strip("\x1b[K")]
    assert frames[0] == "run -> mlflow: 0/3,000 records (0.0%), -- records/s, ETA --\x1b[K"
    assert re.fullmatch(r"run -> mlflow: 3,000/3,000 records \(100\.0%\), [\d,]+ records/s, "
                        r"ETA 0 s\x1b\[K", frames[-1]), frames[-1]
    assert text.endswith("\r\x1b[K")  # cleared for the summary
    assert "run -> mlflow: 3000 records sent" in out


def test_a_frame_this_steplog_cannot_decode_stops_the_sink_and_stays_kept(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    experiment = f"sync-undecodable-{time.monotonic_ns()}"
    journal = RunJournal(run_dir, [("mlflow", MLflowSink(experiment,
                                                        tracking_uri=mlflow_server.url))])
    journal.append([Scalars([("x", 1.0, 0)], 1_000, True)], 1)
    journal.journal.append(b"\x91\xc1")  # a whole frame (its checksum holds), not a batch
    journal.append([Scalars([("x", 2.0, 1)], 1_001, True)], 1)
    journal.write_manifest("FINISHED")
    assert journal.finish()
    assert main(["sync", str(run_dir)]) == 1
    assert "frame 2 cannot be decoded by this steplog" in capsys.readouterr().out
    with Journal.open(run_dir / "journal") as kept:
        assert kept.cursor("mlflow") == 1  # stopped before the frame it cannot read
        assert [seq for seq, _ in kept.pending("mlflow")] == [2, 3]


def test_the_printed_sync_command_quotes_a_run_directory_with_a_space(tmp_path: Path) -> None:
    import shlex

    runs = tmp_path / "my runs"
    logger = MLFlowLogger("sync-quoted", tracking_uri=f"http://127.0.0.1:{free_port()}",
                          options=Options(runs_dir=str(runs), retry=QUICK))
    logger.log_scalar("x", 1.0, 0)
    result = logger.close(2)
    assert result.sync is not None
    program, command, where = shlex.split(result.sync)
    assert (program, command) == ("steplog", "sync")
    assert Path(where).parent == runs


def test_the_run_directory_is_printed_once_when_the_logger_starts(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    logger = MLFlowLogger("sync-printed", tracking_uri=f"http://127.0.0.1:{free_port()}",
                          options=Options(runs_dir=str(tmp_path), retry=QUICK))
    err = capfd.readouterr().err
    assert err.count("steplog: journal in ") == 1
    assert f"steplog: journal in {logger.run_dir} " in err
    logger.close(0.5)


def test_a_logger_killed_while_it_ends_its_run_after_a_flush_leaves_the_end_to_sync(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fault_proxy import FaultProxy

    runs, flushed = tmp_path / "runs", tmp_path / "flushed"
    experiment = f"sync-killed-closing-{time.monotonic_ns()}"
    with FaultProxy(mlflow_server.port, lifetime_s=120) as proxy:
        proxy.set("delay", delay_s=60, only=b"/runs/update")  # ending the run hangs
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import pathlib, steplog
            lg = steplog.MLFlowLogger({experiment!r}, tracking_uri={proxy.url!r},
                                      options=steplog.Options(runs_dir={str(runs)!r}))
            for i in range(100):
                lg.log_scalar("x", float(i), i)
            assert lg.flush(60)  # every cursor at the end
            pathlib.Path({str(flushed)!r}).touch()
            lg.close(60)  # ends the run: hangs, and the process is killed meanwhile
        """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not flushed.exists():
                assert time.monotonic() < deadline and child.poll() is None, child.stderr
                time.sleep(0.02)
            time.sleep(2.0)  # the close is ending the run now
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate(timeout=30)
        (run_id,) = run_ids(runs)
        assert mlflow_server.run(run_id)["info"]["status"] == "RUNNING"
        proxy.set("pass")
        assert main(["sync", str(runs)]) == 0
        assert "nothing to send; its run was ended" in capsys.readouterr().out
    assert mlflow_server.run(run_id)["info"]["status"] == "FINISHED"
    assert len(history(mlflow_server, run_id, "x")) == 100


def test_a_damaged_frame_is_reported_lost_and_the_sync_exits_1(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    journal_for(mlflow_server, run_dir, 300)  # frames 1-3, steps 0-299
    (segment,) = (run_dir / "journal").glob("*.seg")
    with Journal.open(run_dir / "journal") as journal:
        frames = [(seq, len(payload)) for seq, payload in journal.read()]
    data = bytearray(segment.read_bytes())
    middle = data.find(msgspec_step(150))  # a byte of frame 2's payload
    assert middle > 0 and len(frames) == 3
    data[middle] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert main(["sync", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "200 records sent" in out and "LOST" in out and "frame 2 fails its checksum" in out
    assert main(["sync", str(run_dir)]) == 0  # nothing is left that a sync could deliver
    assert "delivered, except what the journal had lost" in capsys.readouterr().out


def msgspec_step(step: int) -> bytes:
    """How the journal encodes the row of "x" at ``step`` (value == step)."""
    import msgspec

    return msgspec.msgpack.encode(["x", float(step), step])


def test_frames_missing_at_the_end_of_the_journal_are_reported_lost_once(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    journal_for(mlflow_server, run_dir, 200)  # frames 1-2
    # A segment the journal rolled to, whose data never reached the disk (a power cut).
    (run_dir / "journal" / f"{3:020d}.seg").write_bytes(b"\0" * 4096)
    assert main(["sync", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "200 records sent" in out, out
    assert "LOST" in out and "frames 3-3 are no longer in the journal" in out
    assert main(["sync", str(run_dir)]) == 0
    assert "delivered, except what the journal had lost" in capsys.readouterr().out
    assert not (run_dir / "journal").exists()


def test_sync_says_why_the_backend_refused_records(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from steplog.records import Param

    run_dir = tmp_path / "run"
    experiment = f"sync-refused-{time.monotonic_ns()}"
    journal = RunJournal(run_dir, [("mlflow", MLflowSink(experiment,
                                                        tracking_uri=mlflow_server.url))])
    journal.append([Param("lr", "1", 1_000)], 1)
    journal.append([Param("lr", "2", 1_001), Scalars([("x", 1.0, 0)], 1_001, True)], 2)
    journal.write_manifest("FINISHED")
    assert journal.finish()
    assert main(["sync", str(run_dir)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("run ")]
    assert "3 records sent" in line and "1 refused by the backend (" in line, line
    assert "lr" in line.split("refused by the backend (", 1)[1]


def test_sync_to_a_uri_that_cannot_be_parsed_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "runs").mkdir()
    assert main(["sync", str(tmp_path / "runs"), "--to", "http://user:secret@[bad"]) == 2
    err = capsys.readouterr().err
    assert "cannot be parsed" in err and "secret" not in err


def test_a_runs_directory_on_a_full_disk_warns_and_the_logger_still_delivers(
    mlflow_server: MlflowServer, small_fs: Path
) -> None:
    from steplog import SteplogWarning

    filler = small_fs / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
        for _ in range(64):
            f.write(b"\0" * 4096)
    with pytest.warns(SteplogWarning, match="cannot journal in .*(full|No space left)"):
        logger = MLFlowLogger(f"sync-full-{time.monotonic_ns()}",
                              tracking_uri=mlflow_server.url,
                              options=Options(runs_dir=str(small_fs / "runs")))
    assert logger.run_dir is None
    logger.log_scalar("x", 1.0, 0)
    assert logger.close(60)
    assert len(history(mlflow_server, logger.run_id or "", "x")) == 1


def test_a_journal_no_sink_replays_is_compacted_as_it_goes(tmp_path: Path) -> None:
    from steplog import FileLogger

    logger = FileLogger(tmp_path / "out", options=Options(
        journal=True, journal_max_bytes=256 * 1024, runs_dir=str(tmp_path / "runs"),
        drain_interval_s=0.005))
    for i in range(200_000):  # about ten times the budget
        logger.log_scalar("x", float(i), i)
        if i % 5_000 == 0:
            assert logger.flush(30)
    result = logger.close(30)
    assert result and result.delivered == 200_000  # the journal never stopped the loop
    assert not any((tmp_path / "runs").rglob("*.seg"))


def test_an_idle_logger_writes_the_cursors_its_once_a_second_limit_held_back(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    logger = MLFlowLogger(f"sync-idle-{time.monotonic_ns()}", tracking_uri=mlflow_server.url,
                          options=Options(runs_dir=str(tmp_path / "runs")))
    try:
        for burst in range(3):  # bursts closer together than the once-a-second limit
            for i in range(100):
                logger.log_scalar("x", float(i), burst * 100 + i)
            assert wait_until(lambda b=burst: logger.stats().delivered == 100 * (b + 1),
                              timeout_s=30)
        journal = Path(logger.run_dir or "") / "journal"
        assert wait_until(lambda: cursor_of(journal) == last_seq_of(journal), timeout_s=15)
    finally:
        assert logger.close(30)


def cursor_of(journal: Path) -> int:
    return int((journal / "cursor.mlflow").read_text())


def last_seq_of(journal: Path) -> int:
    """The newest frame's seq, read without opening the journal its logger holds."""
    from steplog.journal import JournalView

    return max(seq for seq, _ in JournalView(journal).read())


def test_the_exit_line_says_which_records_a_stopped_journal_does_not_keep(
    tmp_path: Path,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import warnings, steplog
        warnings.simplefilter("ignore")
        lg = steplog.MLFlowLogger("exp", tracking_uri={url!r}, options=steplog.Options(
            exit_timeout_s=1.0, journal_max_bytes=64 * 1024, runs_dir={str(tmp_path)!r}))
        for i in range(20_000):
            try:
                lg.log_scalar("loss", float(i), i)
            except steplog.JournalStoppedError:
                pass
    """)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("steplog: at exit")]
    assert "20000 of 20000 records were not delivered" in line
    assert "stopped" in line and "so it keeps only those logged before" in line
    assert "the journal keeps them" not in line


def test_a_segment_of_a_newer_format_stays_kept_and_is_not_called_lost(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import struct

    run_dir = tmp_path / "run"
    journal_for(mlflow_server, run_dir, 300)
    (segment,) = (run_dir / "journal").glob("*.seg")
    data = bytearray(segment.read_bytes())
    struct.pack_into("<I", data, 8, 2)  # a format version this steplog cannot read
    segment.write_bytes(bytes(data))
    assert main(["sync", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "format version 2" in out and "stay kept" in out and "LOST" not in out
    assert (run_dir / "journal").is_dir() and (run_dir / "run.json").is_file()


def test_a_timed_out_close_marks_only_the_runs_it_did_not_end(tmp_path: Path) -> None:
    from sinks_for_tests import JournaledListSink
    from steplog import Logger

    class SlowEnd(JournaledListSink):
        def close(self, status: str) -> None:
            time.sleep(3.0)
            super().close(status)

    fast, slow = JournaledListSink(), SlowEnd()
    logger = Logger(sinks=[fast, slow], options=Options(runs_dir=str(tmp_path)))
    logger.log_scalar("x", 1.0, 0)
    assert logger.flush(30)
    result = logger.close(1.0)
    assert result.timed_out and fast.closed_with == "FINISHED"
    (manifest,) = tmp_path.rglob("run.json")
    marks = {c: info.get("end_failed") for c, info in
             json.loads(manifest.read_text())["sinks"].items()}
    (unended,) = [why for why in marks.values() if why is not None]  # the slow sink's only
    assert len(marks) == 2 and "close deadline passed" in unended, marks
