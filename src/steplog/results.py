"""What the blocking calls return and what ``stats()`` reports."""

from __future__ import annotations

import msgspec

__all__ = ["CloseResult", "FlushResult", "Rejection", "SinkStats", "Stats"]


class Rejection(msgspec.Struct, frozen=True):
    """One record a sink refused for good, with the backend's reason."""

    sink: str
    record: str
    reason: str


class FlushResult(msgspec.Struct, frozen=True):
    """Truthy when every record logged before the flush was acknowledged by every sink.

    ``pending`` counts records from before the flush that were not acknowledged when it returned
    (an upper bound while the worker had not yet reached them). Rejected records count as
    acknowledged: they are reported in ``rejected`` and in :meth:`Logger.stats`.
    """

    ok: bool
    pending: int
    elapsed_s: float
    rejected: int = 0

    def __bool__(self) -> bool:
        return self.ok


class CloseResult(msgspec.Struct, frozen=True):
    """Truthy when the logger closed with nothing left undelivered within its deadline.

    ``undelivered`` counts records that no sink acknowledged (the deadline passed, the retry
    window ran out, or the queue-full policy dropped them); ``rejected`` lists the records a
    backend refused, with its reason (the most recent 100).
    """

    ok: bool
    delivered: int
    undelivered: int
    dropped: int
    rejected: int
    elapsed_s: float
    timed_out: bool
    rejections: tuple[Rejection, ...] = ()

    def __bool__(self) -> bool:
        return self.ok


class SinkStats(msgspec.Struct):
    """Counters of one sink (records, except ``retried`` which counts attempts)."""

    delivered: int = 0
    rejected: int = 0
    failed: int = 0
    retried: int = 0
    pending: int = 0


class Stats(msgspec.Struct):
    """A snapshot of a logger's counters.

    ``enqueued``: records accepted by ``log_*`` calls; ``delivered``/``rejected``/``failed``:
    summed over sinks; ``dropped``: refused by the queue-full policy; ``retried``: delivery
    attempts repeated; ``queue_depth``: items not yet taken by the worker; ``lag_s``: age of the
    oldest record not yet acknowledged by every sink (0 when there is none).
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
