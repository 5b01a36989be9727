"""The pipeline: one bounded queue, a drain thread, and two delivery lanes per sink.

``log_*`` calls append plain tuples (scalars), :class:`MetricsItem` (metric dicts) or records to
:attr:`Pipeline.queue`, a ``collections.deque``. The *drain thread* wakes every
``drain_interval_s`` (or at once for a flush, close or full queue), takes everything queued,
stamps the scalars of that chunk with one wall-clock timestamp, assigns automatic steps, and
appends the records to each sink's lanes. When a whole interval brought nothing, it sleeps
until a call queues a record (the hot path's gate shut meanwhile, so that call wakes it),
then gathers for one interval as before: an idle logger costs no wake-ups, and the bound
below holds. Its records go to:

* the **metrics lane** (scalars, params, tags) calls ``sink.write(batch)`` in call order, with
  batches cut by count (``sink.max_batch``), estimated size (``sink.max_batch_bytes``), age
  (``sink.max_batch_age_s``, counted from the call: the lane waits for what the drain interval
  did not cover) and flush barriers;
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
took (default 200 ms, about 1 ms per 10,000 records). When the sinks fall behind and the lanes
are full, records wait in the queue and are stamped when the drain thread gets to them.

Retries (see :mod:`steplog.retry`) happen per batch inside a lane; a permanent rejection of a
batch is bisected until the refused records are isolated, and the rest is delivered.

The pipeline does not decide when the logger stops: its owner (:class:`steplog.lifecycle.
Lifecycle`) says whether records are still accepted and what the close deadline is, and calls
:meth:`Pipeline.shut_down`. Every thread is started at construction (a thread cannot be started
while the interpreter shuts down), and a sink's ``close`` runs on the last of its two lane
threads to finish, so it never overlaps one of the sink's own calls.

The package's modules follow the data: :mod:`~steplog.pipeline.options` (what a pipeline is
given), :mod:`~steplog.pipeline.items` (what travels), :mod:`~steplog.pipeline.drain` (queue to
blocks), :mod:`~steplog.pipeline.lane` (blocks to batches), :mod:`~steplog.pipeline.runner`
(batches to one sink), and :class:`Pipeline` here, which ties them together and keeps the
counters.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import shlex
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import msgspec

from steplog.errors import LoggerClosedError, SteplogWarning
from steplog.journal import JournalError
from steplog.kept import Keeper
from steplog.paths import sync_command
from steplog.pipeline.drain import Drain
from steplog.pipeline.items import Barrier, MetricsItem, UploadRequest, describe, record_count
from steplog.pipeline.options import FullPolicy, Options, Owner
from steplog.pipeline.runner import SinkRunner
from steplog.records import now_ms
from steplog.results import Loss, Stats
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

_MAX_LOSSES_KEPT = 100


class Pipeline(Drain):
    """One logger's queue, drain thread and sink lanes.

    The owning logger appends to :attr:`queue` directly on its hot path (after checking
    ``len(queue) < capacity``, the capacity it sees being 0 while its gate is shut) and calls
    :meth:`put` otherwise: a full queue, a closing logger, a resting drain thread.
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
        self.runners = [SinkRunner(self, s, label) for s, label in zip(sinks, labels, strict=True)]
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
        self._uploads_handed = []
        """The chunk the drain thread is turning into records (counted as enqueued)."""
        self._handed = 0
        """Records of ``_holding`` the lanes have (or that were counted lost)."""
        self._drain_lock = threading.Lock()
        self._take_lock = threading.Lock()
        """Taking queued items and withdrawing a late one never overlap (see withdraw)."""
        self._losses: collections.deque[Loss] = collections.deque(maxlen=_MAX_LOSSES_KEPT)
        self._loss_lock = threading.Lock()
        self._runners_left = len(self.runners)
        self._staging_users = 0
        """Closes and keeps in progress that may still read the staging folder."""
        self._staging = tempfile.mkdtemp(prefix="steplog-")
        self._sink_moves = len(sinks) == 1 and sinks[0].moves_sources
        """An upload given with ``move`` goes to the one sink as it is (see Upload)."""
        self.keeper = Keeper(options.runs_dir)
        self.journal_kept = False
        self._journal_settled = False
        """The last lane ended and ``journal_kept`` holds the journal's verdict."""
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
            except (OSError, JournalError) as exc:  # unwritable, or a full disk
                with contextlib.suppress(Exception):
                    warnings.warn(f"steplog: cannot journal in {self.keeper.run_dir} ({exc}); "
                                  "records are delivered, but not kept on disk for steplog "
                                  "sync", SteplogWarning, stacklevel=4)
            else:
                # Printed once, at the start: after a kill -9 nothing else says where it is
                # (not for a journal no sink replays from: journal=True for a file sink).
                run_dir = self.keeper.run_dir
                command = sync_command(run_dir)
                if any(r.sink.replayable() for r in self.runners):
                    with contextlib.suppress(Exception):
                        print(f"steplog: journal in {shlex.quote(str(run_dir))} (after a "
                              f"crash, {command} delivers what did not arrive)",
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

    def keep_time_left(self) -> float | None:
        """Once the owner's deadline passed: the seconds (``>= 0``) left in which uploads not
        stored are still kept on disk for a later sync; ``None`` before."""
        d = self.deadline()
        now = time.monotonic()
        if d is None or now < d:
            return None
        return max(0.0, d + _KEEP_AFTER_DEADLINE_S - now)

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
            self.owner.end_rest()
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
                    self.owner.end_rest()
                    return True
        n = record_count(item)
        with self._space:
            self._dropped += n
        self.note_loss(Loss("queue", "dropped", n, describe(item),
                            f"queue full (policy {self.full_policy!r})"))
        self.runners[0].warn(
            "dropped",
            f"steplog queue full ({self.capacity} items, policy {self.full_policy!r}): "
            "records are being dropped; see stats().dropped",
        )
        return False


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

    def wake(self) -> None:
        """Wake the drain thread now."""
        self._wake.set()

    def flush_barrier(self) -> Barrier:
        """Queue a flush marker behind every record logged so far and wake the drain thread."""
        barrier = Barrier(lost=self._dropped)
        self.queue.append(barrier)
        self._wake.set()
        return barrier


    def journal_checkpoint(self) -> None:
        """Write each sink's journal cursor now (after a flush)."""
        if self.run_journal is not None:
            self.run_journal.checkpoint()

    def sync_command(self) -> str | None:
        """``steplog sync <run dir>`` when this logger's journal keeps records some sink has
        not acknowledged (or may not have: its lanes are still running), or a run that could
        not be ended."""
        journal = self.run_journal
        if journal is None:
            return None
        if self._journal_settled and not self.journal_kept:
            return None
        return sync_command(journal.run_dir)

    # -- the end ---------------------------------------------------------------------------
    def shut_down(self, status: RunStatus) -> bool:
        """Deliver what was accepted, then end every sink's run with ``status``, within the
        owner's deadline. True when every run ended in time; otherwise the lanes go on in the
        background and each sink's run is ended after its last call returns."""
        self.staging_needed(True)
        try:
            return self._shut_down(status)
        finally:
            self.staging_needed(False)

    def _shut_down(self, status: RunStatus) -> bool:
        self.keeper.ended(status)  # uploads kept from now on note it too
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
                self.run_journal.closing(status)
        for r in self.runners:
            r.finish(status)
        ended = all(r.ended.wait(_remaining(self.deadline())) for r in self.runners)
        if not ended and self.run_journal is not None:
            with contextlib.suppress(Exception):  # a sync once the process is gone ends them
                self.run_journal.mark_unended({
                    r.label: ("the close deadline passed before its run was opened and ended"
                              if not r.ended.is_set() else r.run_error)
                    for r in self.runners})
        if not ended:  # what the uploads lanes still hold would be lost at exit: kept on disk
            # Past the deadline every hand-over to a lane returns at once, and the drain
            # thread keeps each upload it cannot hand over: local work only, given a bound.
            left = self.keep_time_left()
            self._drainer.join(_KEEP_AFTER_DEADLINE_S if left is None else left)
            for r in self.runners:
                r.keep_unfinished()
        return drained and ended

    def remove_staging(self) -> None:
        """Remove the folder where snapshots are written before their upload."""
        shutil.rmtree(self._staging, ignore_errors=True)

    def staging_needed(self, needed: bool) -> None:
        """While a close may keep uploads, or an upload is being kept, their snapshots'
        folder stays (calls in pairs: True, then False); once the last user is done, the folder
        goes if every sink ended meanwhile."""
        with self._loss_lock:
            self._staging_users += 1 if needed else -1
            gone = self._staging_users == 0 and self._runners_left == 0
        if gone:
            self.remove_staging()

    def runner_ended(self) -> None:
        with self._loss_lock:
            self._runners_left -= 1
            last = self._runners_left == 0
            in_use = self._staging_users > 0
        if last:
            if not in_use:
                self.remove_staging()
            if self.run_journal is not None:
                try:
                    self.journal_kept = self.run_journal.finish(
                        {r.label: r.run_error for r in self.runners if r.run_error})
                except Exception as exc:
                    self.journal_kept = True
                    self.journal_error = f"closing the journal failed: {exc!r}"
            # Only now: a timed-out close that reads the counters while the last lane ends
            # must not take "no lane left" for "nothing kept".
            self._journal_settled = True

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
        held = self._held()
        held_uploads = self._held_uploads()
        for r in self.runners:
            pending = r.metrics.pending + r.uploads.pending + held
            if pending:
                why = "; ".join([r.last_error or "still being delivered when the close "
                                 "deadline passed", *list(r.in_flight_notes), *held_uploads])
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
        with self._take_lock, self._drain_lock:  # no chunk between the queue and the thread
            drained, holding, queued = self._drained, self._holding, list(self.queue)
        return drained + sum(map(record_count, holding)) + sum(map(record_count, queued))

    def _held_uploads(self) -> list[str]:
        """A note on the uploads the drain thread holds and has not handed to every lane."""
        with self._drain_lock:
            holding = list(self._holding)
        handed = list(self._uploads_handed)
        names = [describe(i) for i in holding
                 if type(i) is UploadRequest and not any(u is i for u in handed)]
        if not names:
            return []
        return [f"{', '.join(names)} still with the drain thread, each kept for steplog sync "
                "as it reaches it while the close's time allows (steplog show lists what was "
                "kept)"]

    def _held(self) -> int:
        """Records of the chunk the drain thread holds that no lane has yet."""
        with self._drain_lock:
            holding, handed = self._holding, self._handed
        return max(0, sum(map(record_count, holding)) - handed)

    def unacknowledged(self) -> int:
        """Records accepted and not yet acknowledged by every sink (an upper bound)."""
        lanes = max(r.metrics.pending + r.uploads.pending for r in self.runners)
        return lanes + self._held() + sum(record_count(i) for i in list(self.queue))

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


_KEEP_AFTER_DEADLINE_S = 5.0
"""How long after its deadline a close goes on keeping uploads for ``steplog sync``: waiting
for the drain thread to hand over (or keep) what it holds, writing the snapshots of the uploads
not stored and putting them in the run directory. What starts in that time is finished; a
snapshot another thread is writing is waited for only within it."""


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
