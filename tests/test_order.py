"""Guarantee 2: records of one lane reach each sink in call order; batching keeps that order."""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinks_for_tests import JournaledListSink, ListSink
from steplog import FileLogger, Logger, Options
from steplog.frames import decode_batch
from steplog.pipeline.drain import count_names
from steplog.records import Batch, MetricRecord, Param, Scalar, Scalars, Tag
from waiting import wait_until

NAMES = st.sampled_from(["loss", "reward/mean", "lr", "a b", "x.y-z"])
STEPS = st.one_of(st.none(), st.integers(min_value=-5, max_value=10**12))
VALUES = st.floats(allow_nan=False, allow_infinity=True)
SCALAR_CALL = st.tuples(st.just("scalar"), NAMES, VALUES, STEPS)
METRICS_CALL = st.tuples(st.just("metrics"), st.dictionaries(NAMES, VALUES, max_size=4), STEPS)
CALLS = st.lists(st.one_of(SCALAR_CALL, METRICS_CALL), max_size=60)

FAST = Options(drain_interval_s=0.002)


def expected_points(calls: list[tuple]) -> list[tuple[str, float, int]]:
    """Reference model: automatic step = number of earlier points with that name."""
    seen: dict[str, int] = {}
    out = []
    for call in calls:
        items = [(call[1], call[2])] if call[0] == "scalar" else list(call[1].items())
        step = call[-1]
        for name, value in items:
            n = seen.get(name, 0)
            seen[name] = n + 1
            out.append((name, value, n if step is None else step))
    return out


def replay(logger: Logger, calls: list[tuple]) -> None:
    for call in calls:
        if call[0] == "scalar":
            logger.log_scalar(call[1], call[2], call[3])
        else:
            logger.log_metrics(call[1], call[2])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(calls=CALLS)
def test_file_sink_stores_points_in_call_order_with_their_steps(tmp_path_factory, calls) -> None:
    out = tmp_path_factory.mktemp("run")
    logger = FileLogger(out, options=FAST)
    replay(logger, calls)
    assert logger.close(30)
    rows = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    assert [(r["name"], r["value"], r["step"]) for r in rows] == expected_points(calls)


@settings(max_examples=40, deadline=None)
@given(calls=CALLS, max_batch=st.integers(min_value=1, max_value=7))
def test_batches_respect_max_batch_and_concatenate_to_call_order(calls, max_batch) -> None:
    sink = ListSink(max_batch=max_batch)
    logger = Logger(sinks=[sink], options=FAST)
    replay(logger, calls)
    assert logger.close(30)
    assert all(1 <= len(b) <= max_batch for b in sink.batches)
    flat = [r for b in sink.batches for r in b]
    assert [(r.name, r.value, r.step) for r in flat] == expected_points(calls)


@st.composite
def periodic_names(draw: st.DrawFn) -> list[str]:
    """A loop's names: one step's keys (repeats allowed) over and over, cut anywhere."""
    keys = draw(st.lists(NAMES, min_size=1, max_size=6))
    start = draw(st.integers(min_value=0, max_value=len(keys) - 1))
    length = draw(st.integers(min_value=0, max_value=60))
    return [keys[(start + i) % len(keys)] for i in range(length)]


@given(names=st.one_of(periodic_names(), st.lists(NAMES, max_size=60)),
       before=st.dictionaries(NAMES, st.integers(min_value=0, max_value=100)))
def test_counting_names_adds_what_a_counter_update_adds(names, before) -> None:
    counts = collections.Counter(before)
    count_names(counts, [(name, 1.0, 0) for name in names])
    assert counts == collections.Counter(before) + collections.Counter(names)


def test_automatic_steps_count_the_points_of_a_long_periodic_chunk() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=30.0))
    keys = ["loss", "reward/mean", "loss", "lr"]  # "loss" twice a step
    for step in range(1000):
        for key in keys:
            logger.log_scalar(key, 1.0, step)
    assert logger.flush(30)  # the drain takes the 4,000 points as one chunk
    logger.log_scalar("loss", 2.0)
    logger.log_scalar("lr", 2.0)
    assert logger.close(30)
    assert [(r.name, r.step) for r in sink.records[-2:]] == [("loss", 2000), ("lr", 1000)]


@pytest.mark.parametrize(("age_s", "interval_s", "earliest_s", "latest_s"), [
    (1.0, 1.0, 0.7, 1.9),  # within the interval: sent as the drain hands it over
    (1.5, 0.5, 1.2, 1.9),  # beyond it: the lane waits for the rest, 1 s
], ids=["age within the drain interval", "age beyond the drain interval"])
def test_a_batch_age_counts_from_the_call(age_s, interval_s, earliest_s, latest_s) -> None:
    sink = ListSink(max_batch_age_s=age_s)
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=interval_s))
    try:
        start = time.monotonic()
        logger.log_scalar("x", 1.0, 0)
        assert wait_until(lambda: sink.records, 10.0)
        assert earliest_s < time.monotonic() - start < latest_s
    finally:
        assert logger.close(10)


def test_timestamps_never_decrease_in_call_order() -> None:
    sink = ListSink()
    logger = Logger(sinks=[sink], options=FAST)
    for i in range(20_000):
        logger.log_scalar("x", float(i))
    assert logger.close(30)
    stamps = [r.timestamp for r in sink.records]
    assert stamps == sorted(stamps)


def test_metrics_are_not_held_back_by_a_slow_upload(tmp_path) -> None:
    gate = threading.Event()
    sink = ListSink(upload_release=gate)
    logger = Logger(sinks=[sink], options=FAST)
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 1000)
    logger.log_artifact(f)
    logger.log_scalar("after", 1.0, 0)
    delivered_while_stuck = False
    for _ in range(500):
        if any(r.name == "after" for r in sink.records):
            delivered_while_stuck = not sink.uploads
            break
        time.sleep(0.01)
    gate.set()
    assert delivered_while_stuck, "the scalar waited for the upload logged before it"
    assert logger.close(30)
    assert [a.name for a in sink.uploads] == ["big.bin"]


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=80),
    max_bytes=st.integers(min_value=60, max_value=2000),
)
def test_batches_respect_an_estimated_byte_bound_and_keep_order(sizes, max_bytes) -> None:
    sink = ListSink(max_batch=1000)
    sink.max_batch_bytes = max_bytes
    logger = Logger(sinks=[sink], options=FAST)
    for i, size in enumerate(sizes):
        logger.log_parameters({f"p{i}": "x" * size})
    assert logger.close(30)
    assert [r.name for b in sink.batches for r in b] == [f"p{i}" for i in range(len(sizes))]
    for b in sink.batches:
        est = sum(len(r.name) + len(r.value) + 48 for r in b)
        assert est <= max_bytes or len(b) == 1


def test_withdrawing_a_late_record_removes_that_record_not_an_equal_earlier_one() -> None:
    from steplog.pipeline import Pipeline

    class Open:
        accepting = True

        def deadline(self) -> float | None:
            return None

        def rest(self) -> bool:
            return False

        def end_rest(self) -> None:
            pass

    pipeline = Pipeline([ListSink()], Options(drain_interval_s=3600), Open())
    # Built at run time, as log_scalar builds them (equal literals would be one constant).
    early, other, late = (tuple(["x", v, None]) for v in (1.0, 2.0, 1.0))
    for item in (early, other, late):
        pipeline.queue.append(item)
    assert pipeline.withdraw(late)
    assert [id(i) for i in pipeline.queue] == [id(early), id(other)]
    assert not pipeline.withdraw(late)


ROWS = st.lists(st.tuples(NAMES, VALUES, st.integers(min_value=0, max_value=10**6)),
                min_size=1, max_size=8)
PARTS = st.lists(
    st.one_of(
        st.builds(lambda rows, ts: Scalars(rows, ts, False), ROWS,
                  st.integers(min_value=0, max_value=10)),
        st.builds(lambda name, v: Scalar(name, v, 0, 5), NAMES, VALUES),
        st.builds(lambda name: Param(name, 1, 7), NAMES),
        st.builds(lambda name: Tag(name, "t", 9), NAMES),
    ),
    max_size=8,
)


def flat(parts: list) -> list:
    """The records a batch of ``parts`` stands for, built one by one (the reference)."""
    out: list = []
    for part in parts:
        if isinstance(part, Scalars):
            out += [Scalar(n, v, s, part.timestamp) for n, v, s in part.rows]
        else:
            out.append(part)
    return out


@settings(max_examples=200, deadline=None)
@given(parts=PARTS, data=st.data())
def test_a_batch_reads_slices_and_indexes_as_the_records_it_holds(parts, data) -> None:
    batch = Batch(parts)
    records = flat(parts)
    assert len(batch) == len(records)
    assert list(batch) == records
    start = data.draw(st.integers(min_value=-3, max_value=len(records) + 3))
    stop = data.draw(st.integers(min_value=-3, max_value=len(records) + 3))
    piece = batch[start:stop]
    assert isinstance(piece, Batch)
    assert list(piece) == records[start:stop] and len(piece) == len(records[start:stop])
    for i in range(-len(records), len(records)):
        assert batch[i] == records[i]
    assert batch.names() == {r.name for r in records}


@settings(max_examples=40, deadline=None)
@given(
    calls=st.lists(st.one_of(SCALAR_CALL, METRICS_CALL, st.just(("flush",))), max_size=60),
    max_batch=st.integers(min_value=1, max_value=7),
)
def test_a_flush_ends_a_batch_where_it_was_called(calls, max_batch) -> None:
    sink = ListSink(max_batch=max_batch, max_batch_age_s=30.0)
    logger = Logger(sinks=[sink], options=FAST)
    cuts = set()
    logged = 0
    for call in calls:
        if call[0] == "flush":
            logger.flush(0)  # a barrier queued among the records, not waited for
            cuts.add(logged)
        else:
            replay(logger, [call])
            logged += 1 if call[0] == "scalar" else len(call[1])
    assert logger.close(30)
    ends, n = set(), 0
    for b in sink.batches:
        assert 1 <= len(b) <= max_batch
        assert not any(n < cut < n + len(b) for cut in cuts), "a batch spans a flush"
        n += len(b)
        ends.add(n)
    assert cuts - {0} <= ends | {n}
    flat_records = [r for b in sink.batches for r in b]
    points = [c for c in calls if c[0] != "flush"]
    assert [(r.name, r.value, r.step) for r in flat_records] == expected_points(points)


@settings(max_examples=30, deadline=None)
@given(
    names=st.lists(st.text(alphabet="abcdefgh", min_size=1, max_size=120), min_size=1,
                   max_size=80),
    max_bytes=st.integers(min_value=60, max_value=2000),
)
def test_blocks_of_scalars_are_cut_at_the_estimated_byte_bound(names, max_bytes) -> None:
    sink = ListSink(max_batch=1000, max_batch_age_s=30.0)
    sink.max_batch_bytes = max_bytes
    logger = Logger(sinks=[sink], options=FAST)
    for i, name in enumerate(names):
        logger.log_scalar(name, float(i), i)
    assert logger.close(30)
    assert [(r.name, r.step) for b in sink.batches for r in b] == [
        (name, i) for i, name in enumerate(names)
    ]
    for b in sink.batches:
        est = sum(len(r.name) + 48 for r in b)
        assert est <= max_bytes or len(b) == 1


class PartsSink(JournaledListSink):
    """Keeps the parts of every batch as delivered (blocks, not records built from them)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[object] = []

    def write(self, records: Sequence[MetricRecord]) -> None:
        super().write(records)
        self.parts.extend(Batch.of(records).parts)


def test_a_journaled_block_reaches_the_sink_carrying_the_bytes_the_journal_holds(
    tmp_path,
) -> None:
    sink = PartsSink()
    logger = Logger(sinks=[sink], options=Options(runs_dir=str(tmp_path)))
    pipeline = logger._life.pipeline
    assert pipeline is not None and pipeline.run_journal is not None
    journal = pipeline.run_journal.journal
    for i in range(1000):
        logger.log_scalar("loss", float(i), i)
    assert logger.flush(30)
    frames = [payload for _, payload in journal.read()]
    assert logger.close(30)
    blocks = [p for p in sink.parts if type(p) is Scalars]
    assert [r for b in blocks for r in b.rows] == [("loss", float(i), i) for i in range(1000)]
    # Each frame is an array of one block: those very bytes, encoded once, in order.
    assert all(f[0] == 0x91 for f in frames)
    assert [f[1:] for f in frames] == [b.encoded for b in blocks]
    assert [decode_batch(f).parts for f in frames] == [[b] for b in blocks]
