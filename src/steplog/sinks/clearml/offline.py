"""The ClearML offline session: when a run is recorded locally, and how its scalars are written.

An offline session is the record of its run (it is not journaled): each batch of scalar events
is appended as one JSON line to the session's ``metrics.jsonl``, the format
``Task.import_offline_session`` reads, and :func:`import_command` is what uploads it later.

Guarantee: :func:`append_line` leaves the file as it was when a write fails, so a retried batch
never leaves a torn line.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["append_line", "import_command", "offline_requested", "open_metrics_file"]

_TRUE = ("1", "true", "yes", "on")


def offline_requested(offline: bool | None) -> bool:
    """``offline``, or when it is ``None`` the ``CLEARML_OFFLINE_MODE`` environment variable."""
    if offline is not None:
        return bool(offline)
    return os.environ.get("CLEARML_OFFLINE_MODE", "").strip().lower() in _TRUE


def import_command(session: str) -> str:
    """The shell command that uploads an offline session (folder or zip) to a ClearML server."""
    return (
        f"python -c \"from clearml import Task; Task.import_offline_session({session!r})\""
    )


def open_metrics_file(folder: Path) -> int:
    """The session's ``metrics.jsonl`` in ``folder`` (created with it), open for appending."""
    folder.mkdir(parents=True, exist_ok=True)
    return os.open(folder / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


def append_line(fd: int, data: bytes) -> None:
    """One ``write`` per line (ClearML's own writer appends whole lines too); a failed
    write is rolled back so a retry leaves no torn line."""
    start = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_size > start:
                os.ftruncate(fd, start)
        raise
