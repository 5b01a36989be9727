"""One sink's runner: it opens the sink once, feeds its two lanes, retries, and counts.

Guarantees: ``sink.open`` succeeds at most once and is retried (a sink that can never open
rejects its records with the reason); a batch is retried until it is stored or the close
deadline passes; a batch the backend refuses for good is bisected so that only the refused
records are lost; every loss is counted once, with its reason, and warned about once per kind;
``sink.close`` runs once, on the last of the two lane threads to finish, so it never overlaps one
of the sink's own calls.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from steplog.errors import SteplogWarning
from steplog.paths import sync_command
from steplog.pipeline.items import Upload, UploadBusyError, describe, record_count
from steplog.pipeline.lane import Lane
from steplog.records import Batch
from steplog.results import Loss, LossKind, SinkStats
from steplog.retry import call_with_retry, is_retryable
from steplog.sinks.base import RunStatus, Sink

if TYPE_CHECKING:
    from steplog.pipeline import Pipeline

__all__ = ["NO_TIME_LEFT", "NotKeptError", "SinkRunner"]

NO_TIME_LEFT = "the close had no time left to keep it"


class NotKeptError(Exception):
    """Why an upload a sink could not store was not kept for a later sync."""


class SinkRunner:
    """Everything the pipeline does for one sink: open it once, feed both lanes, count, and end
    its run after both lanes finished."""

    def __init__(self, pipeline: Pipeline, sink: Sink, label: str) -> None:
        self.pipeline = pipeline
        self.sink = sink
        sink.bind_deadline(pipeline.deadline_passed)
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
        # The oldest record of a drained chunk has already waited about one drain interval:
        # the lane waits only for the rest of the sink's batch age (a wake-up fewer per batch
        # when the age is within the interval).
        age = max(0.0, sink.max_batch_age_s - pipeline.options.drain_interval_s)
        self.metrics = Lane(
            self, "metrics", self._deliver_metrics, sink.max_batch, age, cap,
            max_bytes=sink.max_batch_bytes,
        )
        self.keep_lock = threading.Lock()
        """Held while an upload the lane took is kept, and while the lane releases it (its
        staged snapshot is removed then): one of the two keeps it, whole."""
        self._kept: dict[Upload, str] = {}
        """Uploads kept already (see keep_unfinished), and the folder each is kept in."""
        self.in_flight_notes: list[str] = []
        """Where each upload in flight when a close's deadline passed is kept, or why not."""
        self._metrics_failed = 0
        """Metric records this sink gave up on after their retries (journal cursors)."""
        self.uploads = Lane(self, "uploads", self._upload, 1, 0.0, cap)
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

    def _upload(self, batch: list[Upload]) -> int:
        lost = 0
        for job in batch:
            artifact = None
            try:
                artifact = job.materialize()
                self._retry(lambda a=artifact: self.sink.upload(a))  # type: ignore[misc]
            except BaseException as exc:
                kind: LossKind = "failed" if is_retryable(exc) else "rejected"
                reason = str(exc) or repr(exc)
                with self.keep_lock:
                    if (kind == "failed" and artifact is not None) or job in self._kept:
                        reason = self._keep_once(job, reason)
                self.count_loss(kind, [job], reason)
                lost += 1
            else:
                with self._count_lock:
                    self.stats.delivered += 1
                self.pipeline.keeper.stored(self.sink, artifact, job.order)
        return lost

    def keep_unfinished(self) -> None:
        """For a close whose deadline passed: keep every upload not stored yet for a later
        sync, within :meth:`Pipeline.keep_time_left`. Those waiting in the lane are taken from it
        and counted failed; the one in flight goes on (should it arrive, a sync stores it again
        under the same name), and whether it was kept is noted in :attr:`in_flight_notes`."""
        reason = "the close deadline passed first"
        waiting, n = self.uploads.take_waiting()
        self.keep_unsent(waiting, reason)
        for part in waiting:
            part.finished(stored=False)
        self.uploads.acknowledge_lost(n)
        if not self.uploads.in_hand():
            return
        if not self._lock_keeping():
            self.in_flight_notes.extend(
                f"{job!r} in flight is not kept by the close: it had no time left (another "
                "thread was keeping uploads of this sink)" for job in self.uploads.in_hand())
            return
        try:
            # Read under the lock: the lane releases what it holds (and forgets it was kept)
            # only with the lock held, so each job seen here is not released yet.
            for job in self.uploads.in_hand():
                if job in self._kept:
                    folder = self._kept[job]
                else:
                    try:
                        folder = self._keep(job, reason)
                    except NotKeptError as exc:
                        self.in_flight_notes.append(f"{job!r} in flight is not kept: {exc}")
                        continue
                self.in_flight_notes.append(f"{job!r} in flight is kept in {folder}, upload "
                                            f"it later with: {sync_command(folder)}")
        finally:
            self.keep_lock.release()

    def keep_unsent(self, jobs: list[Upload], reason: str) -> None:
        """Uploads not sent (the run could not be opened for now, the close deadline passed):
        each is kept for a later sync, which opens (or creates) the run, and counted failed
        with ``reason`` and where it is kept (or why not)."""
        for job in jobs:
            if self._lock_keeping():
                try:
                    why = self._keep_once(job, reason)
                finally:
                    self.keep_lock.release()
            else:
                why = f"{reason} (not kept: {NO_TIME_LEFT})"
            self.count_loss("failed", [job], why)

    def _lock_keeping(self) -> bool:
        """Take ``keep_lock``, waiting no longer than :meth:`Pipeline.keep_time_left`."""
        left = self.pipeline.keep_time_left()
        return self.keep_lock.acquire(timeout=-1 if left is None else left)

    def forget_kept(self, jobs: list[Upload]) -> None:
        """``jobs`` are done with (called with ``keep_lock`` held)."""
        for job in jobs:
            self._kept.pop(job, None)

    def _keep_once(self, job: Upload, reason: str) -> str:
        """Keep the payload of ``job``, which this sink could not store, unless it was kept
        already (see :mod:`steplog.kept`); ``reason`` with where it is and the command that
        uploads it, or why it is not kept. Called with ``keep_lock`` held."""
        if job in self._kept:
            return f"{reason}; it was kept when the close deadline passed"
        try:
            folder = self._keep(job, reason)
        except NotKeptError as exc:
            return f"{reason} (not kept: {exc})"
        return f"{reason}; kept in {folder}, upload it later with: {sync_command(folder)}"

    def _keep(self, job: Upload, reason: str) -> str:
        """Keep ``job``'s payload for a later sync; its folder. After a close's deadline this
        starts only while :meth:`Pipeline.keep_time_left` leaves time, and waits for a snapshot
        another thread is writing no longer than that. :class:`NotKeptError` says why it was not."""
        pipeline = self.pipeline
        left = pipeline.keep_time_left()
        if left == 0:
            raise NotKeptError(NO_TIME_LEFT)
        pipeline.staging_needed(True)
        try:
            try:
                artifact = job.materialize(left)
            except UploadBusyError:
                raise NotKeptError("its snapshot was still being written") from None
            except Exception as exc:
                raise NotKeptError(f"it could not be written: {exc!r}") from None
            if pipeline.keep_time_left() == 0:  # the write may have taken the rest of it
                raise NotKeptError(NO_TIME_LEFT)
            try:
                folder = str(pipeline.keeper.keep(self.sink, artifact, reason, job.order))
            except Exception as exc:
                raise NotKeptError(f"it could not be stored on disk: {exc!r}") from None
        finally:
            pipeline.staging_needed(False)
        self._kept[job] = folder
        return folder

    def count_loss(self, kind: LossKind, records: Sequence[Any], reason: str,
                   n: int | None = None, what: str | None = None) -> None:
        """Count ``records`` (a batch, lane parts or queue items; ``n`` records when given) as
        rejected or failed by this sink, note why, warn once. ``what`` names them, in place
        of the first record and a count of the others."""
        if n is None:
            n = len(records) if type(records) is Batch else sum(map(record_count, records))
        with self._count_lock:
            if kind == "rejected":
                self.stats.rejected += n
            else:
                self.stats.failed += n
        first = what if what is not None else describe(records[0])
        self.pipeline.note_loss(Loss(self.label, kind, n, first, reason))
        extra = n - record_count(records[0]) if records and what is None else 0
        more = f" and {extra} more" if extra > 0 else ""
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
        closed = False
        try:
            if self._opened:
                self._retry(lambda: self.sink.close(self._status))
                closed = True
            elif self.broken is None:  # a run that may come back: a later sync creates it
                self.run_error = f"the run was never opened ({self.unavailable or 'no attempt'})"
                self.pipeline.note_loss(Loss(self.label, "run", 0, "opening the run",
                                             self.run_error))
        except BaseException as exc:
            self.run_error = f"could not end the run of {self.sink.describe()}: {exc!r}"
            self.pipeline.note_loss(Loss(self.label, "run", 0, "ending the run", self.run_error))
            self.warn("close", f"{self.label}: {self.run_error}")
        finally:
            if not closed:  # its connections and processes go now, not when it is collected
                with contextlib.suppress(Exception):
                    self.sink.release()
            try:
                self.pipeline.runner_ended()  # the journal is closed before close() returns
            finally:
                self.ended.set()
