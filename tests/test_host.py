"""The sink host: heavy backends run in a child process, and every guarantee holds through it.

The embedded MLflow store (``sqlite:///...``) is served by MlflowClient in a sink host; the
training process never imports mlflow. Faults are real: the host is killed with SIGKILL or
frozen with SIGSTOP, the training process is killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from steplog import MLFlowLogger, Options, PermanentError, RetryableError, RetryPolicy
from steplog.host import Host
from waiting import wait_until

pytestmark = pytest.mark.timeout(180)

FAST = Options(drain_interval_s=0.01, retry=RetryPolicy(initial_s=0.05, max_s=0.5, jitter_s=0.05))


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every thread of it has stopped: a process-wide signal is
    taken by one thread, and until it stops the others, another thread may still answer a
    call."""

    def stopped() -> bool:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:  # a thread that ended meanwhile has nothing left to answer with
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue
        return all(state in ("T", "t") for state in states)

    os.kill(pid, signal.SIGSTOP)
    assert wait_until(stopped, 10.0), f"the host {pid} did not stop"


def read_run(db: Path, experiment: str) -> tuple[dict[str, object], list[int]]:
    """(run info, stored steps of "loss"), read with MLflow's own client in a child process."""
    code = textwrap.dedent(f"""
        import json, mlflow
        c = mlflow.MlflowClient("sqlite:///{db}")
        e = c.get_experiment_by_name({experiment!r})
        (r,) = c.search_runs([e.experiment_id])
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "loss")]
        print(json.dumps([{{"status": r.info.status, "params": r.data.params,
                            "tags": r.data.tags}}, sorted(steps)]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    info, steps = json.loads(out.strip().splitlines()[-1])
    return info, steps


def test_the_embedded_default_runs_mlflow_in_a_host_and_delivers_everything(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys, steplog
        lg = steplog.MLFlowLogger("embedded")              # sqlite:///mlflow.db, no server
        lg.log_parameters({"lr": 0.1})
        for i in range(5000):
            lg.log_scalar("loss", 1.0 / (i + 1), i)
        result = lg.close(120)
        print(bool(result), result.delivered, lg.sink.host_pid is None)
        print(sorted(m for m in ("mlflow", "sqlalchemy", "requests") if m in sys.modules))
    """)], cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["True 5001 True", "[]"]  # host gone after close
    info, steps = read_run(tmp_path / "mlflow.db", "embedded")
    assert steps == list(range(5000))
    assert info["status"] == "FINISHED" and info["params"] == {"lr": "0.1"}


def hosted_logger(db: Path, experiment: str) -> tuple[MLFlowLogger, int]:
    """An MLFlowLogger on a sqlite store whose run is open, and its sink host's pid."""
    logger = MLFlowLogger(experiment, tracking_uri=f"sqlite:///{db}", options=FAST)
    assert logger.flush(120)
    pid = logger.sink.host_pid
    assert pid is not None
    return logger, pid


def test_a_host_killed_mid_run_is_replaced_and_nothing_is_lost_or_duplicated(tmp_path) -> None:
    logger, first = hosted_logger(tmp_path / "m.db", "killed-host")
    for i in range(3000):
        logger.log_scalar("loss", float(i), i)
        if i == 1500:
            os.kill(first, signal.SIGKILL)
        if i % 100 == 0:
            time.sleep(0.01)  # a training step; batches keep flowing to the host
    result = logger.close(120)
    assert result and result.delivered == 3000, result
    assert logger.sink.host_pid is None
    _, steps = read_run(tmp_path / "m.db", "killed-host")
    assert steps == list(range(3000))


def test_close_through_a_frozen_host_returns_at_its_deadline(tmp_path) -> None:
    logger, pid = hosted_logger(tmp_path / "m.db", "frozen-host")
    freeze(pid)
    try:
        logger.log_scalar("loss", 1.0, 0)
        start = time.monotonic()
        flushed = logger.flush(0.5)
        closed = logger.close(1.0)
        elapsed = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGCONT)
    assert not flushed and not closed and closed.timed_out
    assert elapsed < 2.5


def test_the_host_exits_and_ends_the_run_killed_when_the_training_process_dies(
    tmp_path,
) -> None:
    pid_file = tmp_path / "host.pid"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time, steplog
        lg = steplog.MLFlowLogger("orphan", tracking_uri="sqlite:///{tmp_path / 'm.db'}")
        for i in range(100):
            lg.log_scalar("loss", float(i), i)
        lg.flush(120)
        pathlib.Path({str(pid_file)!r}).write_text(str(lg.sink.host_pid))
        time.sleep(120)
    """)], cwd=tmp_path)
    try:
        assert wait_until(pid_file.exists, 120, interval_s=0.05), "condition not met in time"
        host = int(pid_file.read_text())
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        assert wait_until(lambda: not Path(f"/proc/{host}").exists()
                          or "Z" in Path(f"/proc/{host}/stat").read_text().split()[2], 15,
                          interval_s=0.05), "condition not met in time"
    finally:
        child.kill()
    info, steps = read_run(tmp_path / "m.db", "orphan")
    assert steps == list(range(100))
    assert info["status"] == "KILLED"


def test_a_host_keeps_the_meaning_of_errors() -> None:
    host = Host("collections:Counter")
    try:
        host.call("api", "update", {"a": 2})
        assert host.call("api", "total") == 2
        with pytest.raises(PermanentError, match="no attribute 'nope'"):
            host.call("api", "nope")
        with pytest.raises(PermanentError, match="not a public method"):
            host.call("api", "_private")
    finally:
        host.close()


def test_a_host_that_dies_during_a_call_raises_retryable_and_is_replaced() -> None:
    host = Host("threading:Event")
    try:
        assert host.call("api", "is_set") is False
        pid = host.pid
        assert pid is not None
        killer = subprocess.Popen(["sh", "-c", f"sleep 0.3; kill -9 {pid}"])
        with pytest.raises(RetryableError, match="stopped answering"):
            host.call("api", "wait", 30)  # blocks in the host until it is killed
        killer.wait(10)
        assert host.call("api", "is_set") is False and host.starts == 2
    finally:
        host.close()


def test_a_host_that_cannot_build_its_object_fails_permanently() -> None:
    host = Host("steplog.no_such_module:Thing")
    with pytest.raises(PermanentError, match="could not start"):
        host.call("api", "anything")
    host.close()


def test_a_host_slower_to_start_than_its_deadline_says_so() -> None:
    host = Host("time:sleep", [30], start_timeout_s=1.0)  # builds its "object" for 30 s
    try:
        with pytest.raises(RetryableError, match=r"did not start within 1 s"):
            host.call("api", "anything")
    finally:
        host.close()


def test_a_host_does_not_run_a_sitecustomize_of_the_scripts_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "ran"
    folder = tmp_path / "script-folder"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(folder))  # as `python script.py` puts the script's folder
    host = Host("collections:Counter")
    try:
        host.call("api", "update", {"a": 1})
        assert host.call("api", "total") == 1
    finally:
        host.close()
    assert not marker.exists()  # it never ran in the training process either


def test_a_short_script_on_the_embedded_default_delivers_at_exit_without_close(
    tmp_path,
) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import steplog
        lg = steplog.MLFlowLogger("short")
        for i in range(100):
            lg.log_scalar("loss", float(i), i)
    """)], cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr
    # Only the line naming the journal at the start: nothing about undelivered records.
    assert [line for line in proc.stderr.splitlines() if line.startswith("steplog:")
            and not line.startswith("steplog: journal in ")] == []
    info, steps = read_run(tmp_path / "mlflow.db", "short")
    assert steps == list(range(100)) and info["status"] == "FINISHED"


def test_a_long_call_is_not_cut_short_while_the_host_says_it_is_alive() -> None:
    host = Host("threading:Event", call_timeout_s=0.6)  # heartbeats every 0.2 s
    try:
        start = time.monotonic()
        assert host.call("api", "wait", 2.0) is False  # 2 s of work, 0.6 s of allowed silence
        assert time.monotonic() - start >= 2.0 and host.starts == 1
    finally:
        host.close()


def test_a_frozen_host_is_given_up_once_it_was_silent_for_the_call_timeout() -> None:
    host = Host("threading:Event", call_timeout_s=0.6)
    try:
        assert host.call("api", "is_set") is False
        pid = host.pid
        assert pid is not None
        freeze(pid)  # no answer and no heartbeat from now on
        start = time.monotonic()
        with pytest.raises(RetryableError, match=r"stopped answering.*within 0\.6 s"):
            host.call("api", "is_set")
        assert 0.5 <= time.monotonic() - start < 3.0
        assert host.call("api", "is_set") is False and host.starts == 2  # a new host
    finally:
        host.close()


def test_frames_arrive_whole_however_the_bytes_are_split_or_joined() -> None:
    from steplog.host import _LENGTH, _Wire

    left, right = socket.socketpair()
    sender, receiver = _Wire(left), _Wire(right)
    receiver.set_timeout(2.9999996)  # rounds to a whole second in the kernel's timeval
    try:
        frames = [b"", b"a", b"x" * 100_000, b"heartbeat", b"reply"]
        for frame in frames[:3]:
            sender.send(frame)  # several frames in the socket at once
        assert [receiver.recv() for _ in range(3)] == frames[:3]
        joined = b"".join(_LENGTH.pack(len(f)) + f for f in frames[3:])

        def trickle() -> None:  # one byte at a time, frame headers cut too
            for i in range(len(joined)):
                left.sendall(joined[i:i + 1])
                time.sleep(0.002)

        writer = threading.Thread(target=trickle)
        writer.start()
        try:
            assert [receiver.recv(), receiver.recv()] == frames[3:]
        finally:
            writer.join(10)
        receiver.set_timeout(0.2)
        with pytest.raises(TimeoutError, match=r"within 0\.2 s"):
            receiver.recv()
        left.close()
        with pytest.raises(EOFError):
            receiver.recv()
    finally:
        sender.close()
        receiver.close()


def test_a_process_wide_socket_timeout_does_not_cut_a_host_call_short() -> None:
    socket.setdefaulttimeout(0.05)  # set by some library of the training script
    try:
        host = Host("threading:Event", call_timeout_s=5.0)
        try:
            assert host.call("api", "wait", 0.5) is False and host.starts == 1
        finally:
            host.close()
    finally:
        socket.setdefaulttimeout(None)


def test_run_tags_of_any_type_are_stored_as_strings_through_the_host(tmp_path) -> None:
    logger = MLFlowLogger("tags", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          tags={"seed": 1, "lr": 0.5}, options=FAST)  # type: ignore[dict-item]
    logger.log_scalar("loss", 1.0, 0)
    assert logger.close(120)
    info, steps = read_run(tmp_path / "m.db", "tags")
    tags = info["tags"]
    assert isinstance(tags, dict) and tags["seed"] == "1" and tags["lr"] == "0.5"
    assert steps == [0]


def test_the_host_of_a_run_that_could_not_open_exits_at_close(tmp_path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    logger, _ = hosted_logger(tmp_path / "m.db", "deleted")
    assert logger.close(60)
    client = MlflowClient(uri)
    client.delete_experiment(client.get_experiment_by_name("deleted").experiment_id)
    logger = MLFlowLogger("deleted", tracking_uri=uri, options=FAST)
    logger.log_scalar("x", 1.0, 0)
    assert not logger.flush(60)  # MLflow refuses a run in a deleted experiment
    pid = logger.sink.host_pid
    assert pid is not None
    assert not logger.close(60)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    assert wait_until(gone, timeout_s=10)  # not when the logger is collected


def test_a_checkpoint_on_its_way_when_the_exit_close_times_out_is_kept_for_sync(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    from steplog.cli import main
    from steplog.kept import find_kept

    pid_file, db, runs = tmp_path / "host.pid", tmp_path / "m.db", tmp_path / "runs"
    err = tmp_path / "stderr.txt"
    try:
        # Output to a file: the frozen host holds the same descriptors, so pipes would not end.
        with open(err, "w") as stderr:
            subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
                import os, pathlib, signal, torch, steplog
                lg = steplog.MLFlowLogger("slow-upload", tracking_uri="sqlite:///{db}",
                                          options=steplog.Options(exit_timeout_s=3,
                                                                  runs_dir={str(runs)!r}))
                lg.log_scalar("x", 0.0, 0)
                assert lg.flush(120)
                pathlib.Path({str(pid_file)!r}).write_text(str(lg.sink.host_pid))
                os.kill(lg.sink.host_pid, signal.SIGSTOP)  # an upload slower than the deadline
                lg.save_policy(torch.nn.Linear(8, 8), step=1)
            """)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr, timeout=120)
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert "at exit (timed out)" in err.read_text(), err.read_text()
    assert [k.artifact.name for k in find_kept(runs)] == ["policy"]
    assert main(["sync", str(runs)]) == 0
    capsys.readouterr()
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("slow-upload").experiment_id])
    stored = {f.path for f in client.list_artifacts(run.info.run_id, "policy/step_1")}
    assert "policy/step_1/model.pth" in stored
