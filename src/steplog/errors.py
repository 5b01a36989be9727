"""Exceptions raised by steplog, and the two a sink raises to steer retries."""

from __future__ import annotations

__all__ = [
    "JournalStoppedError",
    "LoggerClosedError",
    "PermanentError",
    "RetryableError",
    "SinkError",
    "SteplogWarning",
]


class SinkError(Exception):
    """A sink could not deliver; subclasses say whether trying again can help."""


class RetryableError(SinkError):
    """A transient failure (connection lost, timeout, HTTP 429/5xx): a retry may succeed."""


class PermanentError(SinkError):
    """The backend rejected the request (bad key, changed param): resending it cannot succeed.

    The pipeline then isolates the rejected records by splitting the batch, delivers the rest, and
    reports each rejected record with this error's message as the reason. ``whole_batch=True``
    says the refusal is not about any one record (no permission, the run is gone): the batch is
    then rejected at once, without splitting.
    """

    def __init__(self, *args: object, whole_batch: bool = False) -> None:
        super().__init__(*args)
        self.whole_batch = whole_batch


class LoggerClosedError(RuntimeError):
    """A ``log_*`` call was made on a logger that is closing or closed."""


class JournalStoppedError(RuntimeError):
    """The logger's journal stopped (a full disk, its disk budget, a failed write).

    Raised once into the training loop, by the next ``log_*`` call, after that call did its
    work (its record was queued, or counted as dropped by the queue-full policy). Later records
    are still delivered, but only from memory: they are no longer kept on disk for
    ``steplog sync``."""


class SteplogWarning(UserWarning):
    """A delivery problem reported by the worker (each kind of problem once per sink)."""
