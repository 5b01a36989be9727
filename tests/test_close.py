"""Guarantee 3 (close) and habit 7: close is bounded, idempotent, and final."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sinks_for_tests import ListSink
from steplog import FileLogger, Logger, LoggerClosedError, Options
from waiting import wait_until

FAST = Options(drain_interval_s=0.005)


def test_close_delivers_everything_and_ends_the_run_finished() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=FAST)
    for i in range(1000):
        logger.log_scalar("x", float(i))
    result = logger.close(10)
    assert result and result.delivered == 1000 and result.undelivered == 0
    assert len(sink.records) == 1000
    assert sink.closed_with == "FINISHED"


def test_close_twice_returns_the_same_result() -> None:
    logger = Logger(sinks=[ListSink()], options=FAST)
    logger.log_scalar("x", 1.0)
    first = logger.close(10)
    assert logger.close(10) == first


def test_logging_after_close_raises_a_clear_error(tmp_path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    logger.close(10)
    with pytest.raises(LoggerClosedError, match="closed"):
        logger.log_scalar("x", 1.0)
    with pytest.raises(LoggerClosedError):
        logger.log_metrics({"x": 1.0})
    with pytest.raises(LoggerClosedError):
        logger.log_parameters({"a": 1})


def test_a_closed_logger_without_sinks_also_refuses_logging() -> None:
    logger = Logger()
    assert logger.close()
    with pytest.raises(LoggerClosedError):
        logger.log_scalar("x", 1.0)


def test_close_with_a_hung_backend_returns_within_its_timeout_and_counts_the_loss() -> None:
    gate = threading.Event()
    sink = ListSink(release=gate)
    logger = Logger(sinks=[sink], options=FAST)
    for i in range(5):
        logger.log_scalar("x", float(i))
    start = time.monotonic()
    result = logger.close(0.5)
    elapsed = time.monotonic() - start
    gate.set()
    assert elapsed < 1.5
    assert not result
    assert result.timed_out
    assert result.undelivered == 5


def test_context_manager_closes_and_marks_a_failed_run() -> None:
    sink = ListSink()
    with pytest.raises(RuntimeError), Logger(sinks=[sink], options=FAST) as logger:
        logger.log_scalar("x", 1.0)
        raise RuntimeError("training crashed")
    assert sink.closed_with == "FAILED"
    assert [r.name for r in sink.records] == ["x"]


def test_close_status_is_passed_to_the_sink() -> None:
    sink = ListSink()
    Logger(sinks=[sink], options=FAST).close(10, status="KILLED")
    assert sink.closed_with == "KILLED"


def test_close_stops_the_worker_threads() -> None:
    before = {t.name for t in threading.enumerate()}
    logger = Logger(sinks=[ListSink()], options=FAST)
    logger.log_scalar("x", 1.0)
    logger.close(10)
    time.sleep(0.05)
    leftover = {t.name for t in threading.enumerate() if t.name.startswith("steplog")} - before
    assert leftover == set()


def test_close_does_not_wait_a_drain_interval_for_the_last_records() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=3600, timeout_s=30))
    logger.log_scalar("x", 1.0, 0)
    start = time.monotonic()
    result = logger.close()
    assert result and result.delivered == 1
    assert time.monotonic() - start < 2.0


class SlowSink(ListSink):
    """A sink whose run takes ``open_s`` to open and whose batches take ``write_s`` each."""

    kind = "slow"

    def __init__(self, open_s: float = 0.0, write_s: float = 0.0, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.open_s, self.write_s = open_s, write_s

    def open(self) -> None:
        time.sleep(self.open_s)
        super().open()

    def write(self, records: object) -> None:
        time.sleep(self.write_s)
        super().write(records)  # type: ignore[arg-type]

    def target(self) -> dict[str, object]:
        return {"test": True}


def kept_names(runs: object) -> list[str]:
    from steplog.kept import find_kept

    return [k.artifact.name for k in find_kept(runs)]  # type: ignore[arg-type]


def test_an_upload_in_flight_when_the_close_deadline_passes_is_kept_for_sync(tmp_path) -> None:
    release = threading.Event()
    sink = SlowSink(upload_release=release)
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.005,
                                                  runs_dir=str(tmp_path)))
    try:
        logger.log_text("a note", "note")
        time.sleep(0.2)  # the lane took it; the backend does not answer
        result = logger.close(0.5)
        assert result.timed_out and kept_names(tmp_path) == ["note.txt"]
    finally:
        release.set()


def test_a_timed_out_close_names_where_the_upload_in_flight_is_kept(tmp_path) -> None:
    from steplog.kept import find_kept

    release = threading.Event()
    sink = SlowSink(upload_release=release)
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.005,
                                                  runs_dir=str(tmp_path)))
    try:
        logger.log_text("a note", "note")
        time.sleep(0.2)
        result = logger.close(0.5)
        (kept,) = find_kept(tmp_path)
        (on_the_way,) = [loss for loss in result.losses
                         if loss.record == "records still on the way"]
        assert on_the_way.reason.endswith(
            f"; artifact 'note.txt' in flight is kept in {kept.folder}, upload it later with: "
            f"steplog sync {kept.folder}")
    finally:
        release.set()


def test_an_upload_taken_while_the_run_still_opens_is_kept_when_the_deadline_passes(
    tmp_path,
) -> None:
    logger = Logger(sinks=[SlowSink(open_s=2.0)],
                    options=Options(drain_interval_s=0.005, runs_dir=str(tmp_path)))
    logger.log_text("a note", "note")
    time.sleep(0.2)
    result = logger.close(0.5)
    assert result.timed_out and kept_names(tmp_path) == ["note.txt"]


def test_an_upload_queued_behind_a_stalled_drain_is_kept_when_the_deadline_passes(
    tmp_path,
) -> None:
    sink = SlowSink(write_s=2.0, max_batch=1)
    logger = Logger(sinks=[sink], options=Options(lane_capacity=1, drain_interval_s=0.05,
                                                  runs_dir=str(tmp_path)))
    logger.log_scalar("a", 0.0, 0)
    logger.log_scalar("a", 0.5, 1)
    time.sleep(0.3)  # one scalar being written, one waiting: the lane is full
    for i in range(2, 10):
        logger.log_scalar("a", float(i), i)
    time.sleep(0.3)  # the drain thread waits for room with those
    logger.log_text("a note", "note")
    result = logger.close(0.5)
    assert result.timed_out and kept_names(tmp_path) == ["note.txt"]


def test_snapshots_waiting_behind_an_upload_that_ends_during_the_keeping_are_all_kept(
    tmp_path, monkeypatch
) -> None:
    from steplog.kept import Keeper

    release = threading.Event()
    keep = Keeper.keep

    def keep_and_release(self: Keeper, *args: object, **kw: object) -> object:
        release.set()  # the upload in flight answers while the close keeps the others
        return keep(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Keeper, "keep", keep_and_release)
    sink = SlowSink(upload_release=release)
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.005,
                                                  runs_dir=str(tmp_path)))
    logger.log_text("x", "slow")
    time.sleep(0.2)  # in flight, waiting for the release
    for i in range(6):
        logger.save_agent({"w": list(range(1000)), "i": i}, f"agent{i}.pkl")
    time.sleep(0.1)
    result = logger.close(0.3)
    assert result.timed_out
    time.sleep(0.5)  # the upload in flight has ended, and with it the last lane
    # (Whether the upload in flight was kept too depends on who ran first: it or the close.)
    kept = sorted(name for name in kept_names(tmp_path) if name != "slow.txt")
    assert kept == [f"agent{i}.pkl" for i in range(6)]


def test_a_run_still_ending_when_the_close_deadline_passes_is_marked_for_sync_until_ended(
    tmp_path,
) -> None:
    import json

    from sinks_for_tests import JournaledListSink

    class SlowToEnd(JournaledListSink):
        def close(self, status: object) -> None:
            time.sleep(2.0)
            super().close(status)  # type: ignore[arg-type]

    logger = Logger(sinks=[SlowToEnd()], options=Options(drain_interval_s=0.005,
                                                          runs_dir=str(tmp_path)))
    logger.log_scalar("x", 1.0, 0)
    result = logger.close(0.5)
    assert result.timed_out and result.sync is not None
    (run_dir,) = tmp_path.iterdir()
    (info,) = json.loads((run_dir / "run.json").read_text())["sinks"].values()
    assert "close deadline passed" in info["end_failed"]  # what a sync after an exit needs
    assert wait_for(lambda: not run_dir.exists(), 10)  # ended after all: nothing left


def wait_for(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_show_of_a_run_directory_left_with_kept_uploads_only_lists_them(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    from steplog.cli import main

    release = threading.Event()
    logger = Logger(sinks=[SlowSink(upload_release=release)],
                    options=Options(drain_interval_s=0.005, runs_dir=str(tmp_path)))
    try:
        logger.log_text("a note", "note")
        time.sleep(0.2)
        assert logger.close(0.5).timed_out
        (run_dir,) = tmp_path.iterdir()
        assert main(["show", str(run_dir)]) == 0  # while the upload is still on its way
    finally:
        release.set()
    out = capsys.readouterr().out
    assert "upload note.txt -> slow" in out and f"steplog sync {run_dir}" in out


def test_an_upload_kept_by_a_timed_out_close_that_then_arrives_is_no_longer_kept(
    tmp_path: Path,
) -> None:
    from steplog.kept import find_kept

    release = threading.Event()
    sink = SlowSink(upload_release=release)
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.005, runs_dir=str(tmp_path)))
    try:
        logger.log_text("a note", "note")
        time.sleep(0.2)
        assert logger.close(0.5).timed_out
        assert [k.artifact.name for k in find_kept(tmp_path)] == ["note.txt"]
    finally:
        release.set()
    assert wait_until(lambda: not list(find_kept(tmp_path)), 10)
    assert [a.name for a in sink.uploads] == ["note.txt"]


def keeping_time(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """A close keeps uploads for ``seconds`` after its deadline (5 s in the library)."""
    import steplog.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_KEEP_AFTER_DEADLINE_S", seconds)


class SlowToWrite:
    """An agent whose snapshot takes ``write_s`` to write, or until ``release`` is set."""

    release = threading.Event()

    def __init__(self, write_s: float) -> None:
        self.write_s = write_s

    def __deepcopy__(self, memo: object) -> SlowToWrite:
        return SlowToWrite(self.write_s)

    def __reduce__(self) -> tuple[type, tuple[float]]:
        SlowToWrite.release.wait(self.write_s)
        return (SlowToWrite, (self.write_s,))


@contextlib.contextmanager
def file_logger_writing_slowly(tmp_path: Path) -> Iterator[FileLogger]:
    """A file logger whose :class:`SlowToWrite` snapshots are released when the block ends."""
    SlowToWrite.release.clear()
    logger = FileLogger(tmp_path / "run", options=Options(drain_interval_s=0.005,
                                                          runs_dir=str(tmp_path / "runs")))
    try:
        yield logger
    finally:
        SlowToWrite.release.set()


def test_a_close_past_its_deadline_does_not_wait_out_a_snapshot_a_lane_is_writing(
    tmp_path, monkeypatch
) -> None:
    keeping_time(monkeypatch, 1.0)
    with file_logger_writing_slowly(tmp_path) as logger:
        logger.save_agent({"obj": SlowToWrite(30.0)}, name="agent.pkl")
        time.sleep(0.3)  # the uploads lane is writing its snapshot
        start = time.monotonic()
        result = logger.close(0.5)
        assert time.monotonic() - start < 4.0
        assert result.timed_out and not result


def test_snapshots_the_close_has_no_time_left_to_write_are_counted_failed_and_not_kept(
    tmp_path, monkeypatch
) -> None:
    keeping_time(monkeypatch, 0.5)
    with file_logger_writing_slowly(tmp_path) as logger:
        logger.save_agent({"obj": SlowToWrite(30.0)}, name="busy.pkl")
        logger.save_agent({"obj": SlowToWrite(0.1)}, name="kept.pkl")  # fits the 0.5 s
        logger.save_agent({"obj": SlowToWrite(1.0)}, name="late.pkl")  # ends after them
        time.sleep(0.3)
        result = logger.close(0.3)
        reasons = {loss.record: loss.reason for loss in result.losses}
        assert "kept in" in reasons["artifact 'kept.pkl'"]
        assert reasons["artifact 'late.pkl'"].endswith(
            "(not kept: the close had no time left to keep it)")
        assert kept_names(tmp_path / "runs") == ["kept.pkl"]


def test_a_timed_out_close_says_the_upload_in_flight_is_not_kept_while_its_snapshot_is_written(
    tmp_path, monkeypatch
) -> None:
    keeping_time(monkeypatch, 0.5)
    with file_logger_writing_slowly(tmp_path) as logger:
        logger.save_agent({"obj": SlowToWrite(30.0)}, name="busy.pkl")
        time.sleep(0.3)
        result = logger.close(0.3)
        (on_the_way,) = result.losses
        assert on_the_way.record == "records still on the way"
        assert on_the_way.reason.endswith(
            "; artifact 'busy.pkl' in flight is not kept: its snapshot was still being written")


def test_a_close_past_its_deadline_does_not_wait_out_the_drain_threads_snapshot_writes(
    tmp_path, monkeypatch
) -> None:
    keeping_time(monkeypatch, 1.0)
    release = threading.Event()
    logger = drain_thread_holding_two_snapshots(tmp_path, 6.0, release)
    try:
        start = time.monotonic()
        result = logger.close(0.5)
        assert time.monotonic() - start < 3.0  # 0.5 s, then 1 s of keeping
        assert result.timed_out
    finally:
        release.set()
        SlowToWrite.release.set()


def test_copies_into_the_run_directory_start_only_within_the_closes_keeping_time(
    tmp_path, monkeypatch
) -> None:
    from steplog.kept import Keeper

    keeping_time(monkeypatch, 1.0)
    keep = Keeper.keep

    def slow_disk(self: Keeper, *args: object, **kw: object) -> object:
        time.sleep(0.7)  # a large payload copied across file systems
        return keep(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Keeper, "keep", slow_disk)
    release = threading.Event()
    logger = Logger(sinks=[SlowSink(upload_release=release)],
                    options=Options(drain_interval_s=0.005, runs_dir=str(tmp_path)))
    try:
        logger.log_text("x", "in-flight")
        time.sleep(0.2)
        for i in range(6):
            logger.log_text("x" * 10, f"w{i}")
        time.sleep(0.2)
        start = time.monotonic()
        result = logger.close(0.3)
        assert time.monotonic() - start < 2.5  # 0.3 s, 1 s of keeping, one copy begun in it
        reasons = [loss.reason for loss in result.losses if loss.record.startswith("artifact")]
        assert len(reasons) == 6
        assert reasons[-1].endswith("(not kept: the close had no time left to keep it)")
    finally:
        release.set()


def test_a_snapshot_whose_write_outlasts_the_keeping_time_is_not_also_copied_after_it(
    tmp_path, monkeypatch
) -> None:
    from steplog.kept import Keeper

    keeping_time(monkeypatch, 0.5)
    copies: list[str] = []
    keep = Keeper.keep

    def counted(self: Keeper, sink: object, artifact: object, reason: str) -> object:
        copies.append(artifact.name)  # type: ignore[attr-defined]
        return keep(self, sink, artifact, reason)  # type: ignore[arg-type]

    monkeypatch.setattr(Keeper, "keep", counted)
    SlowToWrite.release.clear()
    release = threading.Event()
    logger = Logger(sinks=[SlowSink(upload_release=release)],
                    options=Options(drain_interval_s=0.005, runs_dir=str(tmp_path)))
    try:
        logger.log_text("in flight", "a")
        time.sleep(0.2)
        logger.save_agent({"obj": SlowToWrite(1.5)}, name="big.pkl")  # waits in the lane
        time.sleep(0.2)
        result = logger.close(0.3)
        reasons = {loss.record: loss.reason for loss in result.losses}
        assert reasons["artifact 'big.pkl'"].endswith(
            "(not kept: the close had no time left to keep it)")
        assert "big.pkl" not in copies
    finally:
        release.set()


def test_a_timed_out_close_names_the_uploads_the_drain_thread_still_holds(
    tmp_path, monkeypatch
) -> None:
    keeping_time(monkeypatch, 1.0)
    release = threading.Event()
    logger = drain_thread_holding_two_snapshots(tmp_path, 3.0, release)
    try:
        result = logger.close(0.5)
        (on_the_way,) = [loss for loss in result.losses
                         if loss.record == "records still on the way"]
        assert ("artifact 'd.pkl' still with the drain thread, each kept for steplog sync"
                in on_the_way.reason)
    finally:
        release.set()
        SlowToWrite.release.set()


def drain_thread_holding_two_snapshots(tmp_path, write_s: float,
                                       release: threading.Event) -> Logger:
    """A logger whose uploads lane has one upload in flight (until ``release``) and one waiting
    (the lane is full), and whose drain thread holds two snapshots that take ``write_s`` each
    to write."""
    SlowToWrite.release.clear()
    logger = Logger(sinks=[SlowSink(upload_release=release)],
                    options=Options(drain_interval_s=0.005, lane_capacity=1,
                                    runs_dir=str(tmp_path)))
    logger.log_text("in flight", "a")
    time.sleep(0.2)
    logger.log_text("waiting", "b")
    logger.save_agent({"obj": SlowToWrite(write_s)}, name="c.pkl")
    logger.save_agent({"obj": SlowToWrite(write_s)}, name="d.pkl")
    time.sleep(0.2)
    return logger
