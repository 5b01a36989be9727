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
