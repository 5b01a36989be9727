"""Typed records: what the worker hands to sinks.

The hot path never builds these for scalars: it enqueues a plain ``(name, value, step)`` tuple and
the worker turns a whole drained chunk into :class:`Scalar` records at once, stamping them with one
timestamp (see :mod:`steplog.pipeline` for the bound on that stamp). Rare records (parameters, tags,
artifacts) are built at the call and stamped there.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

__all__ = [
    "Artifact",
    "MetricRecord",
    "Param",
    "Record",
    "Scalar",
    "Tag",
    "now_ms",
]


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the epoch (MLflow's timestamp unit)."""
    return time.time_ns() // 1_000_000


class Scalar(msgspec.Struct, frozen=True, gc=False):
    """One metric point: ``value`` of ``name`` at ``step``, at ``timestamp`` (ms since epoch)."""

    name: str
    value: float
    step: int
    timestamp: int


class Param(msgspec.Struct, frozen=True):
    """One run parameter: a value fixed for the whole run (JSON-encodable)."""

    name: str
    value: Any
    timestamp: int


class Tag(msgspec.Struct, frozen=True):
    """One run tag: a string label that may be overwritten."""

    name: str
    value: str
    timestamp: int


class Artifact(msgspec.Struct, frozen=True):
    """A file (or in-memory bytes) to store with the run under the relative path ``name``.

    Exactly one of ``source`` (a file or directory on disk) and ``data`` (bytes captured at the
    call) is set. ``move`` means the sink may move ``source`` instead of copying it.
    """

    name: str
    timestamp: int
    source: str | None = None
    data: bytes | None = None
    kind: str = "artifact"
    step: int | None = None
    metadata: dict[str, Any] | None = None
    aliases: list[str] | None = None
    move: bool = False
    cleanup: bool = False
    """The pipeline deletes ``source`` once every sink has it (a staged snapshot of ours)."""

    @property
    def size(self) -> int:
        """Bytes of the payload (0 when unknown, e.g. a directory)."""
        if self.data is not None:
            return len(self.data)
        return 0


MetricRecord = Scalar | Param | Tag
"""What travels on the metrics lane, in call order."""

Record = Scalar | Param | Tag | Artifact
