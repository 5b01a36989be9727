"""The ``steplog`` command: the demo job runs end to end, ``show`` summarises a file run."""

from __future__ import annotations

import json
import subprocess
import sys

from steplog import FileLogger
from steplog.cli import main


def test_show_summarises_a_file_run(tmp_path, capsys) -> None:
    logger = FileLogger(tmp_path)
    logger.log_parameters({"lr": 0.1})
    for i in range(5):
        logger.log_scalar("loss", 1.0 / (i + 1), i)
    assert logger.close(10)
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FINISHED" in out and '"lr": 0.1' in out
    assert "loss" in out and "0.2" in out


def test_show_refuses_a_directory_that_is_not_a_run(tmp_path, capsys) -> None:
    assert main(["show", str(tmp_path)]) == 2
    assert "not a steplog file run" in capsys.readouterr().err


def test_demo_trains_and_delivers_to_files_and_the_embedded_mlflow_store(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "steplog.cli", "demo", "--dir", str(tmp_path), "--steps", "40"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "closed ok=True" in proc.stdout
    lines = (tmp_path / "files" / "scalars.jsonl").read_text().splitlines()
    assert len(lines) == 40 * 5
    assert json.loads((tmp_path / "files" / "run.json").read_text())["status"] == "FINISHED"
    assert (tmp_path / "files" / "checkpoints" / "step_40" / "model.pth").exists()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("steplog-demo").experiment_id])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 40
