"""The journal of a ClearML run and ``steplog sync`` into a ClearML Task.

No ClearML server can run here, so what is proven is everything short of a server storing the
replay: which sinks are journaled, what ``run.json`` records (never credentials), that a logger
whose server is down keeps every metric record for a sync, that ``steplog show`` names the Task,
and that a sync which cannot reach the server, or has no credentials, keeps every frame and says
why. A logger needs a server to create its Task (``Task.init``), so the journaling tests give
the logger a sink reattached to an existing Task by id: the sink ``steplog sync`` itself uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("clearml")

from clearml_support import bad_gateway
from mlflow_support import free_port
from steplog import ClearMLLogger, Logger, Options, RetryPolicy, SteplogWarning
from steplog.cli import main
from steplog.frames import decode_batch
from steplog.journal import Journal
from steplog.sinks.clearml import ClearMLSink

QUICK = RetryPolicy(initial_s=0.05, max_s=0.2, jitter_s=0.0, window_s=1.0)
ACCESS_KEY = "steplog-test-access-key"
SECRET_KEY = "steplog-test-secret-key"
TASK_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ClearML credentials in the environment (HOME and the cache in a temporary directory)."""
    for name in list(os.environ):
        if name.startswith(("CLEARML_", "TRAINS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", SECRET_KEY)


def task_target(api_host: str) -> dict[str, object]:
    return {"api_host": api_host, "project_name": "steplog-tests", "task_name": "run",
            "task_id": TASK_ID, "connect_timeout_s": 1.0}


def run_with_server_down(runs: Path, api_host: str) -> Path:
    """A logger writing into a Task whose server does not answer logs 100 scalars, a
    parameter and a tag, and closes; its run directory."""
    sink = ClearMLSink.reattach(task_target(api_host))
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.01, retry=QUICK,
                                                  runs_dir=str(runs)))
    with pytest.warns(SteplogWarning) as caught:
        logger.log_parameters({"lr": 0.1})
        logger.log_tags({"team": "rl"})
        for i in range(100):
            logger.log_scalar("loss/train", 1.0 / (i + 1), i)
        result = logger.close(10)
    assert any(f"could not open clearml task {TASK_ID}" in str(w.message) for w in caught)
    assert not result and result.sync is not None
    return Path(result.sync.split(" ", 2)[2])


def journaled_records(run: Path) -> int:
    with Journal.open(run / "journal") as journal:
        return sum(len(decode_batch(payload)) for _, payload in journal.read())


def cursor(run: Path) -> int:
    with Journal.open(run / "journal") as journal:
        return journal.cursor("clearml")


# -- which ClearML runs are journaled ---------------------------------------------------------

def test_an_online_task_is_journaled_and_replayed_and_an_offline_session_is_not() -> None:
    online = ClearMLSink("p", "t", offline=False)
    offline = ClearMLSink("p", "t", offline=True)
    assert online.remote and online.replayable()
    assert not offline.remote and not offline.replayable() and offline.target() is None


def test_an_offline_logger_keeps_no_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    runs = tmp_path / "runs"
    logger = ClearMLLogger("steplog-tests", "offline", offline=True,
                           options=Options(runs_dir=str(runs)))
    logger.log_scalar("x", 1.0, 0)
    assert logger.run_dir is None
    result = logger.close(60)
    assert result and result.sync is None
    assert not runs.exists()


def test_a_logger_that_fell_back_offline_keeps_no_journal_and_names_the_import_command(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env.update(HOME=str(tmp_path / "home"), CLEARML_CACHE_DIR=str(tmp_path / "cache"),
               CLEARML_API_HOST=f"http://127.0.0.1:{free_port()}",
               CLEARML_API_ACCESS_KEY="k", CLEARML_API_SECRET_KEY="s",
               STEPLOG_RUNS_DIR=str(runs))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", """if True:
        from steplog import ClearMLLogger
        lg = ClearMLLogger("p", "t", connect_timeout_s=1.0)
        lg.log_scalar("x", 1.0, 0)
        print("RUN_DIR", lg.run_dir)
        r = lg.close(30)
        print("SYNC", r.sync)
        print("LOSSES", [l.reason for l in r.losses])
    """], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RUN_DIR None" in proc.stdout and "SYNC None" in proc.stdout
    assert "Task.import_offline_session" in proc.stdout
    assert not runs.exists()


# -- what run.json records ------------------------------------------------------------------

def test_reattach_rebuilds_the_target_it_was_given() -> None:
    target = task_target("https://api.clear.ml")
    sink = ClearMLSink.reattach(target)
    assert sink.target() == target
    assert sink.describe() == f"clearml task {TASK_ID} on https://api.clear.ml"


def test_reattach_refuses_a_target_that_names_no_task() -> None:
    with pytest.raises(ValueError, match="names no ClearML task"):
        ClearMLSink.reattach({**task_target("https://api.clear.ml"), "task_id": None})


@pytest.mark.usefixtures("credentials")
def test_run_json_names_the_task_and_its_server_without_credentials(tmp_path: Path) -> None:
    api_host = f"http://127.0.0.1:{free_port()}"
    run = run_with_server_down(tmp_path / "runs", api_host)
    text = (run / "run.json").read_text()
    manifest = json.loads(text)
    assert manifest["status"] == "FINISHED"
    (consumer,) = manifest["sinks"]
    info = manifest["sinks"][consumer]
    assert {k: info[k] for k in ("label", "kind", "target")} == {
        "label": "clearml", "kind": "clearml", "target": task_target(api_host)}
    assert "never opened" in info["end_failed"]  # a later sync opens the task and ends it
    assert ACCESS_KEY not in text and SECRET_KEY not in text


# -- a server that is down: the journal keeps everything --------------------------------------

@pytest.mark.usefixtures("credentials")
def test_every_metric_record_is_journaled_while_the_server_is_down(tmp_path: Path) -> None:
    run = run_with_server_down(tmp_path / "runs", f"http://127.0.0.1:{free_port()}")
    assert journaled_records(run) == 102  # 100 scalars, the parameter, the tag
    assert cursor(run) == 0


@pytest.mark.usefixtures("credentials")
def test_show_names_the_task_and_what_it_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api_host = f"http://127.0.0.1:{free_port()}"
    run = run_with_server_down(tmp_path / "runs", api_host)
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"clearml: {api_host} task {TASK_ID}: stored up to frame 0; lacks 102 records" in out
    assert f"steplog sync {run}" in out


@pytest.mark.usefixtures("credentials")
def test_a_sync_while_the_server_is_down_keeps_every_frame_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api_host = f"http://127.0.0.1:{free_port()}"
    run = run_with_server_down(tmp_path / "runs", api_host)
    capsys.readouterr()
    assert main(["sync", str(run), "--timeout", "1"]) == 1
    out = capsys.readouterr().out
    assert f"the ClearML API server {api_host} did not answer" in out
    assert cursor(run) == 0 and journaled_records(run) == 102


@pytest.mark.usefixtures("credentials")
def test_a_sync_through_a_gateway_answering_502_keeps_every_frame(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with bad_gateway() as url:
        run = run_with_server_down(tmp_path / "runs", url)
        capsys.readouterr()
        assert main(["sync", str(run), "--timeout", "1"]) == 1
    assert f"the ClearML API server {url} answered HTTP 502" in capsys.readouterr().out
    assert cursor(run) == 0 and journaled_records(run) == 102


@pytest.mark.usefixtures("credentials")
def test_a_sync_without_clearml_credentials_keeps_every_frame_and_names_the_fix(
    tmp_path: Path,
) -> None:
    run = run_with_server_down(tmp_path / "runs", f"http://127.0.0.1:{free_port()}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env["HOME"] = str(tmp_path / "elsewhere")  # no clearml.conf there
    proc = subprocess.run([sys.executable, "-m", "steplog.cli", "sync", str(run),
                           "--timeout", "1"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "no credentials" in proc.stdout and "CLEARML_API_ACCESS_KEY" in proc.stdout
    assert cursor(run) == 0
