"""What travels from a ``log_*`` call to the lanes, and how many records each thing holds.

Queue items: plain ``(name, value, step)`` tuples (``log_scalar``), :class:`MetricsItem`
(``log_metrics``), params and tags (:mod:`steplog.records`), :class:`UploadRequest` (files,
figures, checkpoints) and :class:`Barrier` (a flush). Lane parts made of them by the drain
thread: :class:`~steplog.records.Scalars` blocks, single records, :class:`Upload` jobs (one per
artifact, shared by every sink) and :class:`Spilled` journal references.

Guarantees: a barrier's event is set only once every lane it was given to acknowledged every
record before it; an upload's snapshot is serialised at most once whatever the number of sinks,
and its source is removed only once every sink is done with it; :func:`record_count` counts
every item and part in records, the unit of every counter.
"""

from __future__ import annotations

import array
import itertools
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import msgspec

from steplog.checkpoints import Snapshot, write_policy
from steplog.errors import PermanentError
from steplog.notice import Notice
from steplog.paths import discard
from steplog.records import Artifact, Param, Scalar, Scalars, Tag

__all__ = [
    "Barrier",
    "MetricsItem",
    "Spilled",
    "Upload",
    "UploadBusyError",
    "UploadRequest",
    "describe",
    "record_count",
]


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
    """A flush marker: ``event`` (a :class:`~steplog.notice.Notice`) is set once every lane
    acknowledged every record queued before it; ``lost`` then counts the records of the run up
    to the marker that some sink did not store (rejected, failed, dropped)."""

    __slots__ = ("_left", "_lock", "event", "lost")

    def __init__(self, lost: int) -> None:
        self.event = Notice()
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


class UploadBusyError(Exception):
    """An upload's snapshot was still being written when a bounded wait for it ended."""


class Upload:
    """One artifact travelling to every sink; a snapshot is serialised once, on first need.

    ``move`` goes to the sink as it is only when ``sink_moves``: one sink, which takes the
    source away itself. Otherwise each sink copies it, and the source is removed once every sink
    stored it (a sink that moved it away would leave the others nothing to read).
    """

    __slots__ = ("_artifact", "_failure", "_lock", "_remaining", "_sink_moves", "_snapshot",
                 "_staging", "_stored", "order")

    _made = itertools.count(1)

    def __init__(self, artifact: Artifact, snapshot: Snapshot | None, sinks: int,
                 staging: str, sink_moves: bool = False) -> None:
        self.order = next(Upload._made)
        """Its place in logging order (the drain thread makes uploads in that order)."""
        self._artifact = artifact
        self._snapshot = snapshot
        self._sink_moves = sink_moves and sinks == 1
        self._remaining = sinks
        self._stored = True
        self._staging = staging
        self._failure: str | None = None
        """Why the snapshot could not be written (each later sink reports the same)."""
        self._lock = threading.Lock()

    @property
    def timestamp(self) -> int:
        return self._artifact.timestamp

    def materialize(self, timeout_s: float | None = None) -> Artifact:
        """The artifact to store, its snapshot written first if no sink wrote it yet. With
        ``timeout_s``: :class:`UploadBusyError` when another thread is still writing the
        snapshot after that long."""
        if not self._lock.acquire(timeout=-1 if timeout_s is None else max(0.0, timeout_s)):
            raise UploadBusyError(f"{self!r} was still being written")
        try:
            return self._materialize()
        finally:
            self._lock.release()

    def _materialize(self) -> Artifact:
        if self._failure is not None:
            raise PermanentError(self._failure)
        snapshot = self._snapshot
        if snapshot is not None:
            snapshot.start()  # raises SupersededError when a later snapshot replaced it
            path = None
            try:
                if self._artifact.checkpoint:
                    path = tempfile.mkdtemp(dir=self._staging)
                    write_policy(snapshot, Path(path))
                else:
                    fd, path = tempfile.mkstemp(dir=self._staging, suffix=".pt")
                    os.close(fd)
                    snapshot.write(Path(path))
            except BaseException as exc:
                snapshot.drop()  # its memory is freed; every sink reports the failure
                self._failure = (f"snapshot {self._artifact.name!r} could not be written: "
                                 f"{exc}")
                if path is not None:  # what was written of it goes too
                    discard(path)
                raise
            self._snapshot = None
            self._artifact = msgspec.structs.replace(
                self._artifact, source=path, cleanup=True
            )
        if self._artifact.move and not self._sink_moves:
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
        copied_move = a.move and not self._sink_moves and self._stored
        if done and a.source and (a.cleanup or copied_move):
            discard(a.source)

    def __repr__(self) -> str:
        return f"artifact {self._artifact.name!r}"


class Spilled:
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



def describe(record: object) -> str:
    """A record, queue item or lane part in a few words, for loss messages and warnings."""
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
    if isinstance(record, Spilled):
        return f"{record.count} records of journal frame {record.seqs[record.first]}"
    return repr(record)


def record_count(item: Any) -> int:
    """Records in a queue item or a lane part."""
    if type(item) is MetricsItem:
        return len(item.values)
    if type(item) is Scalars:
        return len(item.rows)
    if type(item) is Barrier:
        return 0
    if type(item) is Spilled:
        return item.count
    return 1
