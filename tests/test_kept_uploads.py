"""An upload that fails after its retries stays on disk, is named in the result, and
``steplog sync`` stores it later where it was going."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mlflow_support import MlflowServer, free_port  # noqa: E402
from steplog import FileLogger, MLFlowLogger, Options, RetryPolicy, load_policy  # noqa: E402
from steplog.cli import main  # noqa: E402
from steplog.kept import find_kept  # noqa: E402


def quick(runs_dir: Path) -> Options:
    """Retries give up after about a second; kept uploads go to ``runs_dir``."""
    return Options(drain_interval_s=0.01, runs_dir=str(runs_dir),
                   retry=RetryPolicy(initial_s=0.05, max_s=0.2, jitter_s=0.0, window_s=1.0))


def test_a_checkpoint_that_does_not_fit_is_kept_and_synced_once_there_is_room(
    small_fs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    logger = FileLogger(small_fs, options=quick(runs))
    policy = torch.nn.Linear(100, 200)  # ~80 KB of weights: more than the 64 KiB file system
    logger.save_policy(policy, step=5)
    result = logger.flush(30)
    assert not result and result.failed == 1
    (loss,) = [loss for loss in result.losses if loss.kind == "failed"]
    assert "steplog sync" in loss.reason
    (kept,) = find_kept(runs)
    assert kept.sink == "file" and kept.artifact.kind == "policy" and kept.artifact.step == 5
    assert stat.S_IMODE(os.stat(kept.folder).st_mode) == 0o700
    assert "No space left" in kept.reason
    logger.close(10)

    proc = subprocess.run(["mount", "-o", "remount,size=4m", str(small_fs)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert main(["sync", str(runs)]) == 0
    assert "1 stored, 0 still kept" in capsys.readouterr().out
    state = load_policy(small_fs / "policy")
    assert torch.equal(state["weight"], policy.weight)
    assert json.loads((small_fs / "policy" / "step_5" / "meta.json").read_text())["step"] == 5
    assert list(find_kept(runs)) == []
    assert main(["sync", str(runs)]) == 0  # nothing left: a second sync stores nothing twice
    assert "0 stored, 0 still kept" in capsys.readouterr().out


def test_an_artifact_for_a_stopped_mlflow_server_is_kept_and_synced_after_it_returns(
    restartable_mlflow_server: MlflowServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = restartable_mlflow_server
    runs = tmp_path / "runs"
    logger = MLFlowLogger("kept-uploads", tracking_uri=server.url, options=quick(runs))
    assert logger.flush(60)  # the run exists
    run_id = logger.run_id or ""
    server.stop()
    policy = torch.nn.Linear(3, 1)
    logger.save_policy(policy)
    notes = tmp_path / "notes.txt"
    notes.write_text("kept too")
    logger.log_artifact(notes)
    result = logger.flush(30)
    assert not result and result.failed == 2
    assert len(list(find_kept(runs))) == 2
    logger.close(3)

    assert main(["sync", str(runs)]) == 1  # still down: both stay kept
    assert "0 stored, 2 still kept" in capsys.readouterr().out
    server.start()
    assert main(["sync", str(runs)]) == 0
    assert "2 stored, 0 still kept" in capsys.readouterr().out
    paths = {a["path"] for a in server.artifacts(run_id, "policy/step_0")}
    assert paths == {"policy/step_0/model.pth", "policy/step_0/meta.json"}
    assert "notes.txt" in {a["path"] for a in server.artifacts(run_id)}
    state = load_policy(f"runs:/{run_id}/policy/step_0", tracking_uri=server.url)
    assert torch.equal(state["weight"], policy.weight)


def test_an_artifact_of_a_run_that_never_opened_is_kept_and_synced_into_the_run_sync_creates(
    restartable_mlflow_server: MlflowServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = restartable_mlflow_server
    runs = tmp_path / "runs"
    server.stop()
    name = f"kept-unopened-{tmp_path.name}"
    logger = MLFlowLogger(name, tracking_uri=server.url, options=quick(runs))
    notes = tmp_path / "notes.txt"
    notes.write_text("logged while the server was down")
    logger.log_artifact(notes)
    logger.log_scalar("loss", 0.5, 0)
    result = logger.close(30)
    assert not result and not result.timed_out and result.failed == 2
    assert [k.artifact.name for k in find_kept(runs)] == ["notes.txt"]
    assert any("kept in" in loss.reason for loss in result.losses)

    server.start()
    assert main(["sync", str(runs)]) == 0
    assert "1 stored, 0 still kept" in capsys.readouterr().out
    exp_id = server.api("experiments/get-by-name", experiment_name=name)[
        "experiment"]["experiment_id"]
    (run,) = server.api("runs/search", {"experiment_ids": [exp_id]})["runs"]
    run_id = run["info"]["run_id"]
    assert "notes.txt" in {a["path"] for a in server.artifacts(run_id)}
    assert [m["step"] for m in server.metric_history(run_id, "loss")] == [0]


def test_a_file_logged_with_move_that_could_not_be_stored_keeps_its_source(
    tmp_path: Path,
) -> None:
    source = tmp_path / "ckpt.bin"
    source.write_bytes(b"weights")
    logger = MLFlowLogger("kept-move", tracking_uri=f"http://127.0.0.1:{free_port()}",
                          options=quick(tmp_path / "runs"))
    logger.log_file(source, "files", move=True)
    result = logger.close(30)
    assert not result and result.failed == 1
    assert source.read_bytes() == b"weights"
    assert [k.artifact.name for k in find_kept(tmp_path / "runs")] == ["files/ckpt.bin"]


def test_sync_of_a_path_that_does_not_exist_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sync", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_nothing_is_written_to_the_runs_directory_when_every_upload_succeeds(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    logger = FileLogger(tmp_path / "run", options=quick(runs))
    logger.save_policy(torch.nn.Linear(2, 2))
    assert logger.close(30)
    assert not runs.exists()


def test_sync_skips_payloads_named_like_a_manifest_and_reports_broken_manifests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    (runs / "r1" / "uploads" / "1-file" / "payload").mkdir(parents=True)
    (runs / "r1" / "uploads" / "1-file" / "payload" / "upload.json").write_text("{}")
    (runs / "r1" / "uploads" / "1-file" / "upload.json").write_text("not json")
    assert main(["sync", str(runs)]) == 1
    out = capsys.readouterr().out
    assert "skipped" in out and "0 stored, 1 still kept" in out


def test_a_relative_sqlite_destination_is_kept_as_an_absolute_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steplog.sinks.mlflow.sink import portable_uri

    monkeypatch.chdir(tmp_path)
    assert portable_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert portable_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert portable_uri("https://u:p@host:5000/x?token=s") == "https://host:5000/x"


def _kept_by_a_logger_that_cannot_reach_its_server(tmp_path: Path, *sources: Path,
                                                   name: str | None = None) -> Path:
    """Log each file to an MLflow server that is not there; the runs directory they are kept
    in."""
    runs = tmp_path / "runs"
    logger = MLFlowLogger("kept", tracking_uri=f"http://127.0.0.1:{free_port()}",
                          options=quick(runs))
    for source in sources:
        logger.log_artifact(source, name=name)
    assert not logger.close(30)
    return runs


def test_a_kept_payload_is_a_copy_of_the_callers_file_not_the_file_itself(tmp_path: Path) -> None:
    source = tmp_path / "ckpt.bin"
    source.write_bytes(b"epoch 1")
    runs = _kept_by_a_logger_that_cannot_reach_its_server(tmp_path, source)
    with open(source, "r+b") as f:  # rewritten in place, as torch.save(f) does
        f.write(b"epoch 9")
    (kept,) = find_kept(runs)
    assert kept.payload.read_bytes() == b"epoch 1"


def test_a_later_upload_of_the_same_name_that_is_stored_drops_the_kept_earlier_one(
    small_fs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"OLD" * 40_000)  # does not fit the 64 KiB file system
    new.write_bytes(b"NEW")
    logger = FileLogger(small_fs, options=quick(tmp_path / "runs"))
    logger.log_artifact(old, name="report.bin")
    assert not logger.flush(30)
    assert len(list(find_kept(tmp_path / "runs"))) == 1
    logger.log_artifact(new, name="report.bin")
    logger.close(30)
    assert list(find_kept(tmp_path / "runs")) == []
    assert main(["sync", str(tmp_path / "runs")]) == 0
    assert (small_fs / "report.bin").read_bytes() == b"NEW"


def test_a_sync_leaves_a_runs_uploads_to_another_sync_delivering_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import fcntl

    from steplog.kept import SYNC_LOCK

    source = tmp_path / "a.txt"
    source.write_text("a")
    runs = _kept_by_a_logger_that_cannot_reach_its_server(tmp_path, source)
    (kept,) = find_kept(runs)
    with open(kept.run_dir / "uploads" / SYNC_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a sync in another process holds it
        assert main(["sync", str(runs)]) == 1
    out = capsys.readouterr().out
    assert "another steplog sync is delivering" in out and "0 stored, 1 still kept" in out
    assert kept.payload.exists()


def test_keeping_never_changes_the_mode_of_a_shared_runs_directory(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chmod(runs, 0o1777)
    source = tmp_path / "a.txt"
    source.write_text("a")
    _kept_by_a_logger_that_cannot_reach_its_server(tmp_path, source)
    assert stat.S_IMODE(os.stat(runs).st_mode) == 0o1777
    (kept,) = find_kept(runs)
    assert stat.S_IMODE(os.stat(kept.run_dir).st_mode) == 0o700


def test_an_upload_that_cannot_be_kept_leaves_nothing_behind(small_fs: Path,
                                                            tmp_path: Path) -> None:
    from steplog.kept import Keeper
    from steplog.records import Artifact
    from steplog.sinks.file import FileSink

    keeper = Keeper(small_fs / "runs")
    with pytest.raises(OSError, match="No space left"):
        keeper.keep(FileSink(tmp_path / "out"), Artifact("big.bin", 0, data=b"x" * 200_000),
                    "test")
    assert list((small_fs / "runs").iterdir()) == []


def test_files_of_a_kept_directory_named_like_a_kept_upload_are_part_of_its_payload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "results"
    (folder / "uploads" / "2024").mkdir(parents=True)
    (folder / "uploads" / "2024" / "upload.json").write_text("[1, 2]")
    runs = tmp_path / "runs"
    logger = MLFlowLogger("kept", tracking_uri=f"http://127.0.0.1:{free_port()}",
                          options=quick(runs))
    logger.log_directory(folder)
    assert not logger.close(30)
    (kept,) = find_kept(runs)
    assert (kept.payload / "uploads" / "2024" / "upload.json").read_text() == "[1, 2]"
    store = f"sqlite:///{tmp_path}/new.db"
    assert main(["sync", str(runs), "--to", store]) == 0
    assert "1 stored, 0 still kept" in capsys.readouterr().out


def test_a_run_moved_for_its_kept_uploads_only_ends_as_its_logger_closed(
    small_fs: Path, tmp_path: Path
) -> None:
    import mlflow

    source, moved_to = f"sqlite:///{tmp_path}/src.db", f"sqlite:///{tmp_path}/dst.db"
    mlflow.MlflowClient(tracking_uri=source).create_experiment(
        "exp", artifact_location=f"file://{small_fs}/art")  # too small for the upload
    logger = MLFlowLogger("exp", tracking_uri=source, options=quick(tmp_path / "runs"))
    logger.log_scalar("loss", 1.0, 0)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(200_000))
    logger.log_artifact(big)
    result = logger.close(30)
    assert not result and result.failed == 1 and result.delivered == 1
    assert main(["sync", str(tmp_path / "runs"), "--to", moved_to]) == 0
    client = mlflow.MlflowClient(tracking_uri=moved_to)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["big.bin"]


def kept_for_a_run_at_a(tmp_path: Path, small_fs: Path, *payloads: tuple[str, bytes]
                        ) -> tuple[str, str]:
    """Keep ``payloads`` (name, bytes) for an MLflow run at the store ``a.db``; the stores
    ``b.db``, whose artifacts go to the 64 KiB ``small_fs``, and ``c.db``."""
    import mlflow

    from steplog.kept import Keeper
    from steplog.records import Artifact
    from steplog.sinks.mlflow import MLflowSink

    a, b, c = (f"sqlite:///{tmp_path}/{n}.db" for n in "abc")
    sink = MLflowSink("exp", tracking_uri=a)
    sink.prepare()
    sink.open()
    keeper = Keeper(tmp_path / "runs")
    for name, data in payloads:
        keeper.keep(sink, Artifact(name, 0, data=data), "server down")
    sink.release()
    mlflow.MlflowClient(tracking_uri=b).create_experiment(
        "exp", artifact_location=f"file://{small_fs}/art")
    return b, c


def test_kept_uploads_moved_to_a_new_run_that_holds_some_of_them_are_not_moved_again(
    small_fs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b, c = kept_for_a_run_at_a(tmp_path, small_fs, ("small.txt", b"s" * 100),
                               ("big.bin", os.urandom(200_000)))  # big.bin does not fit at b
    assert main(["sync", str(tmp_path / "runs"), "--to", b]) == 1
    capsys.readouterr()
    assert main(["sync", str(tmp_path / "runs"), "--to", c]) == 1
    assert "already moved to a new run" in capsys.readouterr().out
    assert [k.artifact.name for k in find_kept(tmp_path / "runs")] == ["big.bin"]


def test_only_a_later_file_of_the_same_name_drops_a_kept_upload(tmp_path: Path) -> None:
    from steplog.kept import Keeper
    from steplog.records import Artifact
    from steplog.sinks.file import FileSink

    sink = FileSink(tmp_path / "out")
    folder = tmp_path / "dir"
    folder.mkdir()
    keeper = Keeper(tmp_path / "runs")
    keeper.keep(sink, Artifact("report.txt", 0, data=b"v2"), "full", order=2)
    keeper.keep(sink, Artifact("policy", 0, data=b"w", checkpoint=True), "full", order=3)
    keeper.keep(sink, Artifact("results", 0, source=str(folder)), "full", order=4)
    keeper.stored(sink, Artifact("report.txt", 0, data=b"v1"), order=1)  # logged before v2
    keeper.stored(sink, Artifact("policy", 0, data=b"w", checkpoint=True), order=5)
    keeper.stored(sink, Artifact("results", 0, source=str(folder)), order=6)
    keeper.stored(FileSink(tmp_path / "other"), Artifact("report.txt", 0, data=b"v3"), order=7)
    assert sorted(k.artifact.name for k in find_kept(tmp_path / "runs")) == [
        "policy", "report.txt", "results"]
    keeper.stored(sink, Artifact("report.txt", 0, data=b"v3"), order=8)
    assert sorted(k.artifact.name for k in find_kept(tmp_path / "runs")) == ["policy", "results"]
    keeper.stored(sink, Artifact("results", 0, data=b"a file now"), order=9)
    assert sorted(k.artifact.name for k in find_kept(tmp_path / "runs")) == ["policy"]


def test_a_move_whose_upload_failed_does_not_bind_it_to_that_new_run(
    small_fs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    b, c = kept_for_a_run_at_a(tmp_path, small_fs, ("big.bin", os.urandom(200_000)))
    assert main(["sync", str(tmp_path / "runs"), "--to", b]) == 1  # it does not fit at b
    assert main(["sync", str(tmp_path / "runs"), "--to", c]) == 0
    client = mlflow.MlflowClient(tracking_uri=c)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert [x.path for x in client.list_artifacts(run.info.run_id)] == ["big.bin"]


def test_the_sync_command_printed_for_a_kept_upload_stored_since_finds_nothing_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from steplog.kept import Keeper
    from steplog.records import Artifact
    from steplog.sinks.file import FileSink

    folder = Keeper(tmp_path / "runs").keep(FileSink(tmp_path / "out"),
                                            Artifact("a.txt", 0, data=b"a"), "the disk was full")
    (tmp_path / "out").mkdir()  # the file run it was going to
    assert main(["sync", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"a"
    capsys.readouterr()
    assert main(["sync", str(folder)]) == 0
    assert "nothing left to deliver" in capsys.readouterr().out
    mistyped = folder.with_name(folder.name.replace("1-", "2-"))
    assert main(["sync", str(mistyped)]) == 2
    assert "does not exist" in capsys.readouterr().err
