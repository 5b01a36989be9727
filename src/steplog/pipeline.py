"""The pipeline: one bounded queue, a drain thread, and two delivery lanes per sink.

``log_*`` calls append plain tuples (scalars, metric dicts) or records to :attr:`Pipeline.queue`,
a ``collections.deque``. The *drain thread* wakes every ``drain_interval_s`` (or at once for a
flush, close or full queue), takes everything queued, stamps the scalars of that chunk with one
wall-clock timestamp, assigns automatic steps, and appends the records to each sink's lanes:

* the **metrics lane** (scalars, params, tags) calls ``sink.write(batch)`` in call order, with
  batches cut by count (``sink.max_batch``), estimated size (``sink.max_batch_bytes``) and age
  (``sink.max_batch_age_s``);
* the **upload lane** (files, figures, checkpoints) calls ``sink.upload(item)``, one at a time,
  on its own thread, so a large upload never delays metrics.

Timestamp bound: a scalar's timestamp is taken when the drain thread takes it from the queue,
so it is later than the call by at most ``drain_interval_s`` plus the time the previous drain
took (default 50 ms, about 1 ms per 10,000 records). When the sinks fall behind and the lanes
are full, records wait in the queue and are stamped when the drain thread gets to them.

Retries (see :mod:`steplog.retry`) happen per batch inside a lane; a permanent rejection of a
batch is bisected until the refused records are isolated, and the rest is delivered.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from steplog.capture import PendingValue
from steplog.records import Artifact, MetricRecord, Param, Scalar, Tag, now_ms
from steplog.results import CloseResult, FlushResult, Rejection, SinkStats, Stats
from steplog.retry import RetryPolicy, call_with_retry, is_retryable
from steplog.sinks.base import RunStatus, Sink

__all__ = ["FullPolicy", "MetricsItem", "Options", "Pipeline", "SteplogWarning", "UploadRequest"]

FullPolicy = Literal["block", "drop"]
"""What a ``log_*`` call does when the queue is full: wait for room (up to ``block_timeout_s``,
then drop and count), or drop at once and count. Spilling to disk is a planned third policy."""

_MAX_REJECTIONS_KEPT = 100


class SteplogWarning(UserWarning):
    """A delivery problem reported by the worker (each kind of problem once per sink)."""


@dataclass(frozen=True)
class Options:
    """Tuning of one logger's pipeline; the defaults suit a training loop."""

    queue_size: int = 1_000_000
    """Most items (a scalar, a metric dict, a record) waiting for the drain thread."""
    full_policy: FullPolicy = "block"
    block_timeout_s: float = 30.0
    """With ``block``: longest a ``log_*`` call waits for room before dropping its record."""
    drain_interval_s: float = 0.05
    """How often the drain thread takes the queue; bounds the timestamp error of scalars."""
    lane_capacity: int = 1_000_000
    """Most records buffered per sink lane before the drain thread waits (backpressure)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    exit_timeout_s: float = 30.0
    """Deadline of the close that runs at interpreter exit when the user did not close."""

    def __post_init__(self) -> None:
        if self.queue_size < 1 or self.lane_capacity < 1:
            raise ValueError("queue_size and lane_capacity must be >= 1")
        if self.full_policy not in ("block", "drop"):
            raise ValueError(f"full_policy must be 'block' or 'drop', got {self.full_policy!r}")
        if self.block_timeout_s < 0 or self.drain_interval_s <= 0 or self.exit_timeout_s < 0:
            raise ValueError("timeouts must be >= 0 and drain_interval_s > 0")


class MetricsItem(msgspec.Struct, gc=False):
    """Queue item of one ``log_metrics`` call: a private copy of the dict, and its step.

    A Struct without GC tracking, unlike a tuple holding a dict, never makes the garbage
    collector scan the queue: in a process with torch loaded that costs ~0.8 us per call.
    """

    values: dict[str, Any]
    step: int | None


class UploadRequest:
    """Queue item for the upload lanes: an artifact, and an object snapshot to serialise first
    (``save_policy``/``save_agent``) or ``None``."""

    __slots__ = ("artifact", "snapshot")

    def __init__(self, artifact: Artifact, snapshot: Any = None) -> None:
        self.artifact = artifact
        self.snapshot = snapshot


class _Barrier:
    """A flush marker: set once every lane acknowledged every record queued before it."""

    __slots__ = ("_left", "_lock", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._left = 0

    def expect(self, lanes: int) -> None:
        with self._lock:
            self._left += lanes
        if lanes == 0:
            self.arrive(0)

    def arrive(self, n: int = 1) -> None:
        with self._lock:
            self._left -= n
            if self._left <= 0:
                self.event.set()


class _Upload:
    """One artifact travelling to every sink; a snapshot is serialised once, on first need."""

    __slots__ = ("_artifact", "_lock", "_remaining", "_snapshot", "_staging")

    def __init__(self, artifact: Artifact, snapshot: Any, sinks: int, staging: str) -> None:
        self._artifact = artifact
        self._snapshot = snapshot
        self._remaining = sinks
        self._staging = staging
        self._lock = threading.Lock()

    @property
    def timestamp(self) -> int:
        return self._artifact.timestamp

    def materialize(self) -> Artifact:
        with self._lock:
            if self._snapshot is not None:
                fd, path = tempfile.mkstemp(dir=self._staging, suffix=".pt")
                with os.fdopen(fd, "wb") as f:
                    torch = sys.modules.get("torch")
                    if torch is not None:
                        torch.save(self._snapshot, f)
                    else:
                        pickle.dump(self._snapshot, f, protocol=pickle.HIGHEST_PROTOCOL)
                self._snapshot = None
                self._artifact = msgspec.structs.replace(
                    self._artifact, source=path, cleanup=True
                )
            return self._artifact

    def finished(self) -> None:
        with self._lock:
            self._remaining -= 1
            done = self._remaining == 0
        if done and self._artifact.cleanup and self._artifact.source:
            with contextlib.suppress(OSError):
                os.unlink(self._artifact.source)

    def __repr__(self) -> str:
        return f"artifact {self._artifact.name!r}"


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
    return repr(record)


class _Lane:
    """An ordered buffer and the thread that delivers it to one sink."""

    def __init__(
        self,
        runner: _SinkRunner,
        name: str,
        deliver: Callable[[list[Any]], None],
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
        self.submitted = 0
        self.done = 0
        self.oldest_ms = 0
        self._due = 0.0
        self._barriers: collections.deque[tuple[int, _Barrier]] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = name != "metrics"
        """A metrics lane becomes ready once its sink opened (or failed to): a flush waits for
        that, so after a flush the run exists even when nothing was logged."""

    # -- drain-thread side ---------------------------------------------------------------
    def put(self, items: Sequence[Any], timestamp_ms: int) -> int:
        """Append ``items``; wait while the lane is over capacity. Returns how many were taken
        (fewer only when the pipeline's close deadline passed while waiting)."""
        with self.cond:
            while len(self.buffer) >= self.capacity:
                if self.runner.pipeline.deadline_passed():
                    return 0
                self.cond.wait(0.05)
            if not self.buffer:
                self.oldest_ms = timestamp_ms
                self._due = time.monotonic() + self.max_age_s
            self.buffer.extend(items)
            self.submitted += len(items)
            self._start()
            self.cond.notify_all()
        return len(items)

    def add_barrier(self, barrier: _Barrier) -> None:
        with self.cond:
            if self._ready and self.done >= self.submitted:
                barrier.arrive()
                return
            self._barriers.append((self.submitted, barrier))
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify_all()

    def join(self, timeout: float | None) -> bool:
        t = self._thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    @property
    def pending(self) -> int:
        return self.submitted - self.done

    def start(self) -> None:
        with self.cond:
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"steplog-{self.runner.sink.kind}-{self.name}", daemon=True
            )
            self._thread.start()

    # -- lane thread -----------------------------------------------------------------------
    def _next_batch(self) -> list[Any] | None:
        with self.cond:
            while True:
                n = len(self.buffer)
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
            if self.max_bytes is not None:
                take = _fitting(self.buffer, take, self.max_bytes)
            pop = self.buffer.popleft
            return [pop() for _ in range(take)]

    def _acknowledge(self, n: int) -> None:
        with self.cond:
            self.done += n
            if self.buffer:
                self.oldest_ms = _timestamp_of(self.buffer[0], self.oldest_ms)
            while self._barriers and self._ready and self._barriers[0][0] <= self.done:
                self._barriers.popleft()[1].arrive()
            self.cond.notify_all()

    def _run(self) -> None:
        pipeline = self.runner.pipeline
        if not self._ready:
            self.runner.ensure_open()  # open the run early, off the caller's thread
            with self.cond:
                self._ready = True
            self._acknowledge(0)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                if pipeline.deadline_passed():
                    self.runner.fail(batch, "the close deadline passed before delivery")
                    _release(batch)
                elif not self.runner.ensure_open():
                    if self.runner.broken is not None:
                        self.runner.reject(batch, self.runner.broken)
                    else:
                        self.runner.fail(batch, self.runner.unavailable)
                    _release(batch)
                else:
                    self._deliver(batch)
            except BaseException as exc:  # never let the lane die silently
                self.runner.fail(batch, f"internal error: {exc!r}")
            finally:
                self._acknowledge(len(batch))


_RECORD_OVERHEAD_BYTES = 48
"""Estimated encoding of everything but a record's key and value (step, timestamp, syntax)."""


def _approx_size(record: Any) -> int:
    if type(record) is Scalar:
        return len(record.name) + _RECORD_OVERHEAD_BYTES
    if type(record) is Param or type(record) is Tag:
        return len(record.name) + len(str(record.value)) + _RECORD_OVERHEAD_BYTES
    return _RECORD_OVERHEAD_BYTES


def _fitting(buffer: collections.deque[Any], most: int, max_bytes: int) -> int:
    """How many of the first ``most`` records fit in ``max_bytes`` (at least one)."""
    total = 0
    for k, record in enumerate(itertools.islice(buffer, most)):
        total += _approx_size(record)
        if total > max_bytes:
            return max(1, k)
    return most


def _release(batch: Sequence[Any]) -> None:
    for item in batch:
        if isinstance(item, _Upload):
            item.finished()


def _timestamp_of(item: Any, default: int) -> int:
    return getattr(item, "timestamp", default)


class _SinkRunner:
    """Everything the pipeline does for one sink: open it once, feed both lanes, count."""

    def __init__(self, pipeline: Pipeline, sink: Sink, label: str) -> None:
        self.pipeline = pipeline
        self.sink = sink
        self.label = label
        self.stats = SinkStats()
        self.broken: str | None = None
        self.unavailable = ""
        self._opened = False
        self._open_lock = threading.Lock()
        self._warned: set[str] = set()
        cap = pipeline.options.lane_capacity
        self.metrics = _Lane(
            self, "metrics", self._write, sink.max_batch, sink.max_batch_age_s, cap,
            max_bytes=sink.max_batch_bytes,
        )
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
            except BaseException as exc:
                reason = f"could not open {self.sink.describe()}: {exc}"
                if is_retryable(exc):
                    self.unavailable = reason
                else:
                    self.broken = reason
                self.warn("open", reason)
            return self._opened

    def _retry(self, fn: Callable[[], Any]) -> Any:
        return call_with_retry(
            fn, self.pipeline.options.retry, self.pipeline.get_deadline, self._on_retry
        )

    def _on_retry(self, exc: BaseException) -> None:
        self.stats.retried += 1
        self.warn(
            "retry",
            f"{self.label}: delivery failed ({exc!r}); retrying with backoff, nothing is lost "
            f"while the logger is open",
        )

    def _write(self, batch: list[MetricRecord]) -> None:
        try:
            self._retry(lambda: self.sink.write(batch))
        except BaseException as exc:
            if is_retryable(exc):
                self.fail(batch, f"gave up retrying: {exc!r}")
            elif len(batch) > 1 and not getattr(exc, "whole_batch", False):
                # Isolate what the backend refuses: the rest of the batch still gets delivered.
                mid = len(batch) // 2
                self._write(batch[:mid])
                self._write(batch[mid:])
            else:
                self.reject(batch, str(exc) or repr(exc))
        else:
            self.stats.delivered += len(batch)

    def _upload(self, batch: list[_Upload]) -> None:
        for job in batch:
            try:
                artifact = job.materialize()
                self._retry(lambda a=artifact: self.sink.upload(a))  # type: ignore[misc]
            except BaseException as exc:
                if is_retryable(exc):
                    self.fail([job], f"gave up retrying: {exc!r}")
                else:
                    self.reject([job], str(exc) or repr(exc))
            else:
                self.stats.delivered += 1
            finally:
                job.finished()

    def reject(self, records: Sequence[Any], reason: str) -> None:
        self.stats.rejected += sum(map(_record_count, records))
        for r in records:
            self.pipeline.note_rejection(Rejection(self.label, _describe(r), reason))
        self.warn(f"reject:{reason[:40]}", f"{self.label} rejected {_describe(records[0])}"
                  f"{'' if len(records) == 1 else f' and {len(records) - 1} more'}: {reason}")

    def fail(self, records: Sequence[Any], reason: str) -> None:
        self.stats.failed += sum(map(_record_count, records))
        self.warn("fail", f"{self.label}: {len(records)} records not delivered: {reason}")

    def warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, SteplogWarning, stacklevel=2)

    def close_sink(self, status: RunStatus) -> None:
        if not self._opened:
            return
        try:
            self._retry(lambda: self.sink.close(status))
        except BaseException as exc:
            self.warn("close", f"{self.label}: closing the run failed: {exc!r}")


class Pipeline:
    """One logger's queue, drain thread and sink lanes.

    The owning logger appends to :attr:`queue` directly on its hot path (after checking
    ``len(queue) < capacity``) and calls :meth:`put` when the queue is full.
    """

    def __init__(self, sinks: Sequence[Sink], options: Options | None = None) -> None:
        if not sinks:
            raise ValueError("a pipeline needs at least one sink")
        self.options = options or Options()
        self.capacity = self.options.queue_size
        self.queue: collections.deque[Any] = collections.deque()
        labels = _unique_labels(sinks)
        self.runners = [_SinkRunner(self, s, label) for s, label in zip(sinks, labels, strict=True)]
        self._wake = threading.Event()
        self._space = threading.Condition(threading.Lock())
        self._deadline: float | None = None
        self._stopping = False
        self._status: RunStatus = "FINISHED"
        self._steps: dict[str, int] = {}
        self._drained = 0
        self._dropped = 0
        self._rejections: collections.deque[Rejection] = collections.deque(
            maxlen=_MAX_REJECTIONS_KEPT
        )
        self._rejected_total = 0
        self._close_lock = threading.Lock()
        self._closed: CloseResult | None = None
        self._staging = tempfile.mkdtemp(prefix="steplog-")
        self._drainer = threading.Thread(target=self._drain_loop, name="steplog-drain", daemon=True)
        self._drainer.start()
        for r in self.runners:
            r.metrics.start()

    # -- deadlines -------------------------------------------------------------------------
    def get_deadline(self) -> float | None:
        return self._deadline

    def deadline_passed(self) -> bool:
        d = self._deadline
        return d is not None and time.monotonic() >= d

    # -- producer side ---------------------------------------------------------------------
    def put(self, item: Any) -> bool:
        """Enqueue ``item`` under the queue-full policy; False when it was dropped (counted)."""
        q = self.queue
        if len(q) < self.capacity:
            q.append(item)
            return True
        if self.options.full_policy == "block":
            end = time.monotonic() + self.options.block_timeout_s
            with self._space:
                while len(q) >= self.capacity:
                    self._wake.set()
                    left = end - time.monotonic()
                    if left <= 0 or self._stopping:
                        break
                    self._space.wait(min(left, 0.1))
                else:
                    q.append(item)
                    return True
        with self._space:
            self._dropped += _record_count(item)
        self.runners[0].warn(
            "dropped",
            f"steplog queue full ({self.capacity} items, policy {self.options.full_policy!r}): "
            "records are being dropped; see stats().dropped",
        )
        return False

    def put_marker(self, item: Any) -> None:
        """Enqueue a control item regardless of the bound, and wake the drain thread."""
        self.queue.append(item)
        self._wake.set()

    # -- drain thread ----------------------------------------------------------------------
    def _drain_loop(self) -> None:
        q = self.queue
        pop = q.popleft
        interval = self.options.drain_interval_s
        busy = max(r.metrics.max_batch for r in self.runners)
        try:
            while True:
                if len(q) < busy:
                    self._wake.wait(interval)
                self._wake.clear()
                n = len(q)
                if n:
                    try:
                        self._process([pop() for _ in range(n)])
                    except Exception as exc:  # keep draining whatever went wrong
                        self.runners[0].warn("drain", f"steplog drain thread error: {exc!r}")
                    with self._space:
                        self._space.notify_all()
                if self._stopping and not q:
                    break
        finally:
            self._finish()

    def _process(self, items: list[Any]) -> None:
        """Turn one drained chunk into records, in order, and hand them to the lanes."""
        ts = now_ms()
        steps = self._steps
        get = steps.get
        out: list[MetricRecord] = []
        add = out.append
        count = 0
        for item in items:
            mark = len(out)
            try:
                if type(item) is tuple:
                    name, value, step = item
                    n = get(name, 0)
                    steps[name] = n + 1
                    if type(value) is not float:
                        value = _resolve(value)
                    add(Scalar(name, value, n if step is None else step, ts))
                    count += 1
                elif type(item) is MetricsItem:
                    step = item.step
                    for name, value in item.values.items():
                        n = get(name, 0)
                        steps[name] = n + 1
                        if type(value) is not float:
                            value = _resolve(value)
                        add(Scalar(name, value, n if step is None else step, ts))
                    count += len(item.values)
                elif type(item) is _Barrier:
                    if out:
                        self._dispatch(out, ts)
                        out = []
                        add = out.append
                    item.expect(2 * len(self.runners))
                    for r in self.runners:
                        for lane in r.lanes:
                            lane.add_barrier(item)
                elif type(item) is UploadRequest:
                    count += 1
                    job = _Upload(item.artifact, item.snapshot, len(self.runners), self._staging)
                    for r in self.runners:
                        if not r.uploads.put([job], ts):
                            r.fail([job], "the close deadline passed before delivery")
                            job.finished()
                else:
                    add(item)
                    count += 1
            except Exception as exc:
                # A value that cannot be read back (a failed device copy, say) is refused, and
                # only that call's records are lost, with the reason; none of them is sent.
                del out[mark:]
                count += _record_count(item)
                for r in self.runners:
                    r.reject([item], f"could not capture the value: {exc!r}")
        if out:
            self._dispatch(out, ts)
        self._drained += count

    def _dispatch(self, records: list[MetricRecord], ts: int) -> None:
        for r in self.runners:
            taken = r.metrics.put(records, ts)
            if taken < len(records):
                r.fail(records[taken:], "the close deadline passed before delivery")

    def _finish(self) -> None:
        """Stop the lanes once they are empty (or the deadline passed), then end each run."""
        for r in self.runners:
            for lane in r.lanes:
                lane.stop()
        for r in self.runners:
            for lane in r.lanes:
                lane.join(_remaining(self._deadline))
        for r in self.runners:
            r.close_sink(self._status)
        shutil.rmtree(self._staging, ignore_errors=True)

    # -- public ----------------------------------------------------------------------------
    def note_rejection(self, rejection: Rejection) -> None:
        self._rejections.append(rejection)
        self._rejected_total += 1

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Return once every record queued before this call is acknowledged by every sink, or
        ``timeout`` seconds passed; the result is falsy in the latter case."""
        start = time.monotonic()
        if self._closed is not None or not self._drainer.is_alive():
            return FlushResult(ok=self._unacknowledged() == 0, pending=self._unacknowledged(),
                               elapsed_s=0.0, rejected=self._rejected_total)
        barrier = _Barrier()
        self.put_marker(barrier)
        ok = barrier.event.wait(timeout)
        return FlushResult(
            ok=ok,
            pending=0 if ok else self._unacknowledged(),
            elapsed_s=time.monotonic() - start,
            rejected=self._rejected_total,
        )

    def close(self, timeout: float | None = None, status: RunStatus = "FINISHED") -> CloseResult:
        """Flush, end every sink's run with ``status`` and stop the threads, within ``timeout``
        seconds. Idempotent: a second call returns the first call's result."""
        with self._close_lock:
            if self._closed is not None:
                return self._closed
            start = time.monotonic()
            self._deadline = None if timeout is None else start + timeout
            self._status = status
            self.flush(timeout)
            self._stopping = True
            self._wake.set()
            with self._space:
                self._space.notify_all()
            self._drainer.join(_remaining(self._deadline))
            timed_out = self._drainer.is_alive()
            if timed_out and self._deadline is not None:
                self._deadline = min(self._deadline, time.monotonic())
            s = self.stats()
            # Derived from monotone counters, so a lane still finishing a batch cannot make a
            # record count twice: per sink, what was accepted minus what it settled.
            undelivered = s.dropped + sum(
                s.enqueued - sink.delivered - sink.rejected for sink in s.sinks.values()
            )
            self._closed = CloseResult(
                ok=undelivered == 0 and not timed_out,
                delivered=s.delivered,
                undelivered=undelivered,
                dropped=s.dropped,
                rejected=s.rejected,
                elapsed_s=time.monotonic() - start,
                timed_out=timed_out,
                rejections=tuple(self._rejections),
            )
            return self._closed

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def _unacknowledged(self) -> int:
        lanes = sum(lane.pending for r in self.runners for lane in r.lanes)
        return lanes + sum(_record_count(i) for i in list(self.queue))

    def stats(self) -> Stats:
        """A consistent-enough snapshot of the counters (read without stopping the worker)."""
        sinks = {}
        oldest: int | None = None
        for r in self.runners:
            pending = r.metrics.pending + r.uploads.pending
            sinks[r.label] = msgspec.structs.replace(r.stats, pending=pending)
            for lane in r.lanes:
                if lane.pending and (oldest is None or lane.oldest_ms < oldest):
                    oldest = lane.oldest_ms
        depth = len(self.queue)
        lag = 0.0
        if oldest is not None:
            lag = max(0.0, (now_ms() - oldest) / 1000.0)
        elif depth:
            lag = self.options.drain_interval_s
        return Stats(
            enqueued=self._drained + sum(_record_count(i) for i in list(self.queue)),
            delivered=sum(s.delivered for s in sinks.values()),
            dropped=self._dropped,
            rejected=sum(s.rejected for s in sinks.values()),
            failed=sum(s.failed for s in sinks.values()),
            retried=sum(s.retried for s in sinks.values()),
            queue_depth=depth,
            lag_s=lag,
            sinks=sinks,
        )


def _resolve(value: Any) -> float:
    if isinstance(value, PendingValue):
        return value.resolve()
    return float(value)


def _record_count(item: Any) -> int:
    if type(item) is MetricsItem:
        return len(item.values)
    if type(item) is _Barrier:
        return 0
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
