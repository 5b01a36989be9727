"""A lane: the ordered buffer of one sink's metrics or uploads, and the thread that delivers it.

Batches are cut by count (``sink.max_batch``), estimated size (``sink.max_batch_bytes``), age
(``max_age_s``: what is left of ``sink.max_batch_age_s``, counted from the call, after the
drain interval) and flush barriers. With spilling, a lane over capacity holds
references to journal frames instead of records and reads them back when it reaches them.

Guarantees: records reach the sink in the order they were put; a batch never spans a barrier
or a spilled part; every record put is acknowledged exactly once (delivered, or lost and
counted by the runner with its reason), and a barrier arrives only after every record before it
was acknowledged; a lane over capacity makes the drain thread wait (or spill), never drops.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from steplog.frames import decode_batch
from steplog.journal import Journal
from steplog.pipeline.items import Barrier, Spilled
from steplog.records import Batch, Param, Scalar, Scalars, Tag

if TYPE_CHECKING:
    from steplog.pipeline.runner import SinkRunner

__all__ = ["Lane"]


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


class Lane:
    """An ordered buffer and the thread that delivers it to one sink.

    The buffer holds parts: :class:`Scalars` blocks and single records on the metrics lane,
    :class:`Upload` jobs on the upload lane. Every count (capacity, batch size, barrier
    positions) is in records; a block is cut where a batch or a barrier ends. With spilling, a
    metrics lane over capacity takes :class:`Spilled` journal references instead of parts; a
    batch ends before one, and the lane reads its frame back when it reaches it.
    ``deliver(parts)`` stores one batch and returns how many of its records were not stored
    (rejected or failed, already counted by the runner).
    """

    def __init__(
        self,
        runner: SinkRunner,
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
        self._in_hand: list[Any] = []
        """The batch being delivered (set when taken, cleared when released)."""
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
            first = not self.buffered
            if first:
                self.oldest_ms = timestamp_ms
                self._due = time.monotonic() + self.max_age_s
            if spilled:
                assert spill is not None
                journal, seq = spill
                if self._reader is None:
                    self._reader = _FrameReader(journal)
                tail = self.buffer[-1] if self.buffer else None
                if type(tail) is Spilled:
                    tail.add(seq, count, timestamp_ms)
                else:
                    self._spills.append(self.submitted)
                    self.buffer.append(Spilled(seq, count, timestamp_ms))
            else:
                self.buffer.extend(parts)
                self.resident += count
            self.buffered += count
            self.submitted += count
            # The lane thread waits for a first record, then for the batch's age or a full
            # batch: a put in between changes nothing it waits for, so it is not woken.
            if first or self.buffered >= self.max_batch:
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

    def take_waiting(self) -> tuple[list[Any], int]:
        """The parts no batch took yet, removed from the lane (for an uploads lane, whose parts
        are whole uploads), and how many records they hold; see :meth:`acknowledge_lost`."""
        with self.cond:
            parts = list(self.buffer)
            n = self.buffered
            self.buffer.clear()
            self.buffered = self.resident = 0
        return parts, n

    def in_hand(self) -> list[Any]:
        """The parts of the batch the lane thread took and has not released yet."""
        with self.cond:
            return list(self._in_hand)

    def acknowledge_lost(self, n: int) -> None:
        """``n`` records taken with :meth:`take_waiting` count as done, and lost."""
        self._acknowledge(n, n)

    def start(self) -> None:
        self._thread.start()

    # -- lane thread -----------------------------------------------------------------------
    def _next_batch(self) -> tuple[list[Any], int] | Spilled | None:
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
                self._in_hand = parts
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
            self._in_hand = parts
            return parts, take

    def _unspill(self, part: Spilled) -> None:
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
            self.runner.count_loss("failed", [Spilled(seq, n, stamp)], failure)
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
                if type(taken) is Spilled:
                    self._unspill(taken)
                    continue
                parts, count = taken  # type: ignore[misc]
                lost = count
                delivered = False
                try:
                    if runner.pipeline.deadline_passed():
                        if self.name == "uploads":
                            runner.keep_unsent(parts, "the close deadline passed first")
                        else:
                            runner.count_loss("failed", parts, "the close deadline passed first")
                    elif not runner.ensure_open():
                        if runner.broken is not None:
                            runner.count_loss("rejected", parts, runner.broken)
                        elif self.name == "uploads":
                            runner.keep_unsent(parts, runner.unavailable or "")
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
                        with runner.keep_lock:  # not while the closing thread keeps them
                            with self.cond:
                                self._in_hand = []
                            runner.forget_kept(parts)
                            _release(parts, stored=lost == 0)
                    else:
                        self._in_hand = []
                    self._acknowledge(count, lost)
        finally:
            runner.lane_finished()


_RECORD_OVERHEAD_BYTES = 48
"""Estimated encoding of everything but a record's key and value (step, timestamp, syntax)."""


def _part_size(part: Any) -> int:
    """Records in a lane part: a block's rows, else one."""
    return len(part.rows) if type(part) is Scalars else 1  # never a Spilled: read back first


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
