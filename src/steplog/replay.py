"""``steplog sync`` of journals: deliver what a run's journal holds and a sink never stored.

For each sink named in ``<run>/run.json``, the sink is rebuilt for the same run
(:meth:`Sink.reattach`; an MLflow run whose creation never succeeded is found by its token or
created; a ClearML Task always exists, its logger created it when it was built),
or, with ``to``, for a new MLflow run at that tracking URI (:mod:`steplog.moves`). The frames
after that sink's cursor are counted first (exact, without decoding their records), then decoded
and written in order, in writes of :attr:`Sink.max_batch` records across frame boundaries (one
full ``log-batch`` request each for MLflow, however small the logger's chunks were), the cursor
advancing over the frames written whole at most once a second and at the end. A refused record is
isolated by splitting the write (the rest is stored); a failure that retrying does not cure
within ``timeout_s`` (per write), or a refusal of the request as a whole (no permission, a
deleted run), stops that sink with its cursor kept, so a later sync continues there. Once a sink
has every frame, its run is ended with the status the logger closed with (``run.json``), when it
closed. Writing a frame twice stores nothing twice (only sinks that keep identical rows once are
journaled). A journal every sink acknowledged whole is removed, with ``run.json``, unless a run
could not be ended: then ``run.json`` notes it, and a later sync ends that run though no frame
is left.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import msgspec

from steplog.frames import count_records, decode_batch
from steplog.journal import NEWER_FORMAT, Journal
from steplog.moves import MOVED_FROM, follow, move_run
from steplog.paths import replace_json
from steplog.records import Batch
from steplog.retry import RetryPolicy, call_with_retry, is_retryable
from steplog.runlog import END_FAILED, destination, note_delivered, remove_delivered
from steplog.sinks.base import ACTIVE_UNTIL, RunStatus, Sink

__all__ = ["SinkReplay", "find_runs", "replay_run"]

_ACK_INTERVAL_S = 1.0
"""Longest time between two cursor writes during a replay (a crash resends at most this)."""


class SinkReplay(msgspec.Struct):
    """What a sync did for one sink of one run."""

    run: Path
    consumer: str
    kind: str
    frames: int = 0
    """Frames written whole (their records stored or refused) and acknowledged."""
    records: int = 0
    """Records written (stored or refused), in frame order."""
    rejected: int = 0
    """Records the backend refused for good (counted in :attr:`records` too)."""
    pending: int = 0
    """Frames after the sink's cursor that are still kept."""
    total: int = 0
    """Records after the sink's cursor when the sync started: :attr:`records` reaches it when
    every one was written."""
    seconds: float = 0.0
    """Time spent on this sink: reaching the run, writing, ending the run."""
    destination: str | None = None
    """Where the records went (:meth:`Sink.describe`), once the sink was rebuilt."""
    moved_from: str | None = None
    """The tracking URI the sink was going to before ``steplog sync --to`` moved it."""
    error: str | None = None
    end_error: str | None = None
    """Why the run could not be ended with the logger's status once every frame was written
    (:attr:`error` says it too); the journal is kept, and a later sync ends the run."""
    ended: bool = False
    """The run, which its logger or an earlier sync could not end, was ended by this sync."""
    lost: list[str] = msgspec.field(default_factory=list)
    """Damage met in the journal after the sink's cursor (a frame that fails its checksum,
    frames missing at its end): their records cannot be delivered, and are not counted in
    :attr:`records`."""
    refusals: list[str] = msgspec.field(default_factory=list)
    """Why the backend refused records (the first few distinct reasons)."""


def find_runs(path: str | Path) -> Iterator[Path]:
    """Run directories (holding ``run.json`` and ``journal/``) at or under ``path``."""
    root = Path(path)
    if (root / "run.json").is_file() and (root / "journal").is_dir():
        yield root
        return
    for manifest in sorted(root.rglob("run.json")):
        if (manifest.parent / "journal").is_dir():
            yield manifest.parent


def replay_run(run: Path, *, timeout_s: float = 60.0,
               progress: Callable[[SinkReplay], None] | None = None,
               to: str | None = None) -> list[SinkReplay]:
    """Deliver every unacknowledged frame of ``run`` to its sinks, or with ``to`` to new MLflow
    runs at that tracking URI (see the module docstring); ``progress`` is called with a sink's
    :class:`SinkReplay` when its writing starts and after each write."""
    from steplog.sinks import reattach

    results: list[SinkReplay] = []
    written_ms = _last_written_ms(run / "journal")  # before opening it may cut a torn tail
    # Not created when missing: another sync may have delivered and removed the run since it
    # was listed.
    with Journal.open(run / "journal", create=False) as journal:
        manifest = json.loads((run / "run.json").read_text())
        status = _status(manifest)
        counts: dict[str, tuple[int, int]] = {}
        last: bytes | None = None
        for consumer in manifest.get("sinks", {}):
            if consumer not in journal.consumers:
                journal.register(consumer)
            frames, records, payload = _count(journal, consumer)
            counts[consumer] = frames, records
            last = payload if payload is not None else last
        marked = {c for c, info in manifest.get("sinks", {}).items()
                  if info.get(END_FAILED) and status is not None}
        """Sinks whose run the logger or an earlier sync did not end: it is ended now, though
        no frame is left (a sync ``--to`` moves them too)."""
        refused = move_run(run, to, {c for c, (frames, _) in counts.items()
                                     if frames or c in marked})
        manifest = json.loads((run / "run.json").read_text())
        # When the journal's process last logged: the records' own time, else the file's.
        active_ms = _last_record_ms(last) or written_ms
        unended = set(marked)
        """Sinks whose run is still to be ended: the journal stays for a later sync."""
        for consumer, info in manifest.get("sinks", {}).items():
            out = SinkReplay(run, consumer, info.get("kind", "?"))
            results.append(out)
            out.pending, out.total = counts[consumer]
            if not out.pending and consumer not in marked:
                # Nothing readable is left; frames numbered past the cursor are gone.
                try:
                    list(journal.pending(consumer, out.lost))  # what the reader meets
                    _pass_lost_tail(journal, out, journal.cursor(consumer))
                except ValueError as exc:  # a newer format: kept
                    out.error = str(exc)
                continue
            if consumer in refused:
                out.error = refused[consumer]
                continue
            if info.get(MOVED_FROM) is not None:
                out.moved_from = (info[MOVED_FROM] or {}).get("tracking_uri")
            started = time.monotonic()
            try:
                if not info.get("target"):
                    raise ValueError(f"the {out.kind} sink cannot be reached again from here")
                sink = reattach(out.kind, {**follow(info, to), ACTIVE_UNTIL: active_ms})
            except Exception as exc:
                out.error = str(exc) or repr(exc)
                continue
            if status is not None and consumer not in marked:
                # Until its run is ended: a sync stopped after the last frame (Ctrl-C, a kill)
                # leaves every cursor at the end, and the next one must still end the run.
                unended.add(consumer)
                _note_sink(run, consumer, {END_FAILED: "a sync stopped before it ended the run"})
            try:
                _replay_sink(journal, sink, out, timeout_s, progress, status,
                             functools.partial(_note_run, run, consumer))
            finally:
                out.seconds = time.monotonic() - started
                with contextlib.suppress(Exception):
                    sink.release()
            if out.end_error is not None:
                _note_sink(run, consumer, {END_FAILED: out.end_error})
            elif status is not None and out.error is None:  # ended with the logger's status
                out.ended = True
                unended.discard(consumer)
                _note_sink(run, consumer, {END_FAILED: None})
        # Kept while a run could not be ended: a later sync ends it with the status.
        if not unended and all(journal.cursor(c) >= journal.last_seq
                               for c in journal.consumers):
            note_delivered(run, {r.consumer: r.destination or destination(info)
                                 for r, info in zip(results, manifest.get("sinks", {}).values(),
                                                    strict=True)},
                           lost=[f"{r.consumer}: {lost}" for r in results for lost in r.lost])
            remove_delivered(run)  # while held: no other sync opens it meanwhile
    return results


def _last_record_ms(payload: bytes | None) -> int | None:
    """The newest record time (ms since the epoch) in a journal frame, ``None`` when there is
    none or it cannot be decoded."""
    if payload is None:
        return None
    try:
        parts = decode_batch(payload).parts
    except msgspec.DecodeError:
        return None
    return max((getattr(part, "timestamp", 0) for part in parts), default=None) or None


def _last_written_ms(directory: Path) -> int | None:
    """When a frame was last appended to the journal in ``directory`` (its newest segment's
    modification time, read before the journal is opened; a sync only writes cursors),
    ``None`` when none can be read."""
    times = []
    for segment in directory.glob("*.seg"):
        with contextlib.suppress(OSError):
            times.append(segment.stat().st_mtime_ns // 1_000_000)
    return max(times, default=None)


def _status(manifest: dict[str, Any]) -> RunStatus | None:
    """The status the logger closed with; ``None`` when it never closed (a killed process)."""
    status = manifest.get("status")
    return cast(RunStatus, status) if status in ("FINISHED", "FAILED", "KILLED") else None


def _count(journal: Journal, consumer: str) -> tuple[int, int, bytes | None]:
    """(frames, records, the last frame) after ``consumer``'s cursor; a frame that cannot be
    decoded counts no record."""
    frames = records = 0
    payload = None
    for _, payload in journal.pending(consumer, []):  # damage is reported when writing
        frames += 1
        with contextlib.suppress(msgspec.DecodeError):
            records += count_records(payload)
    return frames, records, payload


def _note_run(run: Path, consumer: str, target: dict[str, Any]) -> None:
    """``run.json`` names the run the sync reached (its id, once it exists); when it cannot be
    written the run is still found by its token."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        manifest = json.loads((run / "run.json").read_text())
        info = manifest["sinks"][consumer]
        info["target"] = {**info["target"], **target}
        replace_json(run / "run.json", manifest)


def _note_sink(run: Path, consumer: str, fields: dict[str, Any]) -> None:
    """Set ``fields`` of ``consumer``'s entry in ``run.json`` (``None`` removes a field);
    best effort, as :func:`_note_run`."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        manifest = json.loads((run / "run.json").read_text())
        info = manifest["sinks"][consumer]
        for key, value in fields.items():
            if value is None:
                info.pop(key, None)
            else:
                info[key] = value
        replace_json(run / "run.json", manifest)


def _replay_sink(journal: Journal, sink: Sink, out: SinkReplay, timeout_s: float,
                 progress: Callable[[SinkReplay], None] | None, status: RunStatus | None,
                 note_run: Callable[[dict[str, Any]], None]) -> None:
    """Write ``out.consumer``'s pending frames into ``sink`` (see the module docstring); a
    failure is kept in ``out.error`` with the cursor after the last frame written whole."""
    policy = RetryPolicy(initial_s=0.2, max_s=5.0, jitter_s=0.2)
    consumer = out.consumer
    acked = journal.cursor(consumer)
    done = acked  # the last frame written whole
    acked_at = time.monotonic()
    try:
        before = sink.target()
        call_with_retry(sink.open, policy, _within(timeout_s), _quiet)
        after = sink.target()
        out.destination = sink.describe()
        if after is not None and before is not None and after.get("run_id") != before.get(
                "run_id"):
            note_run(after)
        if progress is not None:
            progress(out)
        size = max(1, sink.max_batch)
        buf = Batch()
        pos = 0  # records of buf already written
        taken = 0  # records decoded so far
        ends: collections.deque[tuple[int, int]] = collections.deque()
        """(records decoded up to a frame's end, its seq), for frames not written whole."""
        frames = journal.pending(consumer, out.lost)
        exhausted = False
        undecodable: str | None = None
        while True:
            # Fill one write of `size` records (or what is left), across frame boundaries.
            while len(buf) - pos < size and not exhausted:
                item = next(frames, None)
                if item is None:
                    exhausted = True
                    break
                seq, payload = item
                try:
                    batch = decode_batch(payload)
                except msgspec.DecodeError as exc:
                    # Whole (its checksum holds) but not a batch this steplog reads (a newer
                    # format?): it stays, with everything after it, for a steplog that can.
                    undecodable = (f"frame {seq} cannot be decoded by this steplog ({exc}); it "
                                   "and the frames after it stay kept")
                    exhausted = True
                    break
                if pos:
                    buf, pos = buf[pos:], 0
                buf.extend(batch)
                taken += len(batch)
                ends.append((taken, seq))
            chunk = buf[pos:pos + size]
            if chunk:
                out.rejected += _write(sink, chunk, policy, timeout_s, out.refusals)
                pos += len(chunk)
                out.records += len(chunk)
            while ends and ends[0][0] <= out.records:
                done = ends.popleft()[1]
                out.frames += 1
                out.pending -= 1
            now = time.monotonic()
            if done > acked and (now - acked_at >= _ACK_INTERVAL_S or exhausted):
                acked = journal.ack(consumer, done)
                acked_at = now
            if progress is not None and chunk:
                progress(out)
            if exhausted and not ends:
                break
        if undecodable is not None:
            raise ValueError(undecodable)
        done = max(done, _pass_lost_tail(journal, out, done))
        if status is not None:
            # The logger closed with this status; its run (or one this sync created) is
            # ended so.
            try:
                call_with_retry(functools.partial(sink.close, status), policy,
                                _within(timeout_s), _quiet)
            except Exception as exc:
                out.end_error = f"its run was not ended ({exc or repr(exc)})"
                raise ValueError(f"{out.end_error}; a later steplog sync ends it "
                                 f"{status}") from exc
    except Exception as exc:
        out.error = str(exc) or repr(exc)
    finally:
        if done > acked:
            with contextlib.suppress(Exception):
                journal.ack(consumer, done)


def _pass_lost_tail(journal: Journal, out: SinkReplay, done: int) -> int:
    """After every readable frame up to ``done`` was written: frames the journal numbered
    past ``done`` are gone (damage, or a crash before they reached the disk). They are noted
    in ``out.lost`` and passed over (the cursor moves to the last seq, which is returned): no
    later sync could deliver them either."""
    last = journal.last_seq
    if done >= last:
        return done
    newer = [p for p in out.lost if NEWER_FORMAT in p]
    if newer:
        # Not damage: a steplog that reads that format delivers them. Kept, with the rest.
        out.lost = [p for p in out.lost if NEWER_FORMAT not in p]
        raise ValueError(f"{newer[0]}; it and the frames after it stay kept for a steplog "
                         "that can read them")
    out.lost.append(f"frames {done + 1}-{last} are no longer in the journal (damaged, or lost "
                    "in a crash before they reached the disk)")
    with contextlib.suppress(Exception):  # kept: the next sync says it again
        journal.ack(out.consumer, last)
    return last


def _within(seconds: float) -> Callable[[], float]:
    """A retry deadline ``seconds`` from now."""
    return functools.partial(_at, time.monotonic() + seconds)


def _at(deadline: float) -> float:
    return deadline


def _quiet(exc: BaseException) -> None:
    """Retries during a sync are silent; the outcome is reported per sink."""


_MOST_REASONS = 3
"""Distinct refusal reasons a sync keeps per sink."""


def _write(sink: Sink, batch: Batch, policy: RetryPolicy, timeout_s: float,
           reasons: list[str]) -> int:
    """Store ``batch``, isolating refused records; how many were refused (the first few
    distinct reasons are added to ``reasons``). Raises when a retryable failure outlasts
    ``timeout_s`` (nothing after it is written)."""
    try:
        call_with_retry(lambda: sink.write(batch), policy, _within(timeout_s), _quiet)
    except Exception as exc:
        if is_retryable(exc) or getattr(exc, "whole_batch", False):
            raise  # not about these records (down, no permission, no run): keep them
        if len(batch) > 1:
            mid = len(batch) // 2
            return (_write(sink, batch[:mid], policy, timeout_s, reasons)
                    + _write(sink, batch[mid:], policy, timeout_s, reasons))
        reason = str(exc) or repr(exc)
        if reason not in reasons and len(reasons) < _MOST_REASONS:
            reasons.append(reason)
        return len(batch)
    return 0
