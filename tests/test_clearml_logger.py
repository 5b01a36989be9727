"""ClearMLLogger against the real clearml SDK in offline mode (no ClearML server can run here).

Each test reads back the offline session that ClearML's own ``Task.import_offline_session``
uploads: ``task.json`` and ``metrics.jsonl``, the artifact files and the model records.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("clearml")
torch = pytest.importorskip("torch")

from clearml_support import OfflineSession, bad_gateway  # noqa: E402
from mlflow_support import free_port  # noqa: E402
from steplog import (  # noqa: E402
    ClearMLLogger,
    Logger,
    LoggerClosedError,
    Options,
    SteplogWarning,
    load_policy,
)
from steplog.sinks.clearml import split_name  # noqa: E402

SEED_EXAMPLE = """
logger = ClearMLLogger(project_name="Demo/PRT", task_name="PPO CartPole")
logger.log_parameters({"algo": "PPO", "seed": 42, "lr": 3e-4})
for step in range(1000):
    loss = 1.0 / (step + 1)
    reward = step * 0.1
    logger.log_scalar("loss/train", loss) # auto step (0,1,2,...)
    logger.log_scalar("reward/mean", reward)
# Save objects
agent = {"type": "ppo", "notes": "demo"}
logger.save_agent(agent) # artifact on the Task
policy = my_policy # your BasePolicy impl
logger.save_policy(policy) # Model in Registry
logger.close()
"""


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ClearML offline mode with its cache (and HOME) in a temporary directory."""
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def logger(offline: Path) -> Iterator[ClearMLLogger]:
    lg = ClearMLLogger("steplog-tests", "run")
    yield lg
    lg.close()


def session_of(lg: ClearMLLogger) -> OfflineSession:
    assert lg.offline_session is not None
    return OfflineSession.read(lg.offline_session)


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env.update(HOME=str(tmp_path / "home"), CLEARML_CACHE_DIR=str(tmp_path / "cache"), **extra)
    return env


def run_child(
    code: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def session_folder(tmp_path: Path) -> Path:
    folders = [p for p in (tmp_path / "cache" / "offline").iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


# -- the seed's behaviour -------------------------------------------------------------------

def test_the_seed_example_records_every_scalar_parameter_agent_and_policy(offline: Path) -> None:
    my_policy = torch.nn.Linear(4, 2)
    scope = {"ClearMLLogger": ClearMLLogger, "my_policy": my_policy}
    exec(SEED_EXAMPLE, scope)
    lg = scope["logger"]
    s = session_of(lg)
    assert s.series("loss", "train") == [(i, 1.0 / (i + 1)) for i in range(1000)]
    assert s.series("reward", "mean") == [(i, i * 0.1) for i in range(1000)]
    assert len(s.scalars) == 2000
    assert s.params == {"algo": "PPO", "seed": "42", "lr": "0.0003"}
    agent = s.artifacts["agent.pth"]
    assert torch.load(agent["uri"], weights_only=True) == {"type": "ppo", "notes": "demo"}
    (model,) = s.models
    assert model["init"]["name"] == "policy" and model["init"]["framework"] == "PyTorch"
    stored = torch.load(model["weights"]["weights_filename"], weights_only=True)
    assert torch.equal(stored["weight"], my_policy.weight)
    assert Path(f"{lg.offline_session}.zip").is_file()


def test_task_is_the_real_clearml_task_and_usable_directly(logger: ClearMLLogger) -> None:
    from clearml import Logger as ClearMLSdkLogger
    from clearml import Task

    assert isinstance(logger.task, Task)
    assert isinstance(logger._logger, ClearMLSdkLogger)
    assert logger.task.name == "run"
    logger.task.connect({"direct": 7}, name="Direct")
    logger.log_parameters({"via_steplog": 1})
    assert logger.flush(30)
    hyper = session_of(logger).task["hyperparams"]
    assert hyper["Direct"]["direct"]["value"] == "7"
    assert hyper["General"]["via_steplog"]["value"] == "1"


def test_logger_create_builds_a_clearml_logger(offline: Path) -> None:
    lg = Logger.create("clearml", project_name="steplog-tests", task_name="created")
    try:
        assert isinstance(lg, ClearMLLogger)
    finally:
        lg.close()


# -- scalars ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("loss/train", ("loss", "train")),
    ("loss", ("metrics", "loss")),
    ("a/b/c", ("a", "b/c")),
    ("/lead", ("metrics", "/lead")),
    ("trail/", ("metrics", "trail/")),
])
def test_a_name_splits_into_title_and_series_at_the_first_slash(
    name: str, expected: tuple[str, str]
) -> None:
    assert split_name(name) == expected


def test_explicit_steps_are_kept_and_automatic_steps_count_per_name(
    logger: ClearMLLogger,
) -> None:
    logger.log_scalar("x", 1.0, 10)
    logger.log_scalar("y", 2.0)
    logger.log_scalar("y", 3.0)
    logger.log_scalar("x", 4.0, 20)
    assert logger.flush(30)
    s = session_of(logger)
    assert s.series("metrics", "x") == [(10, 1.0), (20, 4.0)]
    assert s.series("metrics", "y") == [(0, 2.0), (1, 3.0)]


def test_log_metrics_stores_every_key_at_the_step(logger: ClearMLLogger) -> None:
    logger.log_metrics({"loss/train": 0.5, "loss/val": 0.7, "lr": 1e-3}, iteration=3)
    logger.log_metrics({"loss/train": 0.25})
    assert logger.flush(30)
    s = session_of(logger)
    assert s.series("loss", "train") == [(3, 0.5), (1, 0.25)]  # its second call
    assert s.series("loss", "val") == [(3, 0.7)]
    assert s.series("metrics", "lr") == [(3, 1e-3)]


def test_many_scalars_arrive_in_order_in_few_lines(logger: ClearMLLogger) -> None:
    for i in range(50_000):
        logger.log_scalar("loss/train", float(i), i)
    assert logger.flush(60)
    s = session_of(logger)
    assert s.series("loss", "train") == [(i, float(i)) for i in range(50_000)]
    lines = (s.folder / "metrics.jsonl").read_text().splitlines()
    assert len(lines) <= 50  # batches, not one line per point


def test_nan_and_infinity_are_stored_as_zero_with_one_warning(logger: ClearMLLogger) -> None:
    with pytest.warns(SteplogWarning, match="NaN or infinity"):
        logger.log_scalar("x", float("nan"), 0)
        logger.log_scalar("x", float("inf"), 1)
        logger.log_scalar("x", 2.0, 2)
        assert logger.flush(30)
    assert session_of(logger).series("metrics", "x") == [(0, 0.0), (1, 0.0), (2, 2.0)]
    assert logger.sink.nonfinite == 2


# -- parameters and tags --------------------------------------------------------------------

def test_parameters_merge_across_calls_and_nested_dicts_become_paths(
    logger: ClearMLLogger,
) -> None:
    logger.log_parameters({"lr": 3e-4, "optim": {"name": "adam", "betas": [0.9, 0.99]}})
    logger.log_parameters({"seed": 1})
    logger.log_parameters({"lr": 1e-4})
    assert logger.flush(30)
    assert session_of(logger).params == {
        "lr": "0.0001", "optim/name": "adam", "optim/betas": "[0.9, 0.99]", "seed": "1",
    }


def test_tags_become_user_properties(logger: ClearMLLogger) -> None:
    logger.log_tags({"commit": "abc123", "gpus": 2})
    assert logger.flush(30)
    assert session_of(logger).properties == {"commit": "abc123", "gpus": "2"}


# -- artifacts and models -------------------------------------------------------------------

def test_log_artifact_stores_the_file_with_its_metadata(
    logger: ClearMLLogger, tmp_path: Path
) -> None:
    src = tmp_path / "config.yaml"
    src.write_text("lr: 0.1\n")
    logger.log_artifact(src, name="cfg.yaml", step=5, metadata={"owner": "me"},
                        aliases=["best"])
    assert logger.flush(30)
    art = session_of(logger).artifacts["cfg.yaml"]
    assert Path(art["uri"]).read_text() == "lr: 0.1\n"
    assert dict(art["display_data"]) == {
        "owner": "me", "kind": "artifact", "step": "5", "aliases": "best",
    }


def test_a_directory_artifact_is_stored_as_one_archive(
    logger: ClearMLLogger, tmp_path: Path
) -> None:
    d = tmp_path / "outputs"
    d.mkdir()
    (d / "a.txt").write_text("a")
    (d / "b.txt").write_text("b")
    logger.log_directory(d)
    assert logger.flush(30)
    art = session_of(logger).artifacts["outputs"]
    assert art["type"] == "archive" and Path(art["uri"]).is_file()


def test_a_figure_is_captured_at_the_call(logger: ClearMLLogger) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    fig = plt.figure()
    fig.gca().plot([1, 2, 3])
    logger.log_figure(fig, "curve", iteration=4)
    plt.close(fig)
    assert logger.flush(30)
    art = session_of(logger).artifacts["curve_4.png"]
    assert Path(art["uri"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_saved_policy_is_a_model_with_the_weights_at_the_call(
    logger: ClearMLLogger,
) -> None:
    policy = torch.nn.Linear(3, 1)
    before = policy.weight.detach().clone()
    logger.save_policy(policy)
    with torch.no_grad():
        policy.weight.add_(1.0)  # the step right after the call
    logger.save_policy(policy)
    assert logger.flush(30)
    models = session_of(logger).models
    assert [m["init"]["name"] for m in models] == ["policy", "policy"]
    files = [m["weights"]["weights_filename"] for m in models]
    # Both in the same millisecond or not, the second does not overwrite the first.
    assert [Path(f).name for f in files] == ["policy-step0-v1.pth", "policy-step1-v2.pth"]
    first, second = (load_policy(f) for f in files)
    assert torch.equal(first["weight"], before)
    assert torch.equal(second["weight"], before + 1.0)
    design = models[1]["init"]["config_dict"]
    assert design["step"] == 1 and design["class"] == "torch.nn.modules.linear.Linear"
    assert design["sha256"] == hashlib.sha256(Path(files[1]).read_bytes()).hexdigest()


def test_log_file_with_move_removes_the_source_once_clearml_stored_it(
    logger: ClearMLLogger, tmp_path: Path,
) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("moved")
    logger.log_file(source, "docs", move=True)
    assert logger.flush(30)
    assert not source.exists()
    assert Path(session_of(logger).artifacts["docs/notes.txt"]["uri"]).read_text() == "moved"


def test_save_agent_stores_a_task_artifact_under_its_name(logger: ClearMLLogger) -> None:
    logger.save_agent({"epsilon": 0.1}, name="agents/dqn.pt")
    assert logger.flush(30)
    art = session_of(logger).artifacts["agents/dqn.pt"]
    assert Path(art["uri"]).name == "agents-dqn.pt"
    assert torch.load(art["uri"], weights_only=True) == {"epsilon": 0.1}


# -- life -----------------------------------------------------------------------------------

def test_close_zips_the_session_and_prints_how_to_upload_it(
    offline: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    lg = ClearMLLogger("steplog-tests", "zipped")
    lg.log_scalar("x", 1.0)
    result = lg.close(30)
    assert result and result.delivered == 1
    zip_path = f"{lg.offline_session}.zip"
    with zipfile.ZipFile(zip_path) as zf:  # what the printed command uploads
        events = [e for line in zf.read("metrics.jsonl").decode().splitlines()
                  for e in json.loads(line)]
        task = json.loads(zf.read("task.json"))
    assert [(e["variant"], e["value"]) for e in events] == [("x", 1.0)]
    assert task["hyperparams"]["properties"]["steplog.status"]["value"] == "FINISHED"
    err = capfd.readouterr().err
    assert f"Task.import_offline_session({zip_path!r})" in err
    with pytest.raises(LoggerClosedError):
        lg.log_scalar("x", 2.0)


def test_a_second_logger_after_close_records_its_own_task(offline: Path) -> None:
    first = ClearMLLogger("steplog-tests", "first")
    first.log_scalar("x", 1.0, 0)
    assert first.close(30)
    second = ClearMLLogger("steplog-tests", "second")
    second.log_scalar("x", 2.0, 0)
    assert second.close(30)
    assert first.task.id != second.task.id
    assert session_of(first).series("metrics", "x") == [(0, 1.0)]
    assert session_of(second).series("metrics", "x") == [(0, 2.0)]


def test_two_open_loggers_with_different_tasks_fail_with_a_clear_error(
    logger: ClearMLLogger,
) -> None:
    with pytest.raises(ValueError, match="one running Task per process"):
        ClearMLLogger("steplog-tests", "another")


def test_a_second_logger_with_the_same_names_does_not_share_the_open_task(
    logger: ClearMLLogger,
) -> None:
    with pytest.raises(ValueError, match="one running Task per process"):
        ClearMLLogger("steplog-tests", "run")
    logger.log_scalar("x", 1.0, 0)
    assert logger.flush(30)  # the first logger's Task is untouched


def test_a_task_the_user_started_is_never_taken_over(offline: Path) -> None:
    from clearml import Task

    task = Task.init("steplog-tests", "mine")
    try:
        with pytest.raises(ValueError, match="one running Task per process"):
            ClearMLLogger("steplog-tests", "mine")
    finally:
        task.close()


def test_forked_workers_of_a_pool_log_nothing_twice_and_do_not_hang(tmp_path: Path) -> None:
    proc = run_child("""
        import multiprocessing as mp
        from steplog import ClearMLLogger
        lg = ClearMLLogger("p", "fork")
        for i in range(1000):
            lg.log_scalar("x", float(i), i)
        def work(k):
            lg.log_scalar("child", float(k), k)  # the forked copy is inert
            return 2 * k
        with mp.get_context("fork").Pool(2) as pool:
            assert pool.map(work, range(8)) == [2 * k for k in range(8)]
        r = lg.close(30)
        assert r and r.delivered == 1000, r
    """, child_env(tmp_path, CLEARML_OFFLINE_MODE="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = OfflineSession.read(session_folder(tmp_path))
    assert s.series("metrics", "x") == [(i, float(i)) for i in range(1000)]
    assert s.series("metrics", "child") == []


def test_bad_project_or_task_names_raise_at_construction(offline: Path) -> None:
    with pytest.raises(ValueError, match="project_name"):
        ClearMLLogger("", "run")
    with pytest.raises(ValueError, match="task_name"):
        ClearMLLogger("p", None)  # type: ignore[arg-type]


def test_missing_configuration_fails_at_once_naming_the_three_fixes(tmp_path: Path) -> None:
    proc = run_child("""
        from steplog import ClearMLLogger
        try:
            ClearMLLogger("p", "t")
        except ValueError as exc:
            print("ERROR:", exc)
    """, child_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "ERROR:" in out
    for fix in ("clearml-init", "CLEARML_API_HOST", "offline=True"):
        assert fix in out



UNREACHABLE_RUN = """
    import time, warnings
    from steplog import ClearMLLogger, SteplogWarning
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lg = ClearMLLogger("p", "t", connect_timeout_s=1.0)
    print("BUILT", round(time.monotonic() - t0, 2),
          [str(w.message)[:100] for w in caught if w.category is SteplogWarning])
    for i in range(100):
        lg.log_scalar("x", float(i), i)
    t0 = time.monotonic()
    r = lg.close(10)
    print("CLOSED", round(time.monotonic() - t0, 2), bool(r), r.delivered)
    print("LOSSES", [l.reason for l in r.losses])
    print("FOLDER", lg.offline_session)
"""


def parse_unreachable(out: str) -> dict[str, str]:
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines()
            if line.split(" ", 1)[0] in ("BUILT", "CLOSED", "LOSSES", "FOLDER")}


def test_a_closed_server_port_records_offline_and_the_result_says_how_to_upload(
    tmp_path: Path,
) -> None:
    env = child_env(tmp_path, CLEARML_API_HOST=f"http://127.0.0.1:{free_port()}",
                    CLEARML_API_ACCESS_KEY="k", CLEARML_API_SECRET_KEY="s")
    proc = run_child(UNREACHABLE_RUN, env)
    assert proc.returncode == 0, proc.stderr
    got = parse_unreachable(proc.stdout)
    built_s = float(got["BUILT"].split(" ", 1)[0])
    assert built_s < 15, got
    assert "did not answer" in got["BUILT"]
    closed = got["CLOSED"].split()
    assert float(closed[0]) < 10.5 and closed[1] == "False" and closed[2] == "100"
    assert "import_offline_session" in got["LOSSES"]
    s = OfflineSession.read(got["FOLDER"])
    assert s.series("metrics", "x") == [(i, float(i)) for i in range(100)]


def test_credentials_from_clearml_conf_are_used_when_no_variables_are_set(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "clearml.conf").write_text(textwrap.dedent(f"""
        api {{
            api_server: http://127.0.0.1:{free_port()}
            credentials {{ access_key: "k", secret_key: "s" }}
        }}
    """))
    proc = run_child(UNREACHABLE_RUN, child_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    got = parse_unreachable(proc.stdout)  # configured, so no ValueError: the server is down
    assert "did not answer" in got["BUILT"] and got["CLOSED"].split()[1:] == ["False", "100"]


def test_a_server_that_accepts_but_never_answers_does_not_hang_construction(
    tmp_path: Path,
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections complete, nothing is ever read or answered
        port = silent.getsockname()[1]
        env = child_env(tmp_path, CLEARML_API_HOST=f"http://127.0.0.1:{port}",
                        CLEARML_API_ACCESS_KEY="k", CLEARML_API_SECRET_KEY="s")
        proc = run_child(UNREACHABLE_RUN, env)
    assert proc.returncode == 0, proc.stderr
    got = parse_unreachable(proc.stdout)
    assert float(got["BUILT"].split(" ", 1)[0]) < 15, got
    assert got["CLOSED"].split()[1:] == ["False", "100"]


def test_a_server_answering_502_records_offline_instead_of_retrying_for_minutes(
    tmp_path: Path,
) -> None:
    with bad_gateway() as url:
        env = child_env(tmp_path, CLEARML_API_HOST=url,
                        CLEARML_API_ACCESS_KEY="k", CLEARML_API_SECRET_KEY="s")
        proc = run_child(UNREACHABLE_RUN, env)
    assert proc.returncode == 0, proc.stderr
    got = parse_unreachable(proc.stdout)
    assert float(got["BUILT"].split(" ", 1)[0]) < 15, got
    assert "HTTP 502" in got["BUILT"] and got["CLOSED"].split()[1:] == ["False", "100"]


def test_sigterm_delivers_every_record_then_closes_the_task(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time
        from steplog import ClearMLLogger
        lg = ClearMLLogger("p", "sigterm")
        for i in range(20_000):
            lg.log_scalar("x", float(i), i)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(60)
    """)], env=child_env(tmp_path, CLEARML_OFFLINE_MODE="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert ready.exists(), child.communicate(timeout=5)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == 143, err
    folder = session_folder(tmp_path)
    assert OfflineSession.read(folder).series("metrics", "x") == [
        (i, float(i)) for i in range(20_000)
    ]
    assert Path(f"{folder}.zip").is_file()


def test_exiting_without_close_delivers_everything_and_zips_the_session(tmp_path: Path) -> None:
    proc = run_child("""
        from steplog import ClearMLLogger
        lg = ClearMLLogger("p", "exit")
        lg.log_parameters({"seed": 3})
        for i in range(5000):
            lg.log_scalar("loss/train", float(i), i)
    """, child_env(tmp_path, CLEARML_OFFLINE_MODE="1"))
    assert proc.returncode == 0, proc.stderr
    folder = session_folder(tmp_path)
    s = OfflineSession.read(folder)
    assert len(s.series("loss", "train")) == 5000 and s.params == {"seed": "3"}
    assert Path(f"{folder}.zip").is_file()
    assert json.loads((folder / "task.json").read_text())["name"] == "exit"


def test_a_closed_loggers_task_goes_on_in_its_continued_logger(offline: Path) -> None:
    first = ClearMLLogger("steplog-tests", "stages", options=Options(drain_interval_s=0.01))
    first.log_parameters({"lr": 0.1})
    for i in range(5):
        first.log_scalar("loss", float(i), i)
    assert first.close(30)
    second = first.continued()
    assert second.task.id == first.task.id and second.offline_session == first.offline_session
    for i in range(5, 10):
        second.log_scalar("loss", float(i), i)
    second.log_parameters({"batch": 64})
    second.task.get_logger().report_scalar("direct", "x", 1.0, iteration=3)
    assert second.close(30, status="KILLED")

    session = session_of(second)
    assert session.series("loss", "loss") == [] and session.series("metrics", "loss") == [
        (i, float(i)) for i in range(10)]
    assert session.params == {"lr": "0.1", "batch": "64"}
    assert session.properties["steplog.status"] == "KILLED"
    with zipfile.ZipFile(f"{second.offline_session}.zip") as z:  # what gets uploaded
        lines = z.read("metrics.jsonl").decode().splitlines()
    iters = sorted(ev["iter"] for line in lines for ev in json.loads(line)
                   if ev.get("metric") == "metrics")
    assert iters == list(range(10))
    assert session.series("direct", "x") == [(3, 1.0)]  # no iteration offset either


def test_a_continued_offline_task_keeps_the_models_saved_before_it(offline: Path) -> None:
    policy = torch.nn.Linear(2, 1)
    first = ClearMLLogger("steplog-tests", "stages", options=Options(drain_interval_s=0.01))
    first.save_policy(policy)  # automatic step 0
    assert first.close(30)
    with torch.no_grad():
        policy.weight.add_(1.0)
    second = first.continued()
    second.save_policy(policy)  # automatic step 0 again: a logger counts its own saves
    assert second.close(30)
    models = session_of(second).models
    files = [Path(m["weights"]["weights_filename"]) for m in models]
    assert [f.name for f in files] == ["policy-step0-v1.pth", "policy-step0-v2.pth"]
    first_weights, second_weights = (load_policy(f)["weight"] for f in files)
    assert torch.equal(second_weights, first_weights + 1.0)  # neither file overwrote the other
