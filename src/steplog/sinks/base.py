"""The sink contract: the only code that speaks to a backend.

A sink is small: it opens a run, writes a batch of metric records, uploads one artifact, and
closes the run. It raises :class:`~steplog.errors.RetryableError` or
:class:`~steplog.errors.PermanentError`; other exceptions are classified by what they mean
(:mod:`steplog.retry`: connection errors and timeouts are retried, a permission error is not).
Batching, retries, order, lanes and counters belong to the pipeline, which calls a sink from its
own worker threads: ``write`` from the metrics lane, ``upload`` from the upload lane (the two may
overlap), never two ``write`` calls at once, and ``close`` once, after every other call returned.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

from steplog.errors import PermanentError
from steplog.records import Artifact, MetricRecord

__all__ = ["ACTIVE_UNTIL", "RunStatus", "Sink"]

ACTIVE_UNTIL = "active_until_ms"
"""The key ``steplog sync`` adds to the target it passes to :meth:`Sink.reattach`: when the
journal's process last wrote a frame (ms since the epoch), or ``None``."""

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
"""How the run ended: normally, by an exception, or by a signal."""


class Sink(abc.ABC):
    """One backend: a file tree, an MLflow run, a ClearML task."""

    kind: ClassVar[str] = "sink"
    """Short backend name used in stats, warnings and ``Logger.create``."""

    remote: bool = False
    """True for a backend reached over a network (its logger journals records by default); a
    sink may decide per instance (a ClearML sink recording an offline session is local)."""

    moves_sources: ClassVar[bool] = False
    """True when :meth:`upload` takes an artifact given with ``move`` away from its source
    (renames it into place). Otherwise the pipeline gives the sink a copy to make and removes
    the source itself once every sink stored it."""

    max_batch: int = 10_000
    """Most records the pipeline passes to one :meth:`write`."""

    max_batch_age_s: float = 0.2
    """Longest a record waits, counted from its call, for its batch to fill (seconds). The
    drain thread's interval (``Options.drain_interval_s``) counts toward it: a lane waits only
    for the rest, and an age within the interval sends each drained chunk as it comes."""

    max_batch_bytes: int | None = None
    """Most estimated bytes per :meth:`write` (``None``: no byte bound). The estimate is a
    record's key and value sizes plus a fixed overhead; a single larger record still goes alone.
    Leave it ``None`` when the sink splits requests exactly itself (estimating costs ~60 ns per
    record on the worker)."""

    _deadline_passed: Callable[[], bool] | None = None

    def bind_deadline(self, deadline_passed: Callable[[], bool]) -> None:
        """Called by the pipeline that takes the sink, before :meth:`open`: ``deadline_passed()``
        tells a call that waits inside the sink (polling for a run that another process
        creates) that the logger's close deadline has passed."""
        self._deadline_passed = deadline_passed

    def deadline_passed(self) -> bool:
        """Whether the close deadline of the logger using the sink has passed (never, for a
        sink no pipeline took): a wait inside a sink call stops then, so that the call returns
        and the logger's close keeps its deadline."""
        passed = self._deadline_passed
        return passed is not None and passed()

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Fail at once when the destination can never work (an unwritable directory, a URI
        with an unknown scheme); called once on the caller's thread when the logger is built,
        so keep it cheap. Raise ``ValueError`` or the ``OSError`` met."""

    def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare the backend (create the run). Called once, on the worker, before any write."""

    def check_name(self, name: str) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` when the backend can never accept ``name`` as a metric/param key.

        Called on the caller's thread the first time a name is used, so keep it cheap.
        """

    def check_upload_name(self, name: str) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` when the backend can never store an upload as ``name`` (a
        relative path, already normalised); called on the caller's thread for every upload."""

    @abc.abstractmethod
    def write(self, records: Sequence[MetricRecord]) -> None:
        """Store every record of the batch, in order, or raise without having stored a partial
        batch that a retry would duplicate (stores must be idempotent for identical records)."""

    def upload(self, artifact: Artifact) -> None:
        """Store one artifact with the run."""
        raise PermanentError(f"the {self.kind} sink does not store artifacts")

    def close(self, status: RunStatus) -> None:  # noqa: B027 - optional hook
        """End the run with ``status``; called once, after the last write and upload."""

    def describe(self) -> str:
        """A short human-readable location (a directory, a run URL) for messages."""
        return self.kind

    def replayable(self) -> bool:
        """True when writing a batch again stores nothing twice and :meth:`reattach` works, so
        that ``steplog sync`` may replay the journal into this sink."""
        return False

    def target(self) -> dict[str, Any] | None:
        """JSON data from which :meth:`reattach` rebuilds a sink writing to the same run (no
        credentials), or ``None`` when that is not possible. Used to keep failed uploads."""
        return None

    @classmethod
    def reattach(cls, target: dict[str, Any]) -> Sink:
        """A sink that uploads into the run :meth:`target` described (no new run)."""
        raise ValueError(f"the {cls.kind} sink cannot upload into an earlier run")

    def info(self) -> dict[str, str]:
        """Facts about how the sink stores records now, shown in ``stats()`` (e.g. which path
        its metrics take and why); read from the caller's thread, so it must be cheap."""
        return {}

    def release(self) -> None:  # noqa: B027 - optional hook
        """Close connections of a reattached sink, leaving its run as it is."""
