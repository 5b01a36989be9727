"""The file sink's writer process: at high rates the scalar lines are encoded and written in a
child process, with the same lines, nothing lost or doubled when it dies, and nothing started
at low rates."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from steplog import FileLogger, FileSink, Options, SteplogWarning
from steplog.sinks.file import OFFLOAD_ROWS
from waiting import wait_until

FAST = Options(drain_interval_s=0.01)


def sink_of(logger: FileLogger) -> FileSink:
    sink = logger._sinks[0]
    assert isinstance(sink, FileSink)
    return sink


def wait_hosted(sink: FileSink, timeout_s: float = 60.0) -> int:
    """The writer process's pid, once the sink sends it batches."""
    assert wait_until(lambda: sink._hosted, timeout_s, interval_s=0.01), \
        "the writer process did not start"
    assert sink.host is not None and sink.host.pid is not None
    return sink.host.pid


def lines(path: Path) -> list[tuple[str, float, int]]:
    text = (path / "scalars.jsonl").read_text()
    return [(r["name"], r["value"], r["step"]) for r in map(json.loads, text.splitlines())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def log_everything(logger: FileLogger) -> None:
    logger.log_parameters({"lr": 0.1, "layers": [64, 64]})
    for i in range(3_000):
        logger.log_scalar("loss", 1.0 / (i + 1), i)
        logger.log_metrics({"a/b": float(i), "c": -i * 0.5}, i)
    logger.log_scalar("odd", math.nan, 0)
    logger.log_scalar("odd", math.inf, 1)
    logger.log_scalar("odd", -math.inf, 2)
    logger.log_scalar("name \"quoted\" \\ é", 2.5, 3)


def test_the_writer_process_writes_the_lines_the_worker_thread_writes(tmp_path: Path) -> None:
    hosted = FileLogger(tmp_path / "hosted", options=FAST, offload="always")
    wait_hosted(sink_of(hosted))
    here = FileLogger(tmp_path / "here", options=FAST, offload="never")
    for logger in (hosted, here):
        log_everything(logger)
        assert logger.close(60)
    got, expected = lines(tmp_path / "hosted"), lines(tmp_path / "here")
    assert len(got) == 3 * 3_000 + 4
    assert str(got) == str(expected)  # NaN compares unequal to itself; its repr does not
    for name in ("parameters.json", "scalars.json"):
        assert (tmp_path / "hosted" / name).read_text() == (tmp_path / "here" / name).read_text()
    assert sink_of(here).host is None


def test_a_slow_logger_starts_no_writer_process(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    for i in range(1_000):
        logger.log_scalar("loss", 0.5, i)
    assert logger.flush(30)
    assert sink_of(logger).host is None
    assert logger.close(30)
    assert sink_of(logger).host is None


def test_batches_of_offload_rows_that_keep_coming_start_the_writer_process(
    tmp_path: Path,
) -> None:
    logger = FileLogger(tmp_path)
    n = 2 * OFFLOAD_ROWS
    step = 0
    deadline = time.monotonic() + 30
    while sink_of(logger).host is None:  # a rate of large batches, for half a second
        assert time.monotonic() < deadline
        for _ in range(n):
            logger.log_scalar("loss", 0.5, step)
            step += 1
        assert logger.flush(30)
        time.sleep(0.1)
    pid = wait_hosted(sink_of(logger))
    for _ in range(n):
        logger.log_scalar("loss", 0.5, step)
        step += 1
    assert logger.close(60)
    assert [s for _, _, s in lines(tmp_path)] == list(range(step))
    assert not alive(pid)  # close() ended it


def test_a_backlog_drained_at_close_starts_no_writer_process(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path)
    for i in range(12 * OFFLOAD_ROWS):  # several full batches, drained back to back
        logger.log_scalar("loss", 0.5, i)
    assert logger.close(60)
    assert sink_of(logger).host is None


def test_params_msgpack_cannot_encode_are_stored_while_the_writer_process_writes(
    tmp_path: Path,
) -> None:
    logger = FileLogger(tmp_path, options=FAST, offload="always")
    wait_hosted(sink_of(logger))
    logger.log_parameters({"seed": 2**70})
    logger.log_scalar("loss", 0.5, 0)
    assert logger.close(60)
    # Captured as its decimal text, as the journal and every other sink hold it.
    assert json.loads((tmp_path / "parameters.json").read_text()) == {"seed": str(2**70)}
    assert lines(tmp_path) == [("loss", 0.5, 0)]


def test_a_writer_process_killed_mid_run_loses_and_doubles_nothing(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST, offload="always")
    sink = sink_of(logger)
    first = wait_hosted(sink)
    n = 300_000
    for i in range(n):
        logger.log_scalar("loss", float(i), i)
        if i == n // 3:
            os.kill(first, signal.SIGKILL)
    result = logger.close(120)
    assert result, result
    got = lines(tmp_path)
    assert [step for _, _, step in got] == list(range(n))
    assert all(value == step for _, value, step in got)
    assert logger.stats().retried == 0  # the sink wrote the interrupted batch itself, at once


def test_writer_processes_killed_again_and_again_are_replaced_three_times_at_most(
    tmp_path: Path,
) -> None:
    logger = FileLogger(tmp_path, options=FAST, offload="always")
    sink = sink_of(logger)
    wait_hosted(sink)
    step = 0
    for _ in range(6):
        for _ in range(20_000):
            logger.log_scalar("loss", 0.5, step)
            step += 1
        assert logger.flush(60)
        pid = sink.host.pid if sink.host is not None else None
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)  # a replacement may start meanwhile
    for _ in range(1_000):
        logger.log_scalar("loss", 0.5, step)
        step += 1
    assert logger.close(60)
    assert sink.host is not None and sink.host.starts <= 3
    assert [s for _, _, s in lines(tmp_path)] == list(range(step))


def test_a_writer_process_refuses_a_path_that_names_another_file_now(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    logger.log_scalar("loss", 0.5, 0)
    assert logger.flush(30)
    (tmp_path / "scalars.jsonl").rename(tmp_path / "moved.jsonl")
    (tmp_path / "scalars.jsonl").write_bytes(b"")
    sink = sink_of(logger)
    with pytest.warns(SteplogWarning, match="writer process .* did not start"):
        step = 1
        end = time.monotonic() + 60
        while sink.host is None or sink._starting:  # a rate of large batches, then the start
            assert time.monotonic() < end
            for _ in range(2 * OFFLOAD_ROWS):
                logger.log_scalar("loss", 0.5, step)
                step += 1
            assert logger.flush(30)
            time.sleep(0.1)
    assert not sink._hosted
    assert logger.flush(30)
    moved = [json.loads(line)["step"] for line in (tmp_path / "moved.jsonl").open()]
    assert moved == list(range(step))  # the worker thread went on writing the sink's file
    assert (tmp_path / "scalars.jsonl").read_bytes() == b""
    logger.close(30)


def test_an_unknown_offload_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="offload"):
        FileLogger(tmp_path, offload="sometimes")  # type: ignore[arg-type]


def test_a_close_waits_at_most_a_second_for_a_stopped_idle_writer(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST, offload="always")
    pid = wait_hosted(sink_of(logger))
    for i in range(100):
        logger.log_scalar("x", float(i), i)
    assert logger.flush(30)
    os.kill(pid, signal.SIGSTOP)  # idle and stopped: it holds nothing that was not written
    try:
        start = time.monotonic()
        result = logger.close(30)
        took = time.monotonic() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert result and took < 5, (result, took)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "FINISHED"
    assert (tmp_path / "scalars.json").exists()
    assert wait_until(lambda: not alive(pid), 10)


def test_params_alone_never_wait_for_the_writer_process(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST, offload="always")
    pid = wait_hosted(sink_of(logger))
    os.kill(pid, signal.SIGSTOP)  # a writer that would not answer
    try:
        logger.log_parameters({"lr": 0.1})
        logger.log_tags({"stage": "fit"})
        assert logger.flush(5)
        assert json.loads((tmp_path / "parameters.json").read_text()) == {"lr": 0.1}
    finally:
        os.kill(pid, signal.SIGCONT)
        assert logger.close(30)


def test_the_writer_process_starts_for_a_script_in_a_folder_whose_name_is_not_utf8(
    tmp_path: Path,
) -> None:
    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")  # Latin-1, not UTF-8
    os.mkdir(folder)
    script = os.path.join(folder, b"train.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    proc = subprocess.run([sys.executable, script, str(tmp_path / "run")], capture_output=True,
                          timeout=120, start_new_session=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode().split() == ["hosted", "True", "closed", "True"]
    assert lines(tmp_path / "run") == [("x", 1.0, 0)]


SCRIPT = """
import sys, time
from steplog import FileLogger, Options
lg = FileLogger(sys.argv[1], options=Options(drain_interval_s=0.01), offload="always")
sink = lg._sinks[0]
end = time.monotonic() + 60
while (sink._starting or not sink._hosted) and time.monotonic() < end:
    time.sleep(0.01)
lg.log_scalar("x", 1.0, 0)
print("hosted", sink._hosted, "closed", bool(lg.close(30)))
"""


def test_the_writer_process_starts_when_steplog_is_found_only_through_the_scripts_sys_path(
    tmp_path: Path,
) -> None:
    base = getattr(sys, "_base_executable", None)
    if sys.prefix == sys.base_prefix or base is None:
        pytest.skip("needs a virtual environment, whose base interpreter lacks steplog")
    # The modules `import steplog` loads from this environment, linked into a folder that
    # only the script puts on sys.path (a vendored copy, a notebook's path).
    found = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys, sysconfig
        before = set(sys.modules)
        import steplog
        roots = {name.partition(".")[0] for name in set(sys.modules) - before}
        for name in sorted(roots):
            where = getattr(sys.modules.get(name), "__file__", None)
            if where:
                print(name, where)
    """)], capture_output=True, text=True, timeout=60, check=True).stdout
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    stdlib = os.path.dirname(os.__file__)
    for line in found.splitlines():
        where = line.split(" ", 1)[1]
        if where.startswith(stdlib + os.sep) and "site-packages" not in where:
            continue
        source = Path(where).parent if Path(where).name == "__init__.py" else Path(where)
        (vendor / source.name).symlink_to(source)
    code = f"import sys; sys.path[:0] = [{str(vendor)!r}]\n" + SCRIPT
    proc = subprocess.run([base, "-c", code, str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=120, start_new_session=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["hosted", "True", "closed", "True"], proc.stderr
