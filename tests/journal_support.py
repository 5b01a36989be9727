"""Reading back what a logger's journals hold, for tests that kill a logging process."""

from __future__ import annotations

from pathlib import Path

from steplog.frames import decode_batch
from steplog.journal import Journal
from steplog.records import Scalar


def journaled(runs: Path) -> list[Scalar]:
    """Every scalar the journals under ``runs`` hold, in journal order."""
    out: list[Scalar] = []
    for journal_dir in sorted(runs.rglob("journal")):
        with Journal.open(journal_dir) as journal:
            for _, payload in journal.read():
                out.extend(r for r in decode_batch(payload) if isinstance(r, Scalar))
    return out
