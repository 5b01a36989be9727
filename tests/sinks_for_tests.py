"""Small real sinks used to exercise the pipeline: they implement the contract in memory.

They are not stand-ins for a backend; each one is a complete sink whose behaviour (latency,
transient failures, refusals) the test controls, so pipeline guarantees can be checked exactly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from steplog import Artifact, PermanentError, RetryableError, RunStatus, Sink
from steplog.records import MetricRecord


class ListSink(Sink):
    """Keeps every delivered record and batch in memory, in delivery order."""

    kind = "list"

    def __init__(
        self,
        *,
        max_batch: int = 10_000,
        max_batch_age_s: float = 0.01,
        delay_s: float = 0.0,
        transient_failures: int = 0,
        refuse: Callable[[MetricRecord], str | None] | None = None,
        release: threading.Event | None = None,
        upload_release: threading.Event | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.max_batch_age_s = max_batch_age_s
        self.delay_s = delay_s
        self.transient_failures = transient_failures
        self.refuse = refuse
        self.release = release
        self.upload_release = upload_release
        self.records: list[MetricRecord] = []
        self.batches: list[list[MetricRecord]] = []
        self.uploads: list[Artifact] = []
        self.upload_bytes: list[bytes] = []
        self.attempts = 0
        self.opened = 0
        self.closed_with: RunStatus | None = None
        self.lock = threading.Lock()

    def open(self) -> None:
        self.opened += 1

    def write(self, records: Sequence[MetricRecord]) -> None:
        self.attempts += 1
        if self.release is not None:
            self.release.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.transient_failures > 0:
            self.transient_failures -= 1
            raise RetryableError("connection reset by test")
        if self.refuse is not None:
            for r in records:
                reason = self.refuse(r)
                if reason:
                    raise PermanentError(reason)
        with self.lock:
            self.records.extend(records)
            self.batches.append(list(records))

    def upload(self, artifact: Artifact) -> None:
        if self.upload_release is not None:
            self.upload_release.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        data = artifact.data
        if data is None and artifact.source is not None:
            with open(artifact.source, "rb") as f:
                data = f.read()
        with self.lock:
            self.uploads.append(artifact)
            self.upload_bytes.append(data or b"")

    def close(self, status: RunStatus) -> None:
        self.closed_with = status


class DownSink(ListSink):
    """A backend that is unreachable: every call fails with a connection error."""

    kind = "down"

    def write(self, records: Sequence[MetricRecord]) -> None:
        self.attempts += 1
        raise ConnectionRefusedError("backend unreachable (test)")

    def upload(self, artifact: Artifact) -> None:
        raise ConnectionRefusedError("backend unreachable (test)")


class JournaledListSink(ListSink):
    """A :class:`ListSink` that the pipeline journals, as it journals a remote backend: writing
    a batch again is harmless for what the tests check, so the journal keeps its frames and
    its lane may spill."""

    kind = "journaled"
    remote = True

    def replayable(self) -> bool:
        return True
