"""``steplog sync``: deliver what loggers kept on disk under a path, printing a progress line on
a terminal and one summary line per sink and per kept upload."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from steplog.replay import SinkReplay

__all__ = ["sync_path"]


class _ProgressLine:
    """The journal replay on a terminal: one line per run and sink, rewritten in place (at most
    ten times a second) with the records written out of those the sink lacked, the rate so far
    and the time left at that rate."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._sink: tuple[Path, str] | None = None
        self._started = 0.0
        self._shown = 0.0

    def update(self, r: SinkReplay) -> None:
        now = time.monotonic()
        if self._sink != (r.run, r.consumer):
            self._sink = (r.run, r.consumer)
            self._started = now  # the run is reached: writing starts
        elif r.records < r.total and now - self._shown < 0.1:
            return
        self._shown = now
        elapsed = now - self._started
        rate = r.records / elapsed if r.records and elapsed > 0 else None
        percent = 100.0 * r.records / r.total if r.total else 100.0
        line = (f"{r.run.name} -> {r.consumer}: {r.records:,}/{r.total:,} records "
                f"({percent:.1f}%), ")
        if rate is None:
            line += "-- records/s, ETA --"  # nothing measured yet: no made-up figures
        else:
            line += f"{rate:,.0f} records/s, ETA {_duration((r.total - r.records) / rate)}"
        self._stream.write(f"\r{line}\x1b[K")
        self._stream.flush()

    def clear(self) -> None:
        """Remove the line (the summary is printed in its place)."""
        if self._sink is not None:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._sink = None


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def _destination(r: SinkReplay) -> str:
    return "" if r.destination is None else f" ({r.destination})"


def _summary(r: SinkReplay) -> str:
    """One line saying what the sync did for one sink of one run."""
    what = f"run      {r.run.name} -> {r.consumer}: "
    if r.ended and not r.total and not r.lost:
        return what + f"nothing to send; its run was ended{_destination(r)}"
    if not r.total and not r.pending and r.error is None and not r.lost:
        return what + "nothing to send"
    rate = r.records / r.seconds if r.seconds > 0 else 0.0
    what += (f"{r.records} records sent in {r.seconds:.1f} s ({rate:,.0f} records/s), "
             f"{r.rejected} refused by the backend")
    if r.refusals:
        what += f" ({'; '.join(r.refusals)})"
    if r.destination is not None:
        what += f", into {r.destination}"
    if r.moved_from is not None:
        what += f" (moved from {r.moved_from})"
    if r.pending:
        what += f"; {r.pending} frames still kept: {r.error}"
    elif r.error is not None:
        what += f"; {r.error}"
    if r.lost:
        what += (f"; LOST, the journal could not give back {len(r.lost)} piece(s), whose "
                 f"records cannot be delivered: {'; '.join(r.lost)}")
    return what


def _run_holding(path: Path) -> Path | None:
    """The run directory (or kept upload's folder) that ``path`` lies in when it names a part
    of one: its ``run.json``, its ``journal/`` or a file there, a kept upload's
    ``upload.json``; ``None`` otherwise."""
    if path.is_file() and path.name == "upload.json":
        return path.parent
    if path.is_file():
        ups = [path.parent, path.parent.parent]
    elif path.name == "journal":
        ups = [path.parent]
    else:
        return None
    for up in ups:
        if (up / "run.json").is_file() and (up / "journal").is_dir():
            return up
    return None


def _delivered_line(entry: dict[str, Any], name: str) -> str:
    """What a sync says of a run that was delivered whole and removed (its ledger line)."""
    from steplog.runlog import delivered_by, delivered_to

    by = delivered_by(entry)
    lost = entry.get("lost")
    whole = ("delivered, except what the journal had lost "
             f"({'; '.join(map(str, lost))}), by" if isinstance(lost, list) and lost
             else "delivered whole by")
    return (f"run      {entry.get('run', name)}: {whole} "
            f"{'an earlier steplog sync' if by == 'steplog sync' else by} at "
            f"{entry.get('delivered_at', '?')} ({delivered_to(entry) or 'no sinks'}) and "
            "removed; nothing left to deliver")


def sync_path(path: Path, *, timeout_s: float, to: str | None) -> int:
    """Deliver what loggers kept on disk under ``path`` (one run directory, or all of them):
    the journaled records a sink did not store, and the uploads that failed after their
    retries. Returns the exit status: 0 when nothing is left (also for a run an earlier sync
    delivered whole and removed), 1 when something is still kept, 2 for a path that never
    held a run or a ``to`` MLflow can never use."""
    from steplog.kept import KeptUpload, sync_kept, was_removed
    from steplog.replay import find_runs, replay_run
    from steplog.runlog import delivered_entry
    from steplog.sinks.mlflow.common import redact, tracking_uri_problem

    if not path.exists():
        # The run directory, or its journal/ or run.json (of a run removed since).
        entry = delivered_entry(path) or (
            delivered_entry(path.parent) if path.name in ("journal", "run.json") else None) or (
            delivered_entry(path.parent.parent) if path.parent.name == "journal" else None)
        if entry is None and path.parent.name == "uploads" and was_removed(path):
            # A kept upload's folder, printed by a close: stored since (by a sync, or by its
            # logger when the upload in flight arrived after all).
            print(f"nothing left to deliver: {path} was stored and removed")
            return 0
        if entry is None:
            print(f"steplog sync: {path} does not exist", file=sys.stderr)
            return 2
        print(_delivered_line(entry, path.name))
        return 0
    inside = _run_holding(path)
    if inside is not None:
        path = inside
    elif path.is_file():
        print(f"steplog sync: {path} is a file, not a run directory (give the directory that "
              "holds run.json and journal/, or a directory of such runs)", file=sys.stderr)
        return 2
    if to is not None:
        problem = tracking_uri_problem(to)
        if problem is not None:
            print(f"steplog sync: --to {redact(to)}: {problem}", file=sys.stderr)
            return 2
    failed = 0
    line = _ProgressLine(sys.stderr) if sys.stderr.isatty() else None

    runs = 0
    for run in find_runs(path):
        runs += 1
        try:
            results = replay_run(run, timeout_s=timeout_s, to=to,
                                 progress=None if line is None else line.update)
        except Exception as exc:
            # Another sync delivered it whole since it was listed here: its ledger line is
            # written before the journal is removed, and run.json after it.
            entry = None if (run / "journal").is_dir() else delivered_entry(run)
            if entry is not None and isinstance(exc, OSError):
                print(_delivered_line(entry, run.name))
                continue
            failed += 1
            print(f"run      {run}: {exc}")
            continue
        finally:
            if line is not None:
                line.clear()
        for r in results:
            if r.error is not None or r.pending or r.lost:
                failed += 1
            print(_summary(r))

    def report(kept: KeptUpload, error: str | None) -> None:
        what = f"{kept.artifact.kind} {kept.artifact.name!r} -> {kept.sink}"
        if error is None:
            if kept.moved_from is not None and kept.target is not None:
                what += f" (new run at {kept.target.get('tracking_uri')})"
            print(f"stored   {what}")
        else:
            print(f"kept     {what}: {error} ({kept.folder})")

    def unreadable(manifest: Path, why: str) -> None:
        print(f"skipped  {manifest}: {why}")

    stored, kept = sync_kept(path, report, unreadable, to=to)
    print(f"{stored} stored, {kept} still kept")
    if not runs and not stored and not kept:
        print(f"nothing left to deliver under {path}")
    return 0 if failed == 0 and kept == 0 else 1
