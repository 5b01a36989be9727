"""MLFlowLogger, the seed-compatible preset, end to end against the session's real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
import torch

from mlflow_support import MlflowServer
from steplog import Logger, Options
from steplog.loggers import MLFlowLogger

pytestmark = pytest.mark.timeout(180)

FAST = Options(drain_interval_s=0.01)


def experiment() -> str:
    return f"logger-{uuid.uuid4().hex[:8]}"


def test_create_builds_an_mlflow_logger(mlflow_server: MlflowServer) -> None:
    logger = Logger.create("mlflow", experiment_name=experiment(), tracking_uri=mlflow_server.url)
    assert isinstance(logger, MLFlowLogger)
    assert logger.close(30)


def test_every_kind_of_record_arrives_without_blocking_the_caller(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "a.yaml").write_text("a: 1")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    policy = torch.nn.Linear(2, 2)
    logger = MLFlowLogger(experiment(), tracking_uri=mlflow_server.url, run_name="all-kinds",
                          options=FAST, tags={"team": "rl"})
    start = time.monotonic()
    logger.log_parameters({"lr": 0.001, "layers": [64, 64]})
    logger.log_tags({"stage": "test"})
    for i in range(500):
        logger.log_metrics({"loss": 1.0 / (i + 1), "reward": float(i)}, i)
    logger.log_artifact(f, name="docs/notes.txt")
    logger.log_file(f, name="files")
    logger.log_directory(d, path="config")
    logger.log_figure(fig, "curve", iteration=7)
    logger.save_policy(policy)
    calls_s = time.monotonic() - start
    plt.close(fig)
    result = logger.close(60)
    assert result and result.undelivered == 0 and result.rejected == 0, result
    assert calls_s < 1.0
    run_id = logger.run_id or ""
    assert [m["step"] for m in mlflow_server.metric_history(run_id, "loss")] == list(range(500))
    run = mlflow_server.run(run_id)
    assert run["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {
        "lr": "0.001", "layers": "[64, 64]"}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["stage"] == "test" and tags["team"] == "rl"
    assert tags["mlflow.runName"] == "all-kinds"
    paths = {a["path"] for a in mlflow_server.artifacts(run_id)}
    assert paths == {"docs/notes.txt", "files/notes.txt", "config/a.yaml", "curve_7.png",
                     "policy/step_0/model.pth", "policy/step_0/meta.json"}


def test_a_file_logged_with_move_is_stored_and_its_source_removed(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    f = tmp_path / "ckpt.bin"
    f.write_bytes(b"weights")
    logger = MLFlowLogger(experiment(), tracking_uri=mlflow_server.url, options=FAST)
    logger.log_file(f, name="files", move=True)
    assert logger.close(60)
    assert {a["path"] for a in mlflow_server.artifacts(logger.run_id or "")} == {"files/ckpt.bin"}
    assert not f.exists()


def test_a_relative_store_is_the_one_where_the_logger_was_made_whatever_the_directory_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger = MLFlowLogger(experiment(), options=FAST)  # the default: sqlite:///mlflow.db
    for i in range(5):
        logger.log_scalar("x", float(i), i)
    assert logger.flush(60)
    monkeypatch.chdir(tmp_path / "b")  # a per-epoch output directory, say
    host = logger.sink.host_pid  # type: ignore[attr-defined]
    assert host is not None
    os.kill(host, signal.SIGKILL)  # its replacement starts in b
    for i in range(5, 10):
        logger.log_scalar("x", float(i), i)
    assert logger.close(60)
    assert not (tmp_path / "b" / "mlflow.db").exists()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    assert len(client.get_metric_history(logger.run_id or "", "x")) == 10


def test_system_metrics_are_sampled_into_the_run(mlflow_server: MlflowServer) -> None:
    logger = MLFlowLogger(experiment(), tracking_uri=mlflow_server.url, log_system_metrics=True,
                          system_metrics_interval_s=0.2, options=FAST)
    time.sleep(1.0)
    assert logger.close(30)
    cpu = mlflow_server.metric_history(logger.run_id or "", "system/cpu_utilization_percentage")
    mem = mlflow_server.metric_history(logger.run_id or "", "system/system_memory_usage_megabytes")
    assert len(cpu) >= 2 and len(mem) == len(cpu)
    assert all(0.0 <= m["value"] <= 100.0 * 64 for m in cpu)
    assert all(m["value"] > 0 for m in mem)


def test_system_metrics_without_psutil_fail_with_a_clear_message() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["psutil"] = None  # as if psutil were not installed
        from steplog.loggers import MLFlowLogger
        try:
            MLFlowLogger("x", tracking_uri="http://127.0.0.1:9", log_system_metrics=True)
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert "needs psutil" in out.stdout


@pytest.mark.parametrize(
    ("ending", "exit_code", "status"),
    [("raise RuntimeError('diverged')", 1, "FAILED"),
     ("os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)", 143, "KILLED"),
     ("pass", 0, "FINISHED")],
)
def test_the_run_status_follows_how_the_process_ended(
    mlflow_server: MlflowServer, tmp_path: Path, ending: str, exit_code: int, status: str
) -> None:
    run_id_file = tmp_path / "run_id"
    code = textwrap.dedent(f"""
        import os, signal, time
        from steplog.loggers import MLFlowLogger
        lg = MLFlowLogger({experiment()!r}, tracking_uri={mlflow_server.url!r})
        for i in range(100):
            lg.log_scalar("loss", float(i), i)
        assert lg.flush(60)
        open({str(run_id_file)!r}, "w").write(lg.run_id)
        {ending}
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == exit_code, proc.stderr
    run = mlflow_server.run(run_id_file.read_text())
    assert run["info"]["status"] == status
    assert len(mlflow_server.metric_history(run["info"]["run_id"], "loss")) == 100



def test_records_left_at_exit_go_through_several_requests_in_flight(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    # The exit close runs after the interpreter stopped taking thread-pool work.
    run_id_file = tmp_path / "run_id"
    code = textwrap.dedent(f"""
        from steplog.loggers import MLFlowLogger
        lg = MLFlowLogger({experiment()!r}, tracking_uri={mlflow_server.url!r}, max_in_flight=2)
        assert lg.flush(60)
        open({str(run_id_file)!r}, "w").write(lg.run_id)
        for i in range(3000):
            lg.log_metrics({{"a": float(i), "b": -float(i)}}, i)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "not delivered" not in proc.stderr, proc.stderr
    run_id = run_id_file.read_text()
    for key in ("a", "b"):
        assert len(mlflow_server.metric_history(run_id, key)) == 3000


def test_the_http_path_works_when_mlflow_cannot_be_imported(
    mlflow_server: MlflowServer, tmp_path
) -> None:
    name = f"no-mlflow-{uuid.uuid4().hex[:8]}"
    src = tmp_path / "notes.txt"
    src.write_text("artifact through the server's proxy")
    code = textwrap.dedent(f"""
        import sys
        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("mlflow", "requests"):
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Blocked())
        import steplog
        lg = steplog.MLFlowLogger({name!r}, tracking_uri={mlflow_server.url!r},
                                  tags={{"team": "rl"}})
        lg.log_parameters({{"lr": 0.01}})
        lg.log_tags({{"stage": "blocked"}})
        for i in range(300):
            lg.log_metrics({{"loss": 1.0 / (i + 1)}}, i)
        lg.log_artifact({str(src)!r}, name="docs/notes.txt")
        result = lg.close(60)
        print(bool(result), lg.run_id)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    ok, run_id = proc.stdout.split()
    assert ok == "True"
    run = mlflow_server.run(run_id)
    assert run["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"lr": "0.01"}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["team"] == "rl" and tags["stage"] == "blocked" and tags["mlflow.user"]
    assert [m["step"] for m in mlflow_server.metric_history(run_id, "loss")] == list(range(300))
    assert [a["path"] for a in mlflow_server.artifacts(run_id)] == ["docs/notes.txt"]
