"""What the blocking calls return and what ``stats()`` reports.

Every count is in records: a scalar, one key of a ``log_metrics`` call, a parameter, a tag, an
artifact. A record logged once counts once however many sinks it goes to; the per-sink detail is
in ``sinks``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["CloseResult", "FlushResult", "Loss", "LossKind", "SinkStats", "Stats"]

LossKind = Literal["rejected", "failed", "dropped", "run"]
"""``rejected``: the backend refused the records for good; ``failed``: not delivered (retries ran
out, the deadline passed, the destination stayed unreachable); ``dropped``: refused by the
queue-full policy; ``run``: a sink could not open or end its run (``records`` is 0)."""


class Loss(msgspec.Struct, frozen=True):
    """Records that were not stored, where, and why (the backend's reason when it gave one)."""

    sink: str
    kind: LossKind
    records: int
    record: str
    """The first record concerned, e.g. ``scalar 'loss' step 20``."""
    reason: str


class SinkStats(msgspec.Struct):
    """Counters of one sink, in records (``retried`` counts attempts)."""

    delivered: int = 0
    rejected: int = 0
    failed: int = 0
    retried: int = 0
    pending: int = 0
    spilled: int = 0
    """Of the pending records, those held only in the journal now (``full_policy="spill"``)."""
    info: dict[str, str] = msgspec.field(default_factory=dict)
    """What the sink says about how it stores records (:meth:`Sink.info`), e.g. the MLflow
    sink's ``metrics_path`` and, when its sqlite fast path is off, ``fast_path_off``."""


class Stats(msgspec.Struct):
    """A snapshot of a logger's counters.

    ``enqueued``: records accepted by ``log_*`` calls. ``delivered``: records stored by every
    sink (with several sinks, the count of the sink that stored fewest). ``rejected``/``failed``:
    records some sink refused / could not deliver (the largest per-sink count). ``dropped``:
    refused by the queue-full policy. ``retried``: delivery attempts repeated. ``queue_depth``:
    items not yet taken by the worker. ``lag_s``: age of the oldest record not yet acknowledged
    by every sink (0 when there is none). ``sinks``: the same per sink.
    """

    enqueued: int
    delivered: int
    dropped: int
    rejected: int
    failed: int
    retried: int
    queue_depth: int
    lag_s: float
    sinks: dict[str, SinkStats]
    superseded: int = 0
    """Checkpoint snapshots dropped by the ``"supersede"`` checkpoint policy (each also
    counted as rejected by every sink, with the reason)."""
    spilled: int = 0
    """Records waiting for a sink that are held only in the journal now, not in memory (the
    largest per-sink count; ``full_policy="spill"``)."""

    @property
    def undelivered(self) -> int:
        """Records accepted or dropped that some sink has not stored (yet or for good)."""
        most = max((self.enqueued - s.delivered for s in self.sinks.values()), default=0)
        return self.dropped + most


class FlushResult(msgspec.Struct, frozen=True):
    """Truthy only when every record logged before the flush was stored by every sink.

    ``pending``: records from before the flush not yet acknowledged when it returned (an upper
    bound while the worker had not reached them). ``rejected``, ``failed``, ``dropped``: records
    of the run so far that will not arrive; any of them makes the result falsy, and ``losses``
    says which and why (the most recent 100 entries).
    """

    ok: bool
    pending: int
    elapsed_s: float
    rejected: int = 0
    failed: int = 0
    dropped: int = 0
    losses: tuple[Loss, ...] = ()
    inactive: str | None = None
    """Why this logger records nothing (a rank that does not log under the rank policy,
    see :mod:`steplog.ranks`); ``None`` for a logger that logs."""

    def __bool__(self) -> bool:
        return self.ok


class CloseResult(msgspec.Struct, frozen=True):
    """Truthy only when every record of the run was stored by every sink and every run ended.

    ``undelivered``: records some sink did not store, for any reason: ``rejected`` (refused by
    the backend), ``failed`` (retries or the deadline ran out), ``dropped`` (queue-full policy),
    or still pending when the deadline passed (``timed_out``). ``losses`` lists them with the
    backend's reason (the most recent 100 entries). ``sinks``: per-sink counters. ``sync``: the
    command that delivers the records the run's journal keeps for a sink that has not stored
    them, and ends a run that could not be ended (``None`` when nothing is kept).
    """

    ok: bool
    delivered: int
    undelivered: int
    dropped: int
    rejected: int
    elapsed_s: float
    timed_out: bool
    failed: int = 0
    losses: tuple[Loss, ...] = ()
    sinks: dict[str, SinkStats] = msgspec.field(default_factory=dict)
    sync: str | None = None
    inactive: str | None = None
    """Why this logger recorded nothing (a rank that does not log under the rank policy,
    see :mod:`steplog.ranks`); ``None`` for a logger that logs."""

    def __bool__(self) -> bool:
        return self.ok
