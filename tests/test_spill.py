"""The ``spill`` queue-full policy and a journal that stops: the training loop never waits for
a stalled journaled sink, memory stays bounded, and a full disk is one clear error."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fault_proxy import FaultProxy
from fs_faults import small_fs  # noqa: F401 - a fixture
from mlflow_support import MlflowServer
from sinks_for_tests import JournaledListSink, ListSink
from steplog import (
    FileLogger,
    JournalStoppedError,
    Logger,
    MLFlowLogger,
    Options,
    RetryPolicy,
    SteplogWarning,
)
from steplog.journal import Journal
from steplog.records import Scalar
from waiting import wait_until

MB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def scalars(sink: ListSink) -> list[tuple[str, float, int]]:
    return [(r.name, r.value, r.step) for r in sink.records if isinstance(r, Scalar)]


def test_a_logger_with_a_journaled_sink_spills_by_default_and_others_block(tmp_path: Path) -> None:
    journaled = Logger(sinks=[JournaledListSink()], options=Options(runs_dir=str(tmp_path)))
    plain = Logger(sinks=[ListSink()])
    try:
        assert journaled._life.pipeline is not None and plain._life.pipeline is not None
        assert journaled._life.pipeline.full_policy == "spill"
        assert plain._life.pipeline.full_policy == "block"
    finally:
        assert journaled.close(10) and plain.close(10)


def test_spill_without_a_journal_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="spill"):
        Options(full_policy="spill", journal=False)
    with pytest.raises(ValueError, match="no sink that is journaled"):
        FileLogger(str(tmp_path / "f"), options=Options(full_policy="spill"))


def test_a_million_scalars_to_a_stalled_sink_keep_memory_bounded_and_all_arrive(
    tmp_path: Path,
) -> None:
    gate = threading.Event()
    sink = JournaledListSink(release=gate)
    capacity, queue = 20_000, 100_000
    logger = Logger(sinks=[sink], options=Options(
        runs_dir=str(tmp_path), lane_capacity=capacity, queue_size=queue))
    base = rss_bytes()
    grew = resident = spilled = 0
    for i in range(1_000_000):
        logger.log_scalar(f"m{i % 10}", float(i), i // 10)
        if i % 20_000 == 0:
            s = logger.stats()
            resident = max(resident, s.sinks["journaled"].pending - s.sinks["journaled"].spilled)
            spilled = max(spilled, s.spilled)
            grew = max(grew, rss_bytes() - base)
    stats = logger.stats()
    assert stats.dropped == 0
    assert resident <= capacity + queue  # a lane holds at most one chunk beyond its bound
    assert spilled > 500_000
    # Held in memory, a million (name, value, step) rows take about 120 MB.
    assert grew < 70 * MB
    gate.set()
    assert logger.flush(120)
    assert logger.stats().spilled == 0
    assert logger.close(30)
    assert scalars(sink) == [(f"m{i % 10}", float(i), i // 10) for i in range(1_000_000)]


def test_records_spilled_during_an_outage_reach_mlflow_in_order_when_it_returns(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.mode = "503"
        pause = threading.Event()
        # Built inside the block: its worker meets the first 503 (and warns) at once.
        with pytest.warns(SteplogWarning, match="503"):
            logger = MLFlowLogger("spill-outage", tracking_uri=f"http://127.0.0.1:{proxy.port}",
                                  options=Options(runs_dir=str(tmp_path), lane_capacity=2_000,
                                                  retry=RetryPolicy(initial_s=0.05, max_s=0.2,
                                                                    jitter_s=0.0)))
            for i in range(30_000):
                logger.log_metrics({"a": float(i), "b": -float(i)}, i)
                if i % 1000 == 999:
                    pause.wait(0.06)  # chunks of their own, beyond the lane's bound
            assert logger.flush(0.5).ok is False  # the server is still away
        assert logger.stats().spilled > 50_000
        proxy.mode = "pass"
        assert logger.flush(120)
        assert logger.close(30)
    run_id = logger.run_id or ""
    for key, sign in (("a", 1.0), ("b", -1.0)):
        history = mlflow_server.metric_history(run_id, key)
        assert sorted((m["step"], m["value"]) for m in history) == [
            (i, sign * i) for i in range(30_000)]
    assert not any(tmp_path.rglob("journal"))  # everything arrived: the journal is gone


def test_a_spilled_frame_that_cannot_be_read_back_is_counted_failed_and_the_rest_arrives(
    tmp_path: Path,
) -> None:
    gate = threading.Event()
    sink = JournaledListSink(release=gate)
    logger = Logger(sinks=[sink], options=Options(runs_dir=str(tmp_path), lane_capacity=10,
                                                  drain_interval_s=0.01))
    for i in range(10):  # taken by the sink's first write, which waits for the gate
        logger.log_scalar("x", float(i), i)
    assert wait_until(lambda: sink.attempts == 1)
    for i in range(10, 20):  # fill the lane
        logger.log_scalar("x", float(i), i)
    assert wait_until(lambda: logger.stats().sinks["journaled"].pending == 20)
    logger.log_scalar("x", 20.0, 20)  # a chunk of its own, spilled
    assert wait_until(lambda: logger.stats().spilled == 1)
    for segment in tmp_path.rglob("*.seg"):  # damage the last frame's payload on disk
        data = bytearray(segment.read_bytes())
        data[-3:] = b"\xff\xff\xff"
        segment.write_bytes(bytes(data))
    logger.log_scalar("x", 21.0, 21)  # spilled too, and whole
    assert wait_until(lambda: logger.stats().spilled == 2)
    gate.set()
    with pytest.warns(SteplogWarning, match="could not read them back"):
        result = logger.close(30)
    assert not result
    assert result.failed == 1
    assert [s[2] for s in scalars(sink)] == [*range(20), 21]


def test_a_full_disk_raises_journal_stopped_error_once_and_every_record_still_arrives(
    small_fs: Path,  # noqa: F811 - the fixture
) -> None:
    sink = JournaledListSink()
    logger = Logger(sinks=[sink], options=Options(runs_dir=str(small_fs),
                                                  drain_interval_s=0.005))
    raised: list[JournalStoppedError] = []
    pause = threading.Event()
    with pytest.warns(SteplogWarning, match="journal .* stopped"):
        for i in range(200_000):
            try:
                logger.log_scalar(f"a-long-metric-name-{i % 7}", float(i), i)
            except JournalStoppedError as exc:
                raised.append(exc)
            if i % 1000 == 999:
                pause.wait(0.002)  # let the drain thread journal a chunk
        assert logger.flush(60)
    assert len(raised) == 1
    message = str(raised[0])
    assert "file system is full" in message and "free space" in message
    assert logger.close(30)
    assert len(scalars(sink)) == 200_000  # the call that raised logged its record too
    # What the journal holds is whole: it opens and reads without a warning.
    for journal_dir in small_fs.rglob("journal"):
        with Journal.open(journal_dir) as journal:
            assert sum(1 for _ in journal.read()) > 0


def test_records_spilled_before_the_disk_filled_are_still_delivered_from_the_journal(
    small_fs: Path,  # noqa: F811 - the fixture
) -> None:
    gate = threading.Event()
    sink = JournaledListSink(release=gate)
    logger = Logger(sinks=[sink], options=Options(runs_dir=str(small_fs), lane_capacity=500,
                                                  drain_interval_s=0.005))
    logged = 0
    with pytest.warns(SteplogWarning, match="journal .* stopped"):
        with pytest.raises(JournalStoppedError, match="file system is full"):
            for _ in range(1000):  # the 64 KiB file system fills long before
                for _ in range(100):
                    logger.log_scalar("loss", float(logged), logged)
                    logged += 1
                # The queue empties, or the journal stopped while the drain thread held part
                # of it: then the lane is full, the rest waits, and the next call raises.
                assert wait_until(lambda: not logger._life.pipeline.queue  # type: ignore[union-attr]
                                  or logger._life._alarm is not None)
        logged += 1  # the call that raised logged its record
        assert logger.stats().spilled > 0
        gate.set()
        assert logger.flush(60)
    assert logger.close(30)
    assert [s[2] for s in scalars(sink)] == list(range(logged))


def stopped_logger(sink: ListSink, tmp_path: Path, **options: object) -> Logger:
    """A logger whose journal stopped at its budget: the next ``log_*`` call raises."""
    logger = Logger(sinks=[sink], options=Options(runs_dir=str(tmp_path), journal_max_bytes=600,
                                                  drain_interval_s=0.005, **options))  # type: ignore[arg-type]
    with pytest.warns(SteplogWarning, match="journal .* stopped"):
        for i in range(100):
            try:
                logger.log_scalar("x", float(i), i)
            except JournalStoppedError:
                pytest.fail("raised before the journal was seen to stop")
            if wait_until(lambda: logger._life._alarm is not None, 0.02):
                break
    assert logger._life._alarm is not None
    return logger


@pytest.mark.parametrize("call", ["log_scalar", "log_metrics", "log_parameters", "save_agent"])
def test_the_call_that_raises_journal_stopped_error_did_its_work(
    tmp_path: Path, call: str
) -> None:
    import torch

    sink = JournaledListSink()
    logger = stopped_logger(sink, tmp_path)
    with pytest.raises(JournalStoppedError, match="journal_max_bytes"):
        if call == "log_scalar":
            logger.log_scalar("y", 1.0, 0)
        elif call == "log_metrics":
            logger.log_metrics({"y": 1.0}, 0)
        elif call == "log_parameters":
            logger.log_parameters({"y": 1})
        else:
            logger.save_agent(torch.nn.Linear(2, 2), "agent.pt")
    logger.log_scalar("z", 2.0, 0)  # raised once: the next call is quiet
    assert logger.close(30)
    names = {r.name for r in sink.records}
    assert ("y" in names) if call != "save_agent" else [a.name for a in sink.uploads]
    assert "z" in names


def test_an_alarm_while_the_training_loop_logs_never_looks_like_a_close(tmp_path: Path) -> None:
    for round_ in range(30):
        sink = ListSink()
        logger = Logger(sinks=[sink])
        fire = threading.Timer(0.0005 * (round_ % 10),
                               logger._life.alarm, [JournalStoppedError("test alarm")])
        fire.start()
        raised = 0
        for i in range(3000):
            try:
                logger.log_scalar("x", float(i), i)
            except JournalStoppedError:
                raised += 1
        fire.join()
        result = logger.close(30)
        assert result, result
        assert raised <= 1
        assert [r.step for r in sink.records] == list(range(3000))


def test_records_only_in_a_stopped_journal_are_named_by_the_close_result(tmp_path: Path) -> None:
    gate = threading.Event()
    sink = JournaledListSink(release=gate)
    logger = Logger(sinks=[sink], options=Options(runs_dir=str(tmp_path), lane_capacity=10,
                                                  journal_max_bytes=2000,
                                                  drain_interval_s=0.005))
    with pytest.warns(SteplogWarning, match="journal .* stopped"), \
            pytest.raises(JournalStoppedError):
        for i in range(1000):
            logger.log_scalar("x", float(i), i)
            wait_until(lambda: not logger._life.pipeline.queue, 1.0)  # type: ignore[union-attr]
    assert logger.stats().spilled > 0
    try:
        result = logger.close(0.3)
        assert not result
        assert result.sync == f"steplog sync {logger.run_dir}"
        assert logger.run_dir is not None and Path(logger.run_dir, "journal").is_dir()
    finally:
        gate.set()
    assert wait_until(lambda: logger.stats().sinks["journaled"].pending == 0, 30)
