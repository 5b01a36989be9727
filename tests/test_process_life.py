"""Guarantee 8: exit, SIGTERM, kill -9 and fork leave a consistent run behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from steplog import FileLogger, Options, State


def run_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


def read_scalars(run: Path) -> pd.DataFrame:
    return pd.read_json(run / "scalars.jsonl", lines=True, precise_float=True)


def test_exiting_without_close_delivers_everything_at_exit(tmp_path) -> None:
    proc = run_child(f"""
        import steplog
        lg = steplog.FileLogger({str(tmp_path)!r})
        lg.log_parameters({{"seed": 1}})
        for i in range(100_000):
            lg.log_scalar("x", float(i))
    """)
    assert proc.returncode == 0, proc.stderr
    assert len(read_scalars(tmp_path)) == 100_000
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "FINISHED"


def test_a_logger_dropped_without_close_is_still_flushed_at_exit(tmp_path) -> None:
    proc = run_child(f"""
        import gc, steplog
        def train():
            lg = steplog.FileLogger({str(tmp_path)!r})
            for i in range(50_000):
                lg.log_scalar("x", float(i), i)
        train()
        gc.collect()  # the logger object is gone; its queued records are not
    """)
    assert proc.returncode == 0, proc.stderr
    assert read_scalars(tmp_path)["step"].tolist() == list(range(50_000))
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "FINISHED"


def test_an_uncaught_exception_ends_the_run_failed_after_delivering(tmp_path) -> None:
    proc = run_child(f"""
        import steplog
        lg = steplog.FileLogger({str(tmp_path)!r})
        lg.log_scalar("x", 1.0)
        raise RuntimeError("boom")
    """)
    assert proc.returncode == 1 and "boom" in proc.stderr
    assert read_scalars(tmp_path)["value"].tolist() == [1.0]
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "FAILED"


def test_sigterm_flushes_and_ends_the_run_killed(tmp_path) -> None:
    ready = tmp_path / "ready"
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time, steplog
        lg = steplog.FileLogger({str(run)!r})
        i = 0
        pathlib.Path({str(ready)!r}).touch()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            lg.log_scalar("x", float(i), i)
            i += 1
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        time.sleep(0.3)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 143, err
    df = read_scalars(run)
    assert len(df) > 0
    assert df["step"].tolist() == list(range(len(df)))  # a complete prefix, nothing missing
    assert json.loads((run / "run.json").read_text())["status"] == "KILLED"


@pytest.mark.parametrize(("code", "status"), [(0, "FINISHED"), (None, "FINISHED"),
                                             (1, "FAILED"), ("'stopped'", "FAILED")])
def test_sys_exit_inside_with_ends_the_run_as_the_exit_status_says(
    tmp_path, code: object, status: str
) -> None:
    proc = run_child(f"""
        import sys, steplog
        with steplog.FileLogger({str(tmp_path)!r}) as lg:
            lg.log_scalar("x", 1.0, 0)
            sys.exit({code})
    """)
    assert proc.returncode == (0 if code in (0, None) else 1), proc.stderr
    assert json.loads((tmp_path / "run.json").read_text())["status"] == status


WITH_BLOCKS = {
    "with": """
        import pathlib, time, steplog
        with steplog.FileLogger({run!r}) as lg:
            lg.log_scalar("x", 1.0, 0)
            pathlib.Path({ready!r}).touch()
            time.sleep(30)
    """,
    "async with": """
        import asyncio, pathlib, steplog
        async def main():
            async with steplog.FileLogger({run!r}) as lg:
                lg.log_scalar("x", 1.0, 0)
                pathlib.Path({ready!r}).touch()
                await asyncio.sleep(30)
        asyncio.run(main())
    """,
}


@pytest.mark.parametrize("block", sorted(WITH_BLOCKS))
def test_sigterm_inside_with_ends_the_run_killed(tmp_path, block: str) -> None:
    ready = tmp_path / "ready"
    run = tmp_path / "run"
    code = WITH_BLOCKS[block].format(run=str(run), ready=str(ready))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 143, err
    assert json.loads((run / "run.json").read_text())["status"] == "KILLED"


def test_kill_9_loses_at_most_the_records_not_yet_written_and_leaves_whole_lines(tmp_path) -> None:
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time, steplog
        lg = steplog.FileLogger({str(tmp_path)!r})
        i = 0
        end = time.monotonic() + 30
        while time.monotonic() < end:
            lg.log_scalar("x", float(i), i)
            i += 1
            if i == 50_000:
                lg.flush()
                pathlib.Path({str(ready)!r}).touch()
    """)])
    try:
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        child.kill()
    lines = (tmp_path / "scalars.jsonl").read_bytes().split(b"\n")
    whole = [json.loads(line) for line in lines[:-1]]
    assert len(whole) >= 50_000  # everything flushed before the kill survived
    assert [r["step"] for r in whole] == list(range(len(whole)))
    assert not (tmp_path / "run.json").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_an_inert_logger_and_sends_no_duplicates(tmp_path) -> None:
    logger = FileLogger(tmp_path, options=Options(drain_interval_s=0.5))
    for i in range(1000):
        logger.log_scalar("parent", float(i), i)
    pid = os.fork()
    if pid == 0:  # the child: log, flush and close must neither hang nor write anything
        code = 0
        try:
            if logger.state is not State.INERT:
                os._exit(5)
            logger.log_scalar("child", 1.0, 0)
            logger.log_metrics({"child": 2.0})
            if not logger.flush(1) or not logger.close(1):
                code = 3
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert logger.close(10)
    df = read_scalars(tmp_path)
    assert df["name"].tolist() == ["parent"] * 1000
    assert df["step"].tolist() == list(range(1000))


def test_a_forked_child_process_pool_with_a_live_logger_does_not_deadlock(tmp_path) -> None:
    proc = run_child(f"""
        import multiprocessing as mp, steplog
        lg = steplog.FileLogger({str(tmp_path)!r})
        for i in range(10_000):
            lg.log_scalar("x", float(i))
        def work(k):
            lg.log_scalar("in_child", float(k))
            return k * 2
        if __name__ == "__main__":
            with mp.get_context("fork").Pool(2) as pool:
                print(sum(pool.map(work, range(20))))
            print(bool(lg.close(30)))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["380", "True"]
    assert set(read_scalars(tmp_path)["name"]) == {"x"}


def test_sigterm_ends_a_forked_child_at_once_as_without_steplog(tmp_path) -> None:
    proc = run_child(f"""
        import os, signal, time, steplog
        lg = steplog.FileLogger({str(tmp_path)!r})
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)
        print(bool(lg.close(30)))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]  # the default action, not SystemExit(143)


def test_a_logger_created_in_a_forked_child_flushes_on_sigterm(tmp_path) -> None:
    proc = run_child(f"""
        import os, signal, time, steplog
        parent = steplog.FileLogger({str(tmp_path / "parent")!r})
        pid = os.fork()
        if pid == 0:
            lg = steplog.FileLogger({str(tmp_path / "child")!r})
            lg.log_scalar("child", 1.0, 0)
            time.sleep(30)
            os._exit(0)
        time.sleep(1.0)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        print(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 143)
        print(bool(parent.close(30)))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]
    assert read_scalars(tmp_path / "child")["name"].tolist() == ["child"]


SLOW_FILE_SINK = """
import pathlib, sys, time, steplog
class SlowFileSink(steplog.FileSink):
    '''A file sink on a slow disk: every write and the end of the run take a while.'''
    def write(self, records):
        time.sleep(0.05)
        super().write(records)
    def close(self, status):
        time.sleep(1.0)
        super().close(status)
"""


def wait_for(path: Path, timeout_s: float = 30) -> None:
    end = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


def test_a_second_sigterm_during_the_exit_close_does_not_abort_it(tmp_path) -> None:
    run, ready, exiting = tmp_path / "run", tmp_path / "ready", tmp_path / "exiting"
    child = subprocess.Popen([sys.executable, "-c", SLOW_FILE_SINK + textwrap.dedent(f"""
        import atexit
        lg = steplog.Logger(sinks=[SlowFileSink({str(run)!r})])
        atexit.register(pathlib.Path({str(exiting)!r}).touch)  # runs just before the exit close
        for i in range(20_000):
            lg.log_scalar("x", float(i), i)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(60)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready)
        child.send_signal(signal.SIGTERM)
        wait_for(exiting)
        time.sleep(0.2)  # the exit close is now ending the run (1 s)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 143, err
    assert read_scalars(run)["step"].tolist() == list(range(20_000))
    assert json.loads((run / "run.json").read_text())["status"] == "KILLED"


def test_sigterm_during_a_close_lets_it_finish_then_exits_143(tmp_path) -> None:
    run, closing = tmp_path / "run", tmp_path / "closing"
    child = subprocess.Popen([sys.executable, "-c", SLOW_FILE_SINK + textwrap.dedent(f"""
        lg = steplog.Logger(sinks=[SlowFileSink({str(run)!r})])
        lg.log_scalar("x", 1.0, 0)
        pathlib.Path({str(closing)!r}).touch()
        result = lg.close(30)
        print("close returned", bool(result))
        time.sleep(60)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(closing)
        time.sleep(0.3)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 143, err
    assert "close returned" not in out  # the SIGTERM exit followed the close at once
    assert json.loads((run / "run.json").read_text())["status"] == "FINISHED"


def test_the_exit_close_does_not_wait_forever_for_a_close_stuck_in_another_thread(
    tmp_path,
) -> None:
    start = time.monotonic()
    proc = run_child(f"""
        import sys, threading, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from sinks_for_tests import ListSink
        import steplog
        gate = threading.Event()  # never set: the backend hangs
        lg = steplog.Logger(sinks=[ListSink(release=gate)],
                            options=steplog.Options(exit_timeout_s=1.0))
        lg.log_scalar("x", 1.0)
        threading.Thread(target=lg.close, args=(60,), daemon=True).start()
        time.sleep(0.3)
    """)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 15
    assert "steplog: at exit (timed out), 1 of 1 records were not delivered" in proc.stderr


def test_exiting_with_undelivered_records_prints_one_line_saying_how_many_and_where(
    tmp_path,
) -> None:
    from mlflow_support import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_child(f"""
        import warnings, steplog
        warnings.simplefilter("ignore")
        lg = steplog.MLFlowLogger("exp", tracking_uri={url!r},
                                  options=steplog.Options(exit_timeout_s=1.0))
        for i in range(10):
            lg.log_scalar("loss", float(i), i)
    """)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("steplog:")
             and not line.startswith("steplog: journal in ")]  # printed at the start
    assert len(lines) == 1, proc.stderr
    assert "10 of 10 records were not delivered to mlflow" in lines[0]
    assert url in lines[0] and "Connection refused" in lines[0]


def test_sigterm_after_the_exit_close_ends_the_process_at_once_as_without_steplog(
    tmp_path,
) -> None:
    ready, cleanup = tmp_path / "ready", tmp_path / "cleanup"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import atexit, pathlib, time, steplog
        def hanging_cleanup():  # another library's exit hook, run after steplog's exit close
            pathlib.Path({str(cleanup)!r}).touch()
            time.sleep(60)
        atexit.register(hanging_cleanup)
        lg = steplog.FileLogger({str(tmp_path / "run")!r})
        lg.log_scalar("x", 1.0, 0)
        pathlib.Path({str(ready)!r}).touch()
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready)
        wait_for(cleanup)
        child.send_signal(signal.SIGTERM)
        child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGTERM
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "FINISHED"


def test_ctrl_c_during_the_exit_close_reports_every_logger_not_closed(tmp_path) -> None:
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, sys, threading
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from sinks_for_tests import ListSink
        import steplog
        gate = threading.Event()  # never set: both backends hang
        first = steplog.Logger(sinks=[ListSink(release=gate)],
                               options=steplog.Options(exit_timeout_s=30))
        second = steplog.Logger(sinks=[ListSink(release=gate)],
                                options=steplog.Options(exit_timeout_s=30))
        for i in range(3):
            first.log_scalar("a", 1.0, i)
        for i in range(5):
            second.log_scalar("b", 1.0, i)
        pathlib.Path({str(ready)!r}).touch()
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready)
        time.sleep(1.0)  # the exit close now waits for the first logger
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
    finally:
        child.kill()
    lines = [line for line in err.splitlines() if line.startswith("steplog: at exit")]
    assert len(lines) == 2, err
    assert "(interrupted), 3 of 3 records were not delivered" in lines[0]
    assert "(interrupted), 5 of 5 records were not delivered" in lines[1]


def test_a_child_forked_while_the_parent_closes_gets_sigterm_as_its_own(tmp_path) -> None:
    got = tmp_path / "got-sigterm"
    proc = run_child(f"""
        import os, pathlib, sys, threading, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from sinks_for_tests import ListSink
        import steplog
        gate = threading.Event()
        lg = steplog.Logger(sinks=[ListSink(release=gate)])
        lg.log_scalar("x", 1.0, 0)
        def fork_soon():
            time.sleep(0.5)  # the main thread is inside close() now
            pid = os.fork()
            if pid == 0:
                child = steplog.FileLogger({str(tmp_path / "child-run")!r})
                child.log_scalar("y", 1.0, 0)
                try:
                    os.kill(os.getpid(), 15)
                    time.sleep(10)
                except SystemExit as exc:  # the handler of the child's own logger
                    child.close(10, status="KILLED")
                    pathlib.Path({str(got)!r}).write_text(str(exc.code))
                os._exit(0)
            os.waitpid(pid, 0)
            gate.set()
        thread = threading.Thread(target=fork_soon)
        thread.start()
        lg.close(timeout=40)
        thread.join()
    """)
    assert proc.returncode == 0, proc.stderr
    assert got.read_text() == "143"  # at once, not left pending for the parent's close
    assert json.loads((tmp_path / "child-run" / "run.json").read_text())["status"] == "KILLED"


def test_leaving_a_with_block_whose_close_timed_out_warns_what_did_not_arrive(
    tmp_path,
) -> None:
    proc = run_child(f"""
        import sys, threading
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from sinks_for_tests import ListSink
        import steplog
        gate = threading.Event()  # never set: the backend hangs
        with steplog.Logger(sinks=[ListSink(release=gate)],
                            options=steplog.Options(timeout_s=0.5)) as lg:
            lg.log_scalar("x", 1.0, 0)
        print("closed:", bool(lg.close(0)))
    """)
    assert "closed: False" in proc.stdout, proc.stderr
    assert ("SteplogWarning: steplog: leaving a with block (timed out), 1 of 1 records were "
            "not delivered") in proc.stderr


def test_a_short_script_that_exits_without_close_delivers_to_mlflow(mlflow_server) -> None:
    import uuid

    name = f"short-{uuid.uuid4().hex[:8]}"
    proc = run_child(f"""
        import steplog
        lg = steplog.MLFlowLogger({name!r}, tracking_uri={mlflow_server.url!r})
        for i in range(100):
            lg.log_scalar("loss", float(i), i)
        print(lg.run_id)
    """)
    assert proc.returncode == 0, proc.stderr
    # Only the line naming the journal at the start: nothing about undelivered records.
    assert [line for line in proc.stderr.splitlines() if line.startswith("steplog:")
            and not line.startswith("steplog: journal in ")] == []
    exp = mlflow_server.api("experiments/get-by-name", experiment_name=name)["experiment"]
    runs = mlflow_server.api("runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    (run,) = runs
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    assert [m["step"] for m in mlflow_server.metric_history(run_id, "loss")] == list(range(100))
