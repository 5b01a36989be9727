"""``steplog demo``: a real REINFORCE training on CartPole-v1 logged through steplog to a file run
and the embedded MLflow store; Ctrl-C and SIGTERM deliver everything logged before them and end
the run KILLED; every run into the same directory is its own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

SHORT = ["--updates", "6", "--episodes", "2", "--save-every", "3", "--seed-pattern-updates", "2",
         "--no-progress"]


def demo(directory: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "steplog.cli", "demo", "--dir", str(directory), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=directory.parent)


def finished(proc: subprocess.Popen[str], timeout_s: float = 240) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130, 143), err[-3000:]
    return proc.returncode, out


def file_runs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if (p / "scalars.jsonl").is_file())


def file_counts(run: Path) -> Counter[str]:
    lines = (run / "scalars.jsonl").read_text().splitlines()
    return Counter(json.loads(line)["name"] for line in lines)


def mlflow_runs(directory: Path) -> dict[str, Any]:
    """The demo experiment's MLflow runs by run name."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{directory / 'mlflow.db'}")
    exp = client.get_experiment_by_name("steplog-demo")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def mlflow_counts(directory: Path, run: Any) -> Counter[str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{directory / 'mlflow.db'}")
    return Counter({k: len(client.get_metric_history(run.info.run_id, k))
                    for k in run.data.metrics})


def logged_scalars(out: str) -> int:
    match = re.search(r"logged: ([\d,]+) scalars", out)
    assert match, out
    return int(match.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Two short demo runs, one after the other, into the same directory."""
    directory = tmp_path_factory.mktemp("demo") / "steplog-demo"
    outputs = []
    for _ in range(2):
        code, out = finished(demo(directory, *SHORT))
        assert code == 0, out
        outputs.append(out)
    return directory, outputs


def test_the_demo_delivers_every_scalar_to_the_file_run_and_the_embedded_mlflow_store(
    two_runs: tuple[Path, list[str]],
) -> None:
    directory, outputs = two_runs
    run = file_runs(directory)[0]
    counts = file_counts(run)
    assert counts["return/mean"] == counts["loss/policy"] == 6  # one per update
    assert counts["return/episode"] == 12  # one per episode
    assert sum(counts.values()) == logged_scalars(outputs[0])
    assert json.loads((run / "run.json").read_text())["status"] == "FINISHED"
    assert json.loads((run / "parameters.json").read_text())["algo"] == "REINFORCE"
    assert (run / "policy" / "step_3" / "model.pth").is_file()
    assert (run / "policy" / "step_6" / "model.pth").is_file()
    mlflow_run = mlflow_runs(directory)[run.name]
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_counts(directory, mlflow_run) == counts
    assert not list((directory / "steplog-runs").rglob("journal"))  # nothing left undelivered


def test_the_demo_prints_its_timing_beside_the_seeds_pattern_and_the_commands_to_open_it(
    two_runs: tuple[Path, list[str]],
) -> None:
    directory, outputs = two_runs
    out = outputs[0]
    assert re.search(r"steplog \(6 updates\) +[\d.]+ ms +[\d.]+ ms", out), out
    assert re.search(r"mlflow\.log_metric per scalar +[\d.]+ ms +[\d.]+ ms", out), out
    assert f"steplog show {directory}" in out and f"steplog plot {directory}" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{directory / 'mlflow.db'}" in out


def test_a_second_demo_run_into_the_same_directory_does_not_mix_with_the_first(
    two_runs: tuple[Path, list[str]],
) -> None:
    directory, outputs = two_runs
    first, second = file_runs(directory)
    assert first.name in outputs[0] and second.name in outputs[1]
    assert file_counts(first) == file_counts(second)  # each holds its own run only
    by_name = mlflow_runs(directory)
    assert {first.name, second.name} <= set(by_name)
    assert mlflow_counts(directory, by_name[second.name]) == file_counts(second)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_delivers_everything_logged_ends_the_run_killed_and_exits_128_plus_it(
    tmp_path: Path, signum: int, code: int
) -> None:
    directory = tmp_path / "steplog-demo"
    proc = demo(directory, "--updates", "100000", "--no-progress")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # training for a while
            runs = file_runs(directory) if directory.is_dir() else []
            if runs and (runs[0] / "scalars.jsonl").read_bytes().count(b"\n") >= 50:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(1.0)
        os.kill(proc.pid, signum)
        returncode, out = finished(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert returncode == code
    assert "closed KILLED, everything arrived: True" in out
    (run,) = file_runs(directory)
    counts = file_counts(run)
    assert sum(counts.values()) == logged_scalars(out) > 50
    assert json.loads((run / "run.json").read_text())["status"] == "KILLED"
    mlflow_run = mlflow_runs(directory)[run.name]
    assert mlflow_run.info.status == "KILLED"
    assert mlflow_counts(directory, mlflow_run) == counts


def test_steplog_plot_of_the_demo_directory_overlays_both_runs_one_panel_per_group(
    two_runs: tuple[Path, list[str]], tmp_path: Path
) -> None:
    import matplotlib.image

    from steplog.plot import plot_runs
    from steplog.readback import find_runs

    directory, _ = two_runs
    fig = plot_runs(find_runs(str(directory)), tmp_path / "demo.png", smooth_k=3)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["grad", "loss", "policy", "return"]
    assert [len(ax.get_legend().get_texts()) for ax in panels] == [2, 2, 2, 4]  # 2 runs each
    png = tmp_path / "cli.png"
    proc = subprocess.run([sys.executable, "-m", "steplog.cli", "plot", str(directory), "-o",
                           str(png)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == str(png), proc.stderr
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] >= 700 and pixels.shape[1] >= 1200
    assert 0.01 < (pixels[:, :, :3].sum(axis=2) < 2.9).mean() < 0.5  # drawn, not blank
