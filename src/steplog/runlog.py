"""The journal of one logger's metric records, and how far each sink got through it.

A logger with a remote sink (MLflow, an online ClearML Task) writes every drained chunk of
metric records (scalars, params, tags) to a :class:`~steplog.journal.Journal` in its run
directory, ``<runs_dir>/<run>/journal/``, before the chunk reaches the sinks' lanes: one frame
per chunk, encoded once (:mod:`steplog.frames`). ``<runs_dir>/<run>/run.json`` names each sink
and its destination (:meth:`Sink.target`, without credentials). Each sink's cursor advances
over the frames whose records that sink stored or refused for good; a record that failed after
its retries stops that sink's cursor before its frame, so ``steplog sync`` sends it again
(stores are idempotent: MLflow keeps identical rows once, ClearML one event per task,
iteration, title and series). Cursors are written at most once a second, at every flush and at
close; segments (64 MiB) every sink acknowledged whole are then removed, so a long run's
journal stays about one segment when its sinks keep up.

When every sink acknowledged every frame at close, the journal and ``run.json`` are removed
(and the run directory, when nothing else is kept there) and the run's line is added to the
ledger beside it (:data:`DELIVERED_LEDGER`); otherwise they stay for ``steplog sync``
(:mod:`steplog.replay`).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steplog.errors import SteplogWarning
from steplog.frames import encode_batch
from steplog.journal import Durability, Journal
from steplog.paths import replace_json
from steplog.records import Batch, Part
from steplog.sinks.base import Sink

__all__ = ["DELIVERED_LEDGER", "END_FAILED", "RunJournal", "consumer_name", "delivered_by",
           "delivered_entry", "delivered_to", "destination", "note_delivered", "remove_delivered"]

_ACK_INTERVAL_S = 1.0

END_FAILED = "end_failed"
"""The key, in a sink's entry of ``run.json``, of why its run could not be ended (by the
logger at close, or by a sync): ``steplog sync`` ends that run, even with no frame left."""


def consumer_name(label: str) -> str:
    """The journal consumer of a sink label (``mlflow#1`` -> ``mlflow-1``)."""
    return label.replace("#", "-")


DELIVERED_LEDGER = "delivered.jsonl"
"""The file beside run directories that were delivered whole and removed, by their logger at
close or by ``steplog sync``: one JSON line per run (its name, when, by whom, and where each
sink's records went), so that a later sync of the same path can say nothing is left instead of
that the path does not exist."""


def note_delivered(run_dir: Path, destinations: dict[str, str], by: str = "sync",
                   lost: Sequence[str] = ()) -> None:
    """Append ``run_dir``'s line to the ledger in its parent; ``by``: ``"sync"`` or
    ``"logger"``; ``lost``: damage in the journal whose records could not be delivered (best
    effort: a ledger that cannot be written only makes a later sync of the removed path
    report it as missing)."""
    entry: dict[str, Any] = {"run": run_dir.name, "delivered_at": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by": by, "sinks": destinations}
    if lost:
        entry["lost"] = list(lost)
    line = json.dumps(entry) + "\n"
    with contextlib.suppress(OSError):
        fd = os.open(run_dir.parent / DELIVERED_LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                     0o600)
        try:
            os.write(fd, line.encode())  # one short O_APPEND write: lines never interleave
        finally:
            os.close(fd)


def delivered_entry(run_dir: Path) -> dict[str, Any] | None:
    """The ledger's last line for ``run_dir`` (see :data:`DELIVERED_LEDGER`), or ``None``."""
    try:
        lines = (run_dir.parent / DELIVERED_LEDGER).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(entry, dict) and entry.get("run") == run_dir.name:
            return entry
    return None


def delivered_by(entry: dict[str, Any]) -> str:
    """Who delivered a ledger line's run whole: ``its logger`` or ``steplog sync``."""
    return "its logger" if entry.get("by") == "logger" else "steplog sync"


def destination(info: dict[str, Any]) -> str:
    """Where a sink of ``run.json`` writes (its kind and tracking URI, API host or output
    directory), for the ledger."""
    target = info.get("target") or {}
    where = target.get("tracking_uri") or target.get("api_host") or target.get("output_dir")
    return f"{info.get('kind', '?')} {where or '?'}"


def delivered_to(entry: dict[str, Any]) -> str:
    """Where a ledger line says each sink's records went: ``consumer -> destination, ...``."""
    sinks = entry.get("sinks")
    return ", ".join(f"{c} -> {d}" for c, d in sinks.items()) if isinstance(sinks, dict) else ""


def remove_delivered(run_dir: Path) -> None:
    """Remove a run directory's journal and ``run.json`` (the directory too when nothing else,
    such as kept uploads, is left). The journal is first renamed aside, so a crash or a sync
    never meets a half-removed one."""
    doomed = run_dir / ".journal.delivered"
    shutil.rmtree(doomed, ignore_errors=True)  # left by a removal that was cut short
    try:
        os.replace(run_dir / "journal", doomed)
    except OSError:
        doomed = run_dir / "journal"
    shutil.rmtree(doomed, ignore_errors=True)
    with contextlib.suppress(OSError):
        (run_dir / "run.json").unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()


class _Progress:
    __slots__ = ("acked_at", "acked_seq", "processed", "seq", "stuck")

    def __init__(self) -> None:
        self.processed = 0
        self.seq = 0
        self.stuck = False
        self.acked_at = 0.0
        self.acked_seq = 0


class RunJournal:
    """Journal frames for one pipeline and the cursors of its sinks (thread-safe)."""

    def __init__(self, run_dir: Path, sinks: Sequence[tuple[str, Sink]], *,
                 durability: Durability = "flush", max_bytes: int | None = None) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(run_dir, 0o700)
        self._manifest_lock = threading.Lock()
        self._status: str | None = None
        self._continued = False
        self._end_failed: dict[str, str] = {}
        self._finished = False
        self.journal = Journal.open(run_dir / "journal", durability=durability,
                                    max_bytes=max_bytes)
        self._sinks = dict(sinks)
        self._progress = {label: _Progress() for label in self._sinks}
        self._moving = len(self._progress)
        """Sinks whose cursor can still move (not stuck)."""
        self._seqs: list[int] = []
        self._ends: list[int] = []
        self._appended = 0
        self._lock = threading.Lock()
        self.error: str | None = None
        """The first failure to record a sink's progress (its records still reach it)."""
        try:
            for label in self._sinks:
                self.journal.register(consumer_name(label))
            self.write_manifest()
        except BaseException:
            with contextlib.suppress(OSError):  # its files are closed even when this fails
                self.journal.close()  # not left locked for the rest of this process's life
            raise

    def write_manifest(self, status: str | None = None) -> None:
        """``run.json``: each sink's kind and destination, and the status the logger closed
        with once it closes (written atomically)."""
        with self._manifest_lock:
            if status is not None:
                self._status = status
            data = {
                "format": "steplog.run/1",
                "status": self._status,
                "continued": self._continued,
                "sinks": {
                    consumer_name(label): {"label": label, "kind": sink.kind,
                                           "target": sink.target(),
                                           **({END_FAILED: self._end_failed[label]}
                                              if label in self._end_failed else {})}
                    for label, sink in self._sinks.items()
                },
            }
            replace_json(self.run_dir / "run.json", data)

    def _destinations(self) -> dict[str, str]:
        """Where each sink writes, for the ledger of delivered runs."""
        out = {}
        for label, sink in self._sinks.items():
            try:
                target = sink.target()
            except Exception:  # the ledger is best effort; the run is delivered
                target = None
            out[consumer_name(label)] = destination({"kind": sink.kind, "target": target})
        return out

    def closing(self, status: str) -> None:
        """The logger closes with ``status``: ``run.json`` says so, and marks every sink's run
        as not ended yet, so that a ``steplog sync`` after the process was killed meanwhile
        still ends them (though every frame arrived); :meth:`finish` takes back the marks of
        the runs that were ended."""
        with self._manifest_lock:
            self._status = status
            for label in self._sinks:
                self._end_failed.setdefault(label, "the logger stopped before it ended the run")
        self.write_manifest()

    def mark_unended(self, unended: dict[str, str | None]) -> None:
        """A close's deadline passed: ``unended`` gives each sink's run, by label, why it was
        not ended (``None``: it was ended, its mark goes). ``run.json`` says so now, so that a
        ``steplog sync`` after the process is gone ends those runs and no other;
        :meth:`finish` takes the marks back for the runs ended after all."""
        with self._manifest_lock:
            if self._finished or self._status is None:
                return
            for label, why in unended.items():
                if label not in self._sinks:
                    continue
                if why is None:
                    self._end_failed.pop(label, None)
                else:
                    self._end_failed[label] = why
        self.write_manifest()

    def hand_over(self) -> None:
        """The run goes on in a later logger (:meth:`steplog.Logger.continued`), which ends
        it: ``run.json`` no longer names a status, so a sync of what this journal keeps
        delivers it and leaves the run's status alone."""
        with self._manifest_lock:
            self._status = None
            self._continued = True
        self.write_manifest()

    # -- the drain thread --------------------------------------------------------------------

    def journals(self, label: str) -> bool:
        """True when the journal keeps frames for the sink ``label`` until it acknowledges
        them (a replayable sink)."""
        return label in self._sinks

    def append(self, parts: list[Part], count: int) -> int:
        """Journal one chunk of ``count`` metric records (before the lanes get it); its seq."""
        payload = encode_batch(Batch(parts))  # capture_param keeps every int within 64 bits
        seq = self.journal.append(payload)
        if not self._sinks:  # journaled for no sink (journal=True): no frame is ever needed
            self.journal.compact(through=seq)
        with self._lock:
            self._appended += count
            if self._moving:  # a stuck sink's cursor never moves again: nothing to look up
                self._seqs.append(seq)
                self._ends.append(self._appended)
        return seq

    def sync(self) -> None:
        """Everything journaled so far is on disk (a flush barrier passed the drain thread)."""
        self.journal.sync()

    # -- the lanes ---------------------------------------------------------------------------

    def progress(self, label: str, records: int, failed: bool) -> None:
        """``label``'s metrics lane finished ``records`` more records in order; ``failed``: some
        of them failed after their retries (that sink's cursor stops before them)."""
        ack = False
        with self._lock:
            p = self._progress.get(label)
            if p is None or p.stuck:  # a sink that is not replayed, or stopped
                return
            if failed:
                p.stuck = True
                self._moving -= 1
                self._forget_passed()
                return
            p.processed += records
            i = bisect.bisect_right(self._ends, p.processed)
            if i:
                p.seq = self._seqs[i - 1]
            now = time.monotonic()
            if p.seq and now - p.acked_at >= _ACK_INTERVAL_S:
                p.acked_at = now
                ack = True
                self._forget_passed()
        if ack:
            self._ack(label)

    def _forget_passed(self) -> None:
        """Drop the frame ends every sink went past (one entry per frame would otherwise grow
        for the whole run); the last one at or before the slowest sink stays for its lookup."""
        moving = [p.processed for p in self._progress.values() if not p.stuck]
        floor = min(moving) if moving else self._appended
        k = bisect.bisect_right(self._ends, floor) - 1
        if k > 0:
            del self._seqs[:k]
            del self._ends[:k]

    def _ack(self, label: str) -> None:
        progress = self._progress[label]
        seq = progress.seq
        try:
            self.journal.ack(consumer_name(label), seq)
            progress.acked_seq = max(progress.acked_seq, seq)
            self.journal.compact()  # segments every sink acknowledged whole go
        except Exception as exc:  # a full disk, say: the records still reach the sink
            if self.error is None:
                self.error = f"could not record {label}'s progress in {self.run_dir}: {exc!r}"
                with contextlib.suppress(Exception):  # a worker thread must not end here
                    warnings.warn(f"steplog: {self.error}; records are still delivered, and "
                                  "the journal keeps them until a later acknowledgement "
                                  "succeeds", SteplogWarning, stacklevel=2)

    def checkpoint(self) -> None:
        """Write every sink's cursor now (after a flush)."""
        for label in self._sinks:
            self._ack(label)

    def settle(self) -> None:
        """Write the cursors that the once-a-second limit held back, each at most once a
        second still (the drain thread calls this when no record came for a while, and again
        every few seconds while none comes), so that a crash of an idle logger resends
        nothing it stored."""
        now = time.monotonic()
        with self._lock:
            behind = [label for label, p in self._progress.items()
                      if not p.stuck and p.seq > p.acked_seq
                      and now - p.acked_at >= _ACK_INTERVAL_S]
            for label in behind:
                self._progress[label].acked_at = now
        if behind and not self.journal.closed:
            for label in behind:
                self._ack(label)

    # -- the end -----------------------------------------------------------------------------

    def pending(self) -> bool:
        """True when some sink has not acknowledged every journaled frame."""
        last = self.journal.last_seq
        return any(p.seq < last for p in self._progress.values())

    def finish(self, unended: dict[str, str] | None = None) -> bool:
        """Write the cursors and close; remove everything when every frame was acknowledged by
        every sink and every sink's run was ended (``unended``: label -> why a run could not
        be ended; ``run.json`` notes it, for ``steplog sync``). True when the journal is kept
        (something is left for ``steplog sync``)."""
        try:
            self.checkpoint()
            failed = {label: why for label, why in (unended or {}).items()
                      if label in self._sinks}
            with self._manifest_lock:
                self._finished = True
                changed = failed != self._end_failed and self._status is not None
                if changed:  # marks of a timed-out close go once those runs were ended
                    self._end_failed = failed
            if changed:
                self.write_manifest()
            kept = self.pending() or bool(self._end_failed)
        finally:
            self.journal.close()
        if not kept:
            # The ledger's line lets the `steplog sync` printed at the start say so (exit 0).
            note_delivered(self.run_dir, self._destinations(), by="logger")
            remove_delivered(self.run_dir)
        return kept
