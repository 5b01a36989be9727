"""The pipeline: one bounded queue, a drain thread, and two delivery lanes per sink.

``log_*`` calls append plain tuples (scalars), :class:`MetricsItem` (metric dicts) or records to
:attr:`Pipeline.queue`, a ``collections.deque``. The *drain thread* wakes every
``drain_interval_s`` (or at once for a flush, close or full queue), takes everything queued,
stamps the scalars of that chunk with one wall-clock timestamp, assigns automatic steps, and
appends the records to each sink's lanes:

* the **metrics lane** (scalars, params, tags) calls ``sink.write(batch)`` in call order, with
  batches cut by count (``sink.max_batch``), estimated size (``sink.max_batch_bytes``), age
  (``sink.max_batch_age_s``) and flush barriers;
* the **upload lane** (files, figures, checkpoints) calls ``sink.upload(item)``, one at a time,
  on its own thread, so a large upload never delays metrics.

Scalars travel in blocks: the scalars of a chunk stay ``(name, value, step)`` rows in one
:class:`~steplog.records.Scalars` block with the chunk's timestamp, a lane moves and cuts whole
blocks, and ``sink.write`` gets a :class:`~steplog.records.Batch` of them (a sequence of records
for sinks that want records; its parts for sinks that encode blocks whole). When every item of a
chunk is a ``log_scalar`` tuple with an explicit step and a float value (the common case), the
drain makes a few C-level passes over the chunk and runs no Python code per scalar; automatic
steps, values still on a device and ``log_metrics`` dicts cost a little Python per call.

Timestamp bound: a scalar's timestamp is taken when the drain thread takes it from the queue,
so it is later than the call by at most ``drain_interval_s`` plus the time the previous drain
took (default 50 ms, about 1 ms per 10,000 records). When the sinks fall behind and the lanes
are full, records wait in the queue and are stamped when the drain thread gets to them.

Retries (see :mod:`steplog.retry`) happen per batch inside a lane; a permanent rejection of a
batch is bisected until the refused records are isolated, and the rest is delivered.

The pipeline does not decide when the logger stops: its owner (:class:`steplog.lifecycle.
Lifecycle`) says whether records are still accepted and what the close deadline is, and calls
:meth:`Pipeline.shut_down`. Every thread is started at construction (a thread cannot be started
while the interpreter shuts down), and a sink's ``close`` runs on the last of its two lane
threads to finish, so it never overlaps one of the sink's own calls.
"""

from __future__ import annotations

import array
import bisect
import collections
import contextlib
import itertools
import operator
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

from steplog.capture import PendingValue
from steplog.checkpoints import CheckpointPolicy, Snapshot, write_policy
from steplog.errors import JournalStoppedError, LoggerClosedError, SteplogWarning
from steplog.frames import decode_batch
from steplog.journal import Durability, Journal, JournalError, JournalFullError
from steplog.kept import Keeper
from steplog.paths import sync_command
from steplog.records import Artifact, Batch, Param, Row, Scalar, Scalars, Tag, now_ms
from steplog.results import Loss, LossKind, SinkStats, Stats
from steplog.retry import RetryPolicy, call_with_retry, check_seconds, is_retryable
from steplog.runlog import RunJournal
from steplog.sinks.base import RunStatus, Sink

__all__ = [
    "Barrier",
    "FullPolicy",
    "MetricsItem",
    "Options",
    "Owner",
    "Pipeline",
    "SteplogWarning",
    "UploadRequest",
]

FullPolicy = Literal["block", "drop", "spill"]
"""What happens when records arrive faster than a sink takes them. ``block``: when the queue is
full, a ``log_*`` call waits for room (up to ``block_timeout_s``, then drops and counts).
``drop``: such a call drops its record at once and counts it. ``spill``: a journaled sink's lane
that holds ``lane_capacity`` records in memory takes further chunks as references to their
journal frames, read back when the sink catches up, so the drain thread and the training loop
never wait for that sink; a sink that is not journaled, or a journal that stopped, falls back
to ``block``."""

_MAX_LOSSES_KEPT = 100
_NAME = operator.itemgetter(0)
_VALUE = operator.itemgetter(1)
_STEP = operator.itemgetter(2)


@dataclass(frozen=True)
class Options:
    """Tuning of one logger's pipeline; the defaults suit a training loop. Every duration is
    a finite number of seconds (``ValueError`` otherwise)."""

    queue_size: int = 1_000_000
    """Most items (a scalar, a metric dict, a record) waiting for the drain thread."""
    full_policy: FullPolicy | None = None
    """See :data:`FullPolicy`; ``None``: ``"spill"`` when the logger journals (a remote sink),
    else ``"block"``."""
    block_timeout_s: float = 30.0
    """With ``block``: longest a ``log_*`` call waits for room before dropping its record."""
    drain_interval_s: float = 0.05
    """How often the drain thread takes the queue; bounds the timestamp error of scalars."""
    lane_capacity: int = 1_000_000
    """Most records held in memory per sink lane; beyond it the drain thread waits for the sink
    (backpressure), or spills to the journal (``full_policy="spill"``)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 120.0
    """Deadline of ``flush()`` and ``close()`` called without a timeout (and of ``with``)."""
    exit_timeout_s: float = 30.0
    """Deadline of the close that runs at interpreter exit when the user did not close."""
    journal: bool | None = None
    """Journal metric records in the run directory for ``steplog sync`` (``None``: when a
    sink is remote, i.e. MLflow or an online ClearML Task)."""
    journal_durability: Durability = "flush"
    """When journal frames reach the disk: ``"none"`` (the OS writes them back: a killed
    process loses nothing, a power cut may), ``"flush"`` (also at every ``flush()`` and at
    close) or ``"always"`` (an fsync per drained chunk)."""
    journal_max_bytes: int | None = None
    """Most bytes of journal on disk (``None``: no bound); past it the logger warns and goes
    on without the journal."""
    runs_dir: str = field(
        default_factory=lambda: os.environ.get("STEPLOG_RUNS_DIR", "steplog-runs"))
    """The run directories: journals of loggers with a remote sink, and uploads that failed
    after their retries, for ``steplog sync`` (relative to the working directory at
    construction; default ``$STEPLOG_RUNS_DIR``, else ``steplog-runs``)."""
    checkpoint_memory_bytes: int = 4 * 1024**3
    """Most bytes of checkpoint snapshots held in memory while they wait to be written."""
    checkpoint_policy: CheckpointPolicy = "wait"
    """At that bound: ``"wait"`` (up to ``block_timeout_s``, then ``TimeoutError``) or
    ``"supersede"`` (first drop pending snapshots of the same name no sink started on)."""

    def __post_init__(self) -> None:
        for name in ("queue_size", "lane_capacity"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if type(self.checkpoint_memory_bytes) is not int or self.checkpoint_memory_bytes < 1:
            raise ValueError(f"checkpoint_memory_bytes must be an int >= 1, got "
                             f"{self.checkpoint_memory_bytes!r}")
        if self.journal_durability not in ("none", "flush", "always"):
            raise ValueError(f"journal_durability must be 'none', 'flush' or 'always', got "
                             f"{self.journal_durability!r}")
        if self.journal_max_bytes is not None and (
            type(self.journal_max_bytes) is not int or self.journal_max_bytes < 1
        ):
            raise ValueError(f"journal_max_bytes must be None or an int >= 1, got "
                             f"{self.journal_max_bytes!r}")
        if self.checkpoint_policy not in ("wait", "supersede"):
            raise ValueError(f"checkpoint_policy must be 'wait' or 'supersede', got "
                             f"{self.checkpoint_policy!r}")
        if self.full_policy not in (None, "block", "drop", "spill"):
            raise ValueError(f"full_policy must be None, 'block', 'drop' or 'spill', got "
                             f"{self.full_policy!r}")
        if self.full_policy == "spill" and self.journal is False:
            raise ValueError("full_policy='spill' keeps records in the journal: it needs "
                             "journal=None or True")
        check_seconds(self.block_timeout_s, "block_timeout_s")
        check_seconds(self.drain_interval_s, "drain_interval_s", allow_zero=False)
        check_seconds(self.timeout_s, "timeout_s")
        check_seconds(self.exit_timeout_s, "exit_timeout_s")
        if not isinstance(self.retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(self.retry).__name__}")


class Owner(Protocol):
    """What the pipeline asks its owner: whether records are still accepted, and the deadline
    (a ``time.monotonic()`` instant, ``None`` while the logger is open) after which no delivery
    attempt starts."""

    @property
    def accepting(self) -> bool: ...

    def deadline(self) -> float | None: ...

    def alarm(self, error: Exception) -> None:
        """Raise ``error`` into the training loop, once, from the next call that can."""


class MetricsItem(msgspec.Struct, gc=False):
    """Queue item of one ``log_metrics`` call: a private copy of the dict, and its step.

    A Struct without GC tracking, unlike a tuple holding a dict, never makes the garbage
    collector scan the queue: in a process with torch loaded that costs ~0.8 us per call.
    """

    values: dict[str, Any]
    step: int | None


class UploadRequest:
    """Queue item for the upload lanes: an artifact, and an object snapshot to serialise first
    (``save_policy``) or ``None``."""

    __slots__ = ("artifact", "snapshot")

    def __init__(self, artifact: Artifact, snapshot: Snapshot | None = None) -> None:
        self.artifact = artifact
        self.snapshot = snapshot


class Barrier:
    """A flush marker: ``event`` is set once every lane acknowledged every record queued
    before it; ``lost`` then counts the records of the run up to the marker that some sink
    did not store (rejected, failed, dropped)."""

    __slots__ = ("_left", "_lock", "event", "lost")

    def __init__(self, lost: int) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._left = 0
        self.lost = lost

    def expect(self, lanes: int, lost: int) -> None:
        with self._lock:
            self._left += lanes
            self.lost += lost
        if lanes == 0:
            self.arrive(0)

    def arrive(self, lost: int) -> None:
        with self._lock:
            self._left -= 1
            self.lost += lost
            if self._left <= 0:
                self.event.set()


class _Upload:
    """One artifact travelling to every sink; a snapshot is serialised once, on first need.

    With several sinks, ``move`` becomes a copy to each sink, and the source is removed once
    every sink stored it (a sink that moved it away would leave the others nothing to read).
    """

    __slots__ = ("_artifact", "_lock", "_remaining", "_sinks", "_snapshot", "_staging", "_stored")

    def __init__(self, artifact: Artifact, snapshot: Snapshot | None, sinks: int,
                 staging: str) -> None:
        self._artifact = artifact
        self._snapshot = snapshot
        self._sinks = sinks
        self._remaining = sinks
        self._stored = True
        self._staging = staging
        self._lock = threading.Lock()

    @property
    def timestamp(self) -> int:
        return self._artifact.timestamp

    def materialize(self) -> Artifact:
        with self._lock:
            snapshot = self._snapshot
            if snapshot is not None:
                snapshot.start()  # raises SupersededError when a later snapshot replaced it
                try:
                    if self._artifact.kind == "policy":
                        path = tempfile.mkdtemp(dir=self._staging)
                        write_policy(snapshot, Path(path))
                    else:
                        fd, path = tempfile.mkstemp(dir=self._staging, suffix=".pt")
                        os.close(fd)
                        snapshot.write(Path(path))
                except BaseException:
                    snapshot.drop()  # its memory is freed; every sink reports the failure
                    raise
                self._snapshot = None
                self._artifact = msgspec.structs.replace(
                    self._artifact, source=path, cleanup=True
                )
            if self._artifact.move and self._sinks > 1:
                return msgspec.structs.replace(self._artifact, move=False)
            return self._artifact

    def finished(self, stored: bool) -> None:
        with self._lock:
            self._remaining -= 1
            self._stored = self._stored and stored
            done = self._remaining == 0
        if done and self._snapshot is not None:
            self._snapshot.drop()  # no sink ever wrote it: free its memory
        a = self._artifact
        shared_move = a.move and self._sinks > 1 and self._stored
        if done and a.source and (a.cleanup or shared_move):
            if os.path.isdir(a.source) and not os.path.islink(a.source):
                shutil.rmtree(a.source, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(a.source)

    def __repr__(self) -> str:
        return f"artifact {self._artifact.name!r}"


class _Spilled:
    """Consecutive lane parts held only in the journal: whole drained chunks, each the frame
    ``seqs[i]`` of ``counts[i]`` records stamped ``stamps[i]``, read back one frame at a time
    when the lane reaches them (``first`` is the next one). 20 bytes per chunk."""

    __slots__ = ("count", "counts", "first", "seqs", "stamps")

    def __init__(self, seq: int, count: int, timestamp: int) -> None:
        self.seqs = array.array("Q", (seq,))
        self.counts = array.array("Q", (count,))
        self.stamps = array.array("q", (timestamp,))
        self.first = 0
        self.count = count
        """Records not read back yet."""

    def add(self, seq: int, count: int, timestamp: int) -> None:
        self.seqs.append(seq)
        self.counts.append(count)
        self.stamps.append(timestamp)
        self.count += count

    @property
    def timestamp(self) -> int:
        return self.stamps[self.first]


class _FrameReader:
    """Reads one lane's spilled frames back from the journal, in increasing seq order: a pass
    goes on from where the previous one stopped (the journal's position of the last frame
    seen), so following the journal as it grows reads each byte once."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._frames: Iterator[tuple[int, bytes, tuple[int, int]]] | None = None
        self._position: tuple[int, int] | None = None

    def read(self, seq: int) -> Batch:
        """The batch of frame ``seq``; ``LookupError`` when the journal no longer holds it."""
        for attempt in range(2):
            if self._frames is None or attempt:
                self._frames = self._journal.read_from(seq - 1, self._position)
            for got, payload, position in self._frames:
                if got > seq:
                    break
                self._position = position
                if got == seq:
                    return decode_batch(payload)
            self._frames = None
        raise LookupError(f"frame {seq} is missing from the journal {self._journal.directory} "
                          "(damaged or removed)")


def _describe(record: object) -> str:
    if isinstance(record, Scalar):
        return f"scalar {record.name!r} step {record.step}"
    if isinstance(record, Param):
        return f"param {record.name!r}"
    if isinstance(record, Tag):
        return f"tag {record.name!r}"
    if isinstance(record, MetricsItem):
        return f"metrics {sorted(record.values)!r} step {record.step}"
    if isinstance(record, tuple) and len(record) == 3:
        return f"scalar {record[0]!r} step {record[2]}"
    if isinstance(record, Scalars) and record.rows:
        name, _, step = record.rows[0]
        return f"scalar {name!r} step {step}"
    if isinstance(record, UploadRequest):
        return f"artifact {record.artifact.name!r}"
    if isinstance(record, _Spilled):
        return f"{record.count} records of journal frame {record.seqs[record.first]}"
    return repr(record)


class _Lane:
    """An ordered buffer and the thread that delivers it to one sink.

    The buffer holds parts: :class:`Scalars` blocks and single records on the metrics lane,
    :class:`_Upload` jobs on the upload lane. Every count (capacity, batch size, barrier
    positions) is in records; a block is cut where a batch or a barrier ends. With spilling, a
    metrics lane over capacity takes :class:`_Spilled` journal references instead of parts; a
    batch ends before one, and the lane reads its frame back when it reaches it.
    ``deliver(parts)`` stores one batch and returns how many of its records were not stored
    (rejected or failed, already counted by the runner).
    """

    def __init__(
        self,
        runner: _SinkRunner,
        name: str,
        deliver: Callable[[list[Any]], int],
        max_batch: int,
        max_age_s: float,
        capacity: int,
        max_bytes: int | None = None,
    ) -> None:
        self.runner = runner
        self.max_bytes = max_bytes
        self.name = name
        self._deliver = deliver
        self.max_batch = max(1, max_batch)
        self.max_age_s = max_age_s
        self.capacity = capacity
        self.cond = threading.Condition(threading.Lock())
        self.buffer: collections.deque[Any] = collections.deque()
        self.buffered = 0
        """Records in the buffer."""
        self.resident = 0
        """Records in the buffer held in memory (the others are spilled to the journal)."""
        self._spills: collections.deque[int] = collections.deque()
        """Where each spilled part starts (a count of records submitted before it)."""
        self._reader: _FrameReader | None = None
        self._offset = 0
        """Rows of the first buffered block already taken by a batch (a block is cut without
        copying what is left of it)."""
        self.submitted = 0
        self.done = 0
        self.lost = 0
        self.oldest_ms = 0
        self._due = 0.0
        self._barriers: collections.deque[tuple[int, Barrier]] = collections.deque()
        self._stopping = False
        self._ready = name != "metrics"
        """A metrics lane becomes ready once its sink opened (or failed to): a flush waits for
        that, so after a flush the run exists even when nothing was logged."""
        self._thread = threading.Thread(
            target=self._run, name=f"steplog-{runner.sink.kind}-{name}", daemon=True
        )

    # -- drain-thread side ---------------------------------------------------------------
    def put(self, parts: Sequence[Any], count: int, timestamp_ms: int,
            spill: tuple[Journal, int] | None = None) -> bool:
        """Append ``parts`` (``count`` records); wait while the lane is over capacity, unless
        ``spill`` (the journal and the seq of the frame holding them) is given: then a lane
        over capacity takes a reference to the frame instead. False (nothing taken) when the
        close deadline passed while waiting, or the lane was stopped."""
        deadline_passed = self.runner.pipeline.deadline_passed
        with self.cond:
            spilled = spill is not None and self.resident >= self.capacity
            while not spilled and self.resident >= self.capacity and not self._stopping:
                if deadline_passed():
                    return False
                self.cond.wait(0.05)
            if self._stopping:
                return False
            if not self.buffered:
                self.oldest_ms = timestamp_ms
                self._due = time.monotonic() + self.max_age_s
            if spilled:
                assert spill is not None
                journal, seq = spill
                if self._reader is None:
                    self._reader = _FrameReader(journal)
                tail = self.buffer[-1] if self.buffer else None
                if type(tail) is _Spilled:
                    tail.add(seq, count, timestamp_ms)
                else:
                    self._spills.append(self.submitted)
                    self.buffer.append(_Spilled(seq, count, timestamp_ms))
            else:
                self.buffer.extend(parts)
                self.resident += count
            self.buffered += count
            self.submitted += count
            self.cond.notify_all()
        return True

    @property
    def spilled(self) -> int:
        """Records waiting in the lane that are held only in the journal."""
        return self.buffered - self.resident

    def add_barrier(self, barrier: Barrier) -> None:
        with self.cond:
            if self._ready and self.done >= self.submitted:
                barrier.arrive(self.lost)
                return
            self._barriers.append((self.submitted, barrier))
            self.cond.notify_all()

    def stop(self) -> None:
        """Deliver what is buffered, then end the lane thread."""
        with self.cond:
            self._stopping = True
            self.cond.notify_all()

    @property
    def pending(self) -> int:
        return self.submitted - self.done

    def start(self) -> None:
        self._thread.start()

    # -- lane thread -----------------------------------------------------------------------
    def _next_batch(self) -> tuple[list[Any], int] | _Spilled | None:
        """The parts of the next batch and how many records they hold; the spilled part that
        must be read back first; None: the lane stopped."""
        with self.cond:
            while True:
                n = self.buffered
                if n:
                    if n >= self.max_batch or self._barriers or self._stopping:
                        break
                    wait = self._due - time.monotonic()
                    if wait <= 0:
                        break
                    self.cond.wait(wait)
                elif self._stopping:
                    return None
                else:
                    self.cond.wait()
            take = min(n, self.max_batch)
            if self._spills:
                if self._spills[0] == self.done:
                    return self.buffer[0]  # type: ignore[no-any-return]
                take = min(take, self._spills[0] - self.done)  # a batch ends before it
            if self._barriers:
                # End the batch at the first barrier, so a flush's outcome counts exactly the
                # records logged before it.
                take = min(take, max(1, self._barriers[0][0] - self.done))
            if self.max_bytes is not None:
                take = _fitting(self.buffer, self._offset, take, self.max_bytes)
            self.buffered -= take
            self.resident -= take
            buffer = self.buffer
            offset = self._offset
            if take == n and not offset:
                parts = list(buffer)
                buffer.clear()
                return parts, take
            parts = []
            left = take
            while left:
                part = buffer[0]
                size = _part_size(part) - offset
                if size <= left:
                    buffer.popleft()
                    parts.append(part[offset:] if offset else part)
                    left -= size
                    offset = 0
                else:  # the batch ends inside this block
                    parts.append(part[offset : offset + left])
                    offset += left
                    left = 0
            self._offset = offset
            return parts, take

    def _unspill(self, part: _Spilled) -> None:
        """Put the first chunk of the spilled ``part`` (the first in the buffer) back in memory,
        read from the journal; if it cannot be read, its records are lost (counted, with why)."""
        assert self._reader is not None
        with self.cond:
            i = part.first
            seq, n, stamp = part.seqs[i], part.counts[i], part.stamps[i]
        parts: list[Any] = []
        failure = None
        try:
            if self.runner.pipeline.deadline_passed():
                raise TimeoutError("the close deadline passed first")
            batch = self._reader.read(seq)
            if len(batch) != n:
                raise LookupError(f"frame {seq} holds {len(batch)} records, not {n}")
            parts = batch.parts
        except Exception as exc:
            failure = str(exc) if isinstance(exc, TimeoutError) else \
                f"could not read them back: {exc}"
        with self.cond:
            part.first += 1
            part.count -= n
            if part.first == len(part.seqs):
                self.buffer.popleft()
                self._spills.popleft()
            else:
                self._spills[0] += n
            if failure is None:
                self.buffer.extendleft(reversed(parts))
                self.resident += n
            else:
                self.buffered -= n
        if failure is not None:
            self.runner.count_loss("failed", [_Spilled(seq, n, stamp)], failure)
            self.runner.journal_progress(n, failed=True)
            self._acknowledge(n, n)

    def _acknowledge(self, n: int, lost: int) -> None:
        with self.cond:
            self.done += n
            self.lost += lost
            if self.buffer:
                self.oldest_ms = _timestamp_of(self.buffer[0], self.oldest_ms)
            while self._barriers and self._ready and self._barriers[0][0] <= self.done:
                self._barriers.popleft()[1].arrive(self.lost)
            self.cond.notify_all()

    def _run(self) -> None:
        runner = self.runner
        try:
            if not self._ready:
                runner.ensure_open()  # open the run early, off the caller's thread
                with self.cond:
                    self._ready = True
                self._acknowledge(0, 0)
            while True:
                taken = self._next_batch()
                if taken is None:
                    return
                if type(taken) is _Spilled:
                    self._unspill(taken)
                    continue
                parts, count = taken  # type: ignore[misc]
                lost = count
                delivered = False
                try:
                    if runner.pipeline.deadline_passed():
                        runner.count_loss("failed", parts, "the close deadline passed first")
                    elif not runner.ensure_open():
                        if runner.broken is not None:
                            runner.count_loss("rejected", parts, runner.broken)
                        else:
                            runner.count_loss("failed", parts, runner.unavailable)
                    else:
                        delivered = True
                        lost = self._deliver(parts)
                except BaseException as exc:  # never let the lane die silently
                    runner.count_loss("failed", parts, f"internal error: {exc!r}")
                finally:
                    if self.name == "metrics" and not delivered:
                        runner.journal_progress(count, failed=True)
                    if self.name == "uploads":
                        _release(parts, stored=lost == 0)
                    self._acknowledge(count, lost)
        finally:
            runner.lane_finished()


_RECORD_OVERHEAD_BYTES = 48
"""Estimated encoding of everything but a record's key and value (step, timestamp, syntax)."""


def _part_size(part: Any) -> int:
    """Records in a lane part: a block's rows, else one."""
    return len(part.rows) if type(part) is Scalars else 1  # never a _Spilled: read back first


def _approx_size(record: Any) -> int:
    if type(record) is Param or type(record) is Tag:
        return len(record.name) + len(str(record.value)) + _RECORD_OVERHEAD_BYTES
    if type(record) is Scalar:
        return len(record.name) + _RECORD_OVERHEAD_BYTES
    return _RECORD_OVERHEAD_BYTES


def _fitting(buffer: collections.deque[Any], offset: int, most: int, max_bytes: int) -> int:
    """How many of the first ``most`` records fit in ``max_bytes`` (at least one); the first
    ``offset`` rows of the first block are already taken."""
    total = 0
    k = 0
    for part in buffer:
        if k >= most:
            break
        if type(part) is Scalars:
            rows = part.rows[offset : offset + most - k]
            offset = 0
            sizes = list(itertools.accumulate(len(row[0]) + _RECORD_OVERHEAD_BYTES
                                              for row in rows))
            fit = bisect.bisect_right(sizes, max_bytes - total)
            if fit < len(rows):
                return max(1, k + fit)
            total += sizes[-1]
            k += len(rows)
        else:
            total += _approx_size(part)
            if total > max_bytes:
                return max(1, k)
            k += 1
    return most


def _release(jobs: Sequence[Any], stored: bool) -> None:
    for job in jobs:
        job.finished(stored)


def _timestamp_of(item: Any, default: int) -> int:
    return getattr(item, "timestamp", default)


class _SinkRunner:
    """Everything the pipeline does for one sink: open it once, feed both lanes, count, and end
    its run after both lanes finished."""

    def __init__(self, pipeline: Pipeline, sink: Sink, label: str) -> None:
        self.pipeline = pipeline
        self.sink = sink
        self.label = label
        self.stats = SinkStats()
        self._count_lock = threading.Lock()
        self.broken: str | None = None
        """Why the sink can never open (its records are rejected with this reason)."""
        self.unavailable = ""
        """Why the last attempt to open failed for now (a later batch tries again)."""
        self.run_error: str | None = None
        """Why the run could not be ended, if it could not."""
        self.last_error = ""
        """The latest failed attempt, retried or not (for messages)."""
        self._opened = False
        self._open_lock = threading.Lock()
        self._warned: set[str] = set()
        self._status: RunStatus = "FINISHED"
        self._lanes_running = 2
        self.ended = threading.Event()
        """Set once both lanes finished and the sink's run was ended (or could not be)."""
        cap = pipeline.options.lane_capacity
        self.metrics = _Lane(
            self, "metrics", self._deliver_metrics, sink.max_batch,
            sink.max_batch_age_s, cap, max_bytes=sink.max_batch_bytes,
        )
        self._metrics_failed = 0
        """Metric records this sink gave up on after their retries (journal cursors)."""
        self.uploads = _Lane(self, "uploads", self._upload, 1, 0.0, cap)
        self.lanes = (self.metrics, self.uploads)

    def ensure_open(self) -> bool:
        """Open the sink once (retried); False when it cannot be opened: for good (``broken``
        is set) or for now (retries ran out; ``unavailable`` says why, a later batch retries)."""
        with self._open_lock:
            if self._opened or self.broken is not None:
                return self._opened
            try:
                self._retry(self.sink.open)
                self._opened = True
                if self.pipeline.run_journal is not None:  # run.json gets the run's id
                    with contextlib.suppress(Exception):
                        self.pipeline.run_journal.write_manifest()
            except BaseException as exc:
                reason = f"could not open {self.sink.describe()}: {exc}"
                self.last_error = reason
                if is_retryable(exc):
                    self.unavailable = reason
                else:
                    self.broken = reason
                    self.pipeline.note_loss(Loss(self.label, "run", 0, "opening the run", reason))
                self.warn("open", reason)
            return self._opened

    def _retry(self, fn: Callable[[], Any]) -> Any:
        return call_with_retry(
            fn, self.pipeline.options.retry, self.pipeline.deadline, self._on_retry
        )

    def _on_retry(self, exc: BaseException) -> None:
        self.last_error = str(exc) or repr(exc)
        with self._count_lock:
            self.stats.retried += 1
        self.warn(
            "retry",
            f"{self.label}: delivery failed ({exc!r}); retrying with backoff until it succeeds "
            f"or the close deadline passes",
        )

    def _deliver_metrics(self, parts: list[Any]) -> int:
        batch = Batch(parts)
        failed = self._metrics_failed
        try:
            lost = self._write(batch)
        except BaseException:
            self._metrics_failed += len(batch)
            raise
        finally:
            self.journal_progress(len(batch), self._metrics_failed > failed)
        return lost

    def journal_progress(self, records: int, failed: bool) -> None:
        """Tell the journal this sink is done with ``records`` more metric records; ``failed``:
        not all of them were stored or refused for good (its cursor stops before them)."""
        journal = self.pipeline.run_journal
        if journal is not None:
            journal.progress(self.label, records, failed)

    def _write(self, batch: Batch) -> int:
        try:
            self._retry(lambda: self.sink.write(batch))
        except BaseException as exc:
            if is_retryable(exc):
                self._metrics_failed += len(batch)
                self.count_loss("failed", batch, f"gave up retrying: {exc!r}")
                return len(batch)
            if len(batch) > 1 and not getattr(exc, "whole_batch", False):
                if self.pipeline.deadline_passed():
                    self._metrics_failed += len(batch)
                    self.count_loss("failed", batch, f"the close deadline passed while "
                                    f"isolating a refused record ({exc})")
                    return len(batch)
                # Isolate what the backend refuses: the rest of the batch still gets delivered.
                mid = len(batch) // 2
                return self._write(batch[:mid]) + self._write(batch[mid:])
            if getattr(exc, "whole_batch", False):
                # Not about these records (no permission, the run is gone): a sync after the
                # cause is fixed can still store them, so the journal keeps them.
                self._metrics_failed += len(batch)
            self.count_loss("rejected", batch, str(exc) or repr(exc))
            return len(batch)
        with self._count_lock:
            self.stats.delivered += len(batch)
        return 0

    def _upload(self, batch: list[_Upload]) -> int:
        lost = 0
        for job in batch:
            artifact = None
            try:
                artifact = job.materialize()
                self._retry(lambda a=artifact: self.sink.upload(a))  # type: ignore[misc]
            except BaseException as exc:
                kind: LossKind = "failed" if is_retryable(exc) else "rejected"
                reason = str(exc) or repr(exc)
                if kind == "failed" and artifact is not None:
                    reason = self._keep(artifact, reason)
                self.count_loss(kind, [job], reason)
                lost += 1
            else:
                with self._count_lock:
                    self.stats.delivered += 1
        return lost

    def _keep(self, artifact: Artifact, reason: str) -> str:
        """Keep a payload this sink could not store (see :mod:`steplog.kept`); the reason with
        where it is and the command that uploads it."""
        try:
            folder = self.pipeline.keeper.keep(self.sink, artifact, reason)
        except Exception as exc:
            return f"{reason} (it could not be kept for a later upload: {exc!r})"
        return f"{reason}; kept in {folder}, upload it later with: {sync_command(folder)}"

    def count_loss(self, kind: LossKind, records: Sequence[Any], reason: str) -> None:
        """Count ``records`` (a batch, lane parts or queue items) as rejected or failed by this
        sink, note why, warn once."""
        n = len(records) if type(records) is Batch else sum(map(_record_count, records))
        with self._count_lock:
            if kind == "rejected":
                self.stats.rejected += n
            else:
                self.stats.failed += n
        first = _describe(records[0])
        self.pipeline.note_loss(Loss(self.label, kind, n, first, reason))
        more = "" if len(records) == 1 else f" and {n - 1} more"
        verb = "rejected" if kind == "rejected" else "could not deliver"
        self.warn(f"{kind}:{reason[:40]}", f"{self.label} {verb} {first}{more}: {reason}")

    def warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            # With warnings turned into errors, a warning must not end a worker thread: the
            # problem is in the results and stats() anyway.
            with contextlib.suppress(Exception):
                warnings.warn(message, SteplogWarning, stacklevel=2)

    # -- the end ---------------------------------------------------------------------------
    def finish(self, status: RunStatus) -> None:
        """Stop both lanes after what they hold; the last one to finish ends the run."""
        self._status = status
        for lane in self.lanes:
            lane.stop()

    def lane_finished(self) -> None:
        with self._count_lock:
            self._lanes_running -= 1
            last = self._lanes_running == 0
        if not last:
            return
        try:
            if self._opened:
                self._retry(lambda: self.sink.close(self._status))
        except BaseException as exc:
            self.run_error = f"could not end the run of {self.sink.describe()}: {exc!r}"
            self.pipeline.note_loss(Loss(self.label, "run", 0, "ending the run", self.run_error))
            self.warn("close", f"{self.label}: {self.run_error}")
        finally:
            try:
                self.pipeline.runner_ended()  # the journal is closed before close() returns
            finally:
                self.ended.set()


class Pipeline:
    """One logger's queue, drain thread and sink lanes.

    The owning logger appends to :attr:`queue` directly on its hot path (after checking
    ``len(queue) < capacity``) and calls :meth:`put` when the queue is full.
    """

    def __init__(self, sinks: Sequence[Sink], options: Options, owner: Owner) -> None:
        if not sinks:
            raise ValueError("a pipeline needs at least one sink")
        self.options = options
        self.owner = owner
        self.deadline = owner.deadline
        self.capacity = options.queue_size
        self.queue: collections.deque[Any] = collections.deque()
        labels = _unique_labels(sinks)
        self.runners = [_SinkRunner(self, s, label) for s, label in zip(sinks, labels, strict=True)]
        self._wake = threading.Event()
        self._space = threading.Condition(threading.Lock())
        self._steps: collections.Counter[str] = collections.Counter()
        """Points per name so far: the next automatic step of each name."""
        self._drained = 0
        self._dropped = 0
        self._lost_early = 0
        """Records lost before reaching the lanes (a value that could not be read back, a lane
        closed before they reached it)."""
        self._holding: list[Any] = []
        """The chunk the drain thread is turning into records (counted as enqueued)."""
        self._drain_lock = threading.Lock()
        self._take_lock = threading.Lock()
        """Taking queued items and withdrawing a late one never overlap (see withdraw)."""
        self._losses: collections.deque[Loss] = collections.deque(maxlen=_MAX_LOSSES_KEPT)
        self._loss_lock = threading.Lock()
        self._runners_left = len(self.runners)
        self._staging = tempfile.mkdtemp(prefix="steplog-")
        self.keeper = Keeper(options.runs_dir)
        self.journal_kept = False
        self.journal_error: str | None = None
        self.run_journal: RunJournal | None = None
        """The run's journal, for the whole run (also once it stopped taking frames)."""
        self.journal_stopped = False
        """The journal stopped taking frames (a full disk, its budget, a failed write)."""
        wanted = options.journal
        if wanted is None:
            wanted = any(s.remote for s in sinks)
        if wanted:
            try:
                self.run_journal = RunJournal(
                    self.keeper.run_dir,
                    [(r.label, r.sink) for r in self.runners if r.sink.replayable()],
                    durability=options.journal_durability, max_bytes=options.journal_max_bytes)
            except OSError as exc:
                with contextlib.suppress(Exception):
                    warnings.warn(f"steplog: cannot journal in {self.keeper.run_dir} ({exc}); "
                                  "records are delivered, but not kept on disk for steplog "
                                  "sync", SteplogWarning, stacklevel=4)
            else:
                # Printed once, at the start: after a kill -9 nothing else says where it is.
                run_dir = self.keeper.run_dir
                with contextlib.suppress(Exception):
                    print(f"steplog: journal in {shlex.quote(str(run_dir))} (after a crash, "
                          f"{sync_command(run_dir)} delivers what did not arrive)",
                          file=sys.stderr)
        policy = options.full_policy
        if policy is None:
            policy = "spill" if self.run_journal is not None else "block"
        elif policy == "spill" and not (wanted and any(s.replayable() for s in sinks)):
            raise ValueError("full_policy='spill' keeps records in the journal, and this logger "
                             "has no sink that is journaled (MLflow, ClearML) or journal=False")
        self.full_policy: FullPolicy = policy
        self._spilling = [policy == "spill" and self.run_journal is not None
                          and self.run_journal.journals(r.label) for r in self.runners]
        """Per runner: whether its metrics lane spills (a sink the journal keeps frames for)."""
        self._drainer = threading.Thread(target=self._drain_loop, name="steplog-drain", daemon=True)
        self._drainer.start()
        for r in self.runners:
            for lane in r.lanes:
                lane.start()

    def deadline_passed(self) -> bool:
        d = self.deadline()
        return d is not None and time.monotonic() >= d

    # -- producer side ---------------------------------------------------------------------
    def put(self, item: Any) -> bool:
        """Enqueue ``item`` under the queue-full policy; False when it was dropped (counted).
        Raises :class:`LoggerClosedError` when the logger starts closing while it waits."""
        q = self.queue
        if len(q) < self.capacity:
            q.append(item)
            return True
        if self.full_policy != "drop":
            end = time.monotonic() + self.options.block_timeout_s
            with self._space:
                while len(q) >= self.capacity:
                    if not self.owner.accepting:
                        raise LoggerClosedError(
                            "the logger started closing while this call waited for room in "
                            "its full queue; the record was not logged"
                        )
                    self._wake.set()
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._space.wait(min(left, 0.1))
                else:
                    q.append(item)
                    return True
        n = _record_count(item)
        with self._space:
            self._dropped += n
        self.note_loss(Loss("queue", "dropped", n, _describe(item),
                            f"queue full (policy {self.full_policy!r})"))
        self.runners[0].warn(
            "dropped",
            f"steplog queue full ({self.capacity} items, policy {self.full_policy!r}): "
            "records are being dropped; see stats().dropped",
        )
        return False

    def take_all(self) -> list[Any]:
        """Every item queued so far, in order, removed from the queue."""
        q = self.queue
        with self._take_lock:
            # Pops one at a time (items appended meanwhile stay queued), in one C-level loop.
            return list(itertools.starmap(q.popleft, itertools.repeat((), len(q))))

    def withdraw(self, item: Any) -> bool:
        """Remove ``item`` from the queue if the worker has not taken it yet (True), for a call
        that queued it just after the logger stopped accepting."""
        q = self.queue
        with self._take_lock:
            for i in range(len(q) - 1, -1, -1):  # it was appended last, or nearly
                if q[i] is item:
                    del q[i]
                    return True
            return False

    def flush_barrier(self) -> Barrier:
        """Queue a flush marker behind every record logged so far and wake the drain thread."""
        barrier = Barrier(lost=self._dropped)
        self.queue.append(barrier)
        self._wake.set()
        return barrier

    # -- drain thread ----------------------------------------------------------------------
    def _drain_loop(self) -> None:
        q = self.queue
        interval = self.options.drain_interval_s
        busy = max(r.metrics.max_batch for r in self.runners)
        owner = self.owner
        while True:
            if len(q) < busy and owner.accepting:  # closing: drain what is left at once
                self._wake.wait(interval)
            self._wake.clear()
            # Read before the queue: a record queued after the logger stopped accepting is
            # taken by shut_down() or handed back to its caller (Logger._late).
            stopping = not owner.accepting
            if q:
                try:
                    self._process(self.take_all())
                except Exception as exc:  # keep draining whatever went wrong
                    self.runners[0].warn("drain", f"steplog drain thread error: {exc!r}")
                with self._space:
                    self._space.notify_all()
            elif stopping:
                return

    def _process(self, items: list[Any]) -> None:
        """Turn one drained chunk into records, in order, and hand them to the lanes."""
        with self._drain_lock:
            self._holding = items
        try:
            self._drained += self._records(items)
        finally:
            with self._drain_lock:
                self._holding = []

    def _records(self, items: list[Any]) -> int:
        """Hand the chunk's records to the lanes, in call order; how many records it held."""
        ts = now_ms()
        finite = self._plain(items)
        if finite is not None:  # the common case: one block, no Python work per scalar
            self._dispatch([Scalars(items, ts, finite)], len(items), ts)
            return len(items)
        parts: list[Any] = []
        """Blocks and records not yet handed to the lanes, in call order."""
        raw: list[tuple[str, float, int | None]] = []
        """Scalars since the last part, values read back, automatic steps not yet assigned."""
        auto = False
        """Whether ``raw`` may have a missing step."""
        count = 0
        kinds = list(map(type, items))
        others = itertools.compress(range(len(items)), map(operator.is_not, kinds,
                                                           itertools.repeat(tuple)))
        start = 0
        for i in itertools.chain(others, (len(items),)):
            if i > start:  # a run of log_scalar tuples
                run = items[start:i]
                count += i - start
                if raw:  # numbered first: their names count before the run's
                    parts.append(self._block(raw, auto, ts))
                    raw, auto = [], False
                plain = self._plain(run)
                if plain is not None:
                    parts.append(Scalars(run, ts, plain))
                else:
                    self._read_values(run, raw)
                    auto = True
            if i == len(items):
                break
            start = i + 1
            item = items[i]
            kind = kinds[i]
            if kind is MetricsItem:
                count += len(item.values)
                try:
                    raw += _metrics_rows(item)
                except Exception as exc:
                    self._refuse(item, exc)
                auto = auto or item.step is None
                continue
            if kind is UploadRequest:
                count += 1
                job = _Upload(item.artifact, item.snapshot, len(self.runners), self._staging)
                for r in self.runners:
                    if not r.uploads.put([job], 1, ts):
                        self._lost_early += 1
                        r.count_loss("failed", [job], "the logger closed before delivery")
                        job.finished(stored=False)
                continue
            if raw:
                parts.append(self._block(raw, auto, ts))
                raw, auto = [], False
            if kind is Barrier:
                if parts:
                    self._dispatch(parts, sum(map(_record_count, parts)), ts)
                    parts = []
                self._journal_sync()  # flush(): everything before it is on disk
                item.expect(2 * len(self.runners), self._lost_early)
                for r in self.runners:
                    for lane in r.lanes:
                        lane.add_barrier(item)
            else:  # a param or a tag
                parts.append(item)
                count += 1
        if raw:
            parts.append(self._block(raw, auto, ts))
        if parts:
            self._dispatch(parts, sum(map(_record_count, parts)), ts)
        return count

    def _plain(self, run: list[Any]) -> bool | None:
        """For a run of ``log_scalar`` tuples that all have an explicit step and a float value:
        count their names for the automatic steps and return whether every value is finite.
        ``None`` (nothing counted) for any other run. C-level passes only: the sum of the steps
        fails on a missing step or an item that is not such a tuple, the sum of the values on a
        value still on a device; a NaN or an infinity makes the sum non-finite."""
        try:
            sum(map(_STEP, run))
            total = sum(map(_VALUE, run))
        except TypeError:
            return None
        self._steps.update(map(_NAME, run))
        return bool(total - total == 0)

    def _read_values(self, run: list[Any], raw: list[tuple[str, float, int | None]]) -> None:
        """Append the run's ``log_scalar`` tuples to ``raw`` with their values read back; a
        value that cannot be read back is refused (and uses no automatic step)."""
        try:
            sum(map(_VALUE, run))
        except TypeError:  # a value still on a device
            for item in run:
                try:
                    raw.append((item[0], _resolve(item[1]), item[2]))
                except Exception as exc:
                    self._refuse(item, exc)
        else:
            raw += run

    def _block(self, raw: list[tuple[str, float, int | None]], auto: bool, ts: int) -> Scalars:
        """A block of ``raw``, numbered (see :meth:`_numbered`); ``auto``: a step may be missing."""
        if auto:
            rows = self._numbered(raw)
        else:
            self._steps.update(map(_NAME, raw))
            rows = raw  # type: ignore[assignment]
        total = sum(map(_VALUE, rows))
        return Scalars(rows, ts, bool(total - total == 0))

    def _numbered(self, raw: list[tuple[str, float, int | None]]) -> list[Row]:
        """``raw`` with every missing step replaced by the name's automatic step (its number of
        earlier points), counting every point; C-level passes, Python per distinct name."""
        names = list(map(_NAME, raw))
        steps = list(map(_STEP, raw))
        counts = self._steps
        missing = steps.count(None)
        if not missing:
            counts.update(names)
            return raw  # type: ignore[return-value]
        counters = {name: itertools.count(counts[name]) for name in set(names)}
        autos = list(map(next, map(counters.__getitem__, names)))
        for name, counter in counters.items():
            counts[name] = next(counter)
        if missing < len(steps):
            autos = [a if s is None else s for s, a in zip(steps, autos, strict=True)]
        return list(zip(names, map(_VALUE, raw), autos, strict=True))

    def _refuse(self, item: Any, exc: Exception) -> None:
        """A value that cannot be read back (a failed device copy, say): only that call's
        records are lost, with the reason; none of them is sent."""
        n = _record_count(item)
        self._lost_early += n
        for r in self.runners:
            r.count_loss("rejected", [item], f"could not capture the value: {exc!r}")

    def _dispatch(self, parts: list[Any], count: int, ts: int) -> None:
        journal = self.run_journal
        spill: tuple[Journal, int] | None = None
        if journal is not None and not self.journal_stopped:
            try:
                spill = (journal.journal, journal.append(parts, count))
            except (OSError, JournalError) as exc:  # a full disk: delivery goes on without it
                self._journal_failed(exc)
        for r, spills in zip(self.runners, self._spilling, strict=True):
            if not r.metrics.put(parts, count, ts, spill if spills else None):
                self._lost_early += count
                r.count_loss("failed", parts, "the logger closed before delivery")

    # -- the journal -----------------------------------------------------------------------
    def _journal_sync(self) -> None:
        if self.run_journal is not None and not self.journal_stopped:
            try:
                self.run_journal.sync()
            except (OSError, JournalError) as exc:
                self._journal_failed(exc)

    def _journal_failed(self, exc: Exception) -> None:
        """Stop journaling (the journal keeps what it holds, whole, and spilled frames are
        still read back) and tell the training loop once (:class:`JournalStoppedError`)."""
        journal = self.run_journal
        if journal is None or self.journal_stopped:
            return
        self.journal_stopped = True
        self.journal_error = f"the journal in {journal.run_dir} stopped: {exc}"
        self.runners[0].warn("journal", f"steplog: {self.journal_error}; records are still "
                             "delivered, but no longer kept on disk for steplog sync")
        if isinstance(exc, JournalFullError) and exc.__cause__ is None:  # the budget
            fix = "raise Options.journal_max_bytes or let the sink catch up"
        else:
            fix = f"free space where {journal.run_dir} is"
        with contextlib.suppress(Exception):
            self.owner.alarm(JournalStoppedError(
                f"steplog: {self.journal_error}. Logging goes on and records are still "
                f"delivered, from memory only: a crash or kill now loses what has not arrived "
                f"yet, and a stalled sink makes log calls wait ({fix}; a new logger journals "
                "again)"))

    def journal_checkpoint(self) -> None:
        """Write each sink's journal cursor now (after a flush)."""
        if self.run_journal is not None:
            self.run_journal.checkpoint()

    def sync_command(self) -> str | None:
        """``steplog sync <run dir>`` when this logger's journal keeps records some sink has
        not acknowledged (or may not have: its lanes are still running)."""
        journal = self.run_journal
        if journal is None:
            return None
        if self._runners_left == 0 and not self.journal_kept:
            return None
        return sync_command(journal.run_dir)

    # -- the end ---------------------------------------------------------------------------
    def shut_down(self, status: RunStatus) -> bool:
        """Deliver what was accepted, then end every sink's run with ``status``, within the
        owner's deadline. True when every run ended in time; otherwise the lanes go on in the
        background and each sink's run is ended after its last call returns."""
        self._wake.set()
        with self._space:
            self._space.notify_all()
        self._drainer.join(_remaining(self.deadline()))
        drained = not self._drainer.is_alive()
        if drained and self.queue:
            # Records queued by a call that passed its check just before the logger stopped
            # accepting: still accepted, so still delivered.
            self._process(self.take_all())
        if self.run_journal is not None:  # a sync of what is left ends the runs so
            with contextlib.suppress(Exception):
                self.run_journal.write_manifest(status)
        for r in self.runners:
            r.finish(status)
        ended = all(r.ended.wait(_remaining(self.deadline())) for r in self.runners)
        return drained and ended

    def runner_ended(self) -> None:
        with self._loss_lock:
            self._runners_left -= 1
            last = self._runners_left == 0
        if last:
            shutil.rmtree(self._staging, ignore_errors=True)
            if self.run_journal is not None:
                try:
                    self.journal_kept = self.run_journal.finish()
                except Exception as exc:
                    self.journal_kept = True
                    self.journal_error = f"closing the journal failed: {exc!r}"

    # -- counters --------------------------------------------------------------------------
    def note_loss(self, loss: Loss) -> None:
        with self._loss_lock:
            self._losses.append(loss)

    def losses(self) -> tuple[Loss, ...]:
        with self._loss_lock:
            return tuple(self._losses)

    def pending_losses(self) -> list[Loss]:
        """One entry per sink that still has records on the way (for a timed-out close)."""
        out = []
        for r in self.runners:
            pending = r.metrics.pending + r.uploads.pending
            if pending:
                why = r.last_error or "still being delivered when the close deadline passed"
                out.append(Loss(r.label, "failed", pending, "records still on the way", why))
        return out

    def reasons(self) -> list[str]:
        """Why records are missing: each sink's latest failed attempt (what the backend said),
        then the first loss noted (a refusal, or a deadline that passed)."""
        losses = self.losses()
        first = [losses[0].reason] if losses else []
        return [r.last_error for r in self.runners if r.last_error] + first

    def run_errors(self) -> list[str]:
        return [r.run_error or r.broken or "" for r in self.runners if r.run_error or r.broken]

    def _enqueued(self) -> int:
        with self._drain_lock:
            drained, holding = self._drained, self._holding
        return drained + sum(map(_record_count, holding)) + sum(map(_record_count,
                                                                    list(self.queue)))

    def unacknowledged(self) -> int:
        """Records accepted and not yet acknowledged by every sink (an upper bound)."""
        lanes = max(r.metrics.pending + r.uploads.pending for r in self.runners)
        return lanes + sum(_record_count(i) for i in list(self.queue))

    def stats(self) -> Stats:
        """A snapshot of the counters, in records (read without stopping the worker)."""
        sinks = {}
        oldest: int | None = None
        for r in self.runners:
            with r.metrics.cond:
                metrics_pending, spilled = r.metrics.pending, r.metrics.spilled
            pending = metrics_pending + r.uploads.pending
            with r._count_lock:
                sinks[r.label] = msgspec.structs.replace(r.stats, pending=pending,
                                                         spilled=spilled, info=r.sink.info())
            for lane in r.lanes:
                if lane.pending and (oldest is None or lane.oldest_ms < oldest):
                    oldest = lane.oldest_ms
        depth = len(self.queue)
        lag = 0.0
        if oldest is not None:
            lag = max(0.0, (now_ms() - oldest) / 1000.0)
        elif depth:
            lag = self.options.drain_interval_s
        per_sink = sinks.values()
        return Stats(
            enqueued=self._enqueued(),
            delivered=min(s.delivered for s in per_sink),
            dropped=self._dropped,
            rejected=max(s.rejected for s in per_sink),
            failed=max(s.failed for s in per_sink),
            retried=sum(s.retried for s in per_sink),
            queue_depth=depth,
            lag_s=lag,
            sinks=sinks,
            spilled=max(s.spilled for s in per_sink),
        )


def _metrics_rows(item: MetricsItem) -> list[tuple[str, float, int | None]]:
    """The rows of one ``log_metrics`` call, values read back (raises if one cannot be)."""
    values = item.values
    try:
        floats = list(map(float, values.values()))
    except TypeError:  # a value still on a device
        floats = list(map(_resolve, values.values()))
    return list(zip(values, floats, itertools.repeat(item.step)))


def _resolve(value: Any) -> float:
    if isinstance(value, PendingValue):
        return value.resolve()
    return float(value)


def _record_count(item: Any) -> int:
    """Records in a queue item or a lane part."""
    if type(item) is MetricsItem:
        return len(item.values)
    if type(item) is Scalars:
        return len(item.rows)
    if type(item) is Barrier:
        return 0
    if type(item) is _Spilled:
        return item.count
    return 1


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _unique_labels(sinks: Sequence[Sink]) -> list[str]:
    seen: dict[str, itertools.count[int]] = {}
    labels = []
    for s in sinks:
        counter = seen.setdefault(s.kind, itertools.count())
        i = next(counter)
        labels.append(s.kind if i == 0 else f"{s.kind}#{i}")
    return labels
