"""The drain thread: it takes the queue, turns each chunk into records, and hands them to the
lanes (journaling them first when the logger journals).

Each chunk's scalars are stamped with one wall-clock timestamp, taken when the chunk is taken
(see :mod:`steplog.pipeline` for the bound), and a missing step becomes the name's automatic step
(its number of earlier points). When every item of a chunk is a ``log_scalar`` tuple with an
explicit step and a float value, the chunk becomes one block in a few C-level passes, with no
Python code per scalar.

An idle drain thread sleeps until a call queues a record (see :mod:`steplog.pipeline`).

Guarantees: records reach every lane in call order; a value that cannot be read back loses only
its own call's records (counted, with the reason); a chunk is written to the journal before any
lane sees it, and a journal that fails stops journaling (the training loop is told once) but
never stops delivery; a flush barrier follows every record queued before it.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import operator
import threading
from typing import TYPE_CHECKING, Any

from steplog.capture import PendingValue
from steplog.errors import JournalStoppedError
from steplog.frames import with_encoding
from steplog.journal import Journal, JournalError, JournalFullError
from steplog.pipeline.items import Barrier, MetricsItem, Upload, UploadRequest, record_count
from steplog.records import Row, Scalars, now_ms

if TYPE_CHECKING:
    from steplog.pipeline.options import Options, Owner
    from steplog.pipeline.runner import SinkRunner
    from steplog.runlog import RunJournal

__all__ = ["Drain", "count_names"]

_REST_S = 5.0
"""The longest sleep of an idle drain thread before it looks again (a bounded wait)."""

_NAME = operator.itemgetter(0)
_VALUE = operator.itemgetter(1)
_STEP = operator.itemgetter(2)
_MIN_REPEATS = 4
"""The fewest repetitions of a period for which :func:`count_names` multiplies."""
_PERIODS_TRIED = 3
"""How many repeats of the first name :func:`count_names` tries as the period."""


class Drain:
    """The drain thread's half of :class:`~steplog.pipeline.Pipeline` (its base class); the
    pipeline sets up the state below and starts the thread on :meth:`_drain_loop`."""

    queue: collections.deque[Any]
    options: Options
    owner: Owner
    runners: list[SinkRunner]
    run_journal: RunJournal | None
    journal_stopped: bool
    journal_error: str | None
    _wake: threading.Event
    _space: threading.Condition
    _take_lock: threading.Lock
    _drain_lock: threading.Lock
    _holding: list[Any]
    _uploads_handed: list[UploadRequest]
    _handed: int
    _drained: int
    _lost_early: int
    _steps: collections.Counter[str]
    _staging: str
    _sink_moves: bool
    _spilling: list[bool]

    # -- drain thread ----------------------------------------------------------------------
    def take_all(self) -> list[Any]:
        """Every item queued so far, in order, removed from the queue."""
        q = self.queue
        with self._take_lock:
            # Pops one at a time (items appended meanwhile stay queued), in one C-level loop.
            items = list(itertools.starmap(q.popleft, itertools.repeat((), len(q))))
            with self._drain_lock:  # counted as held from the moment they leave the queue
                self._holding = items
                self._handed = 0
            return items

    def _drain_loop(self) -> None:
        q = self.queue
        interval = self.options.drain_interval_s
        busy = max(r.metrics.max_batch for r in self.runners)
        owner = self.owner
        while True:
            if len(q) < busy and owner.accepting:  # closing: drain what is left at once
                self._wake.wait(interval)
            self._wake.clear()
            # Read before the queue: a record queued after the logger stopped accepting is
            # taken by shut_down() or handed back to its caller (Logger._late).
            stopping = not owner.accepting
            if q:
                self._process(self.take_all())
                with self._space:
                    self._space.notify_all()
            elif stopping:
                return
            else:
                try:
                    self._rest()
                except Exception as exc:
                    self.runners[0].warn("drain", f"steplog drain thread error: {exc!r}")

    def _rest(self) -> None:
        """After a whole interval brought nothing: sleep until a call queues a record (the
        shut gate sends it through a path that wakes this thread), then leave the wake-up
        cleared so that the loop gathers for one interval as usual and a scalar is still
        stamped within one interval of its call; a flush waits for no interval."""
        q = self.queue
        if self.run_journal is not None:  # cursors held back by their once-a-second limit
            with contextlib.suppress(Exception):
                self.run_journal.settle()
        if not self.owner.rest():
            return
        # Checked again after the gate shut: a call that found it open may have appended
        # meanwhile (it then sees the gate shut and wakes us).
        if not q:
            self._wake.wait(_REST_S)
        self.owner.end_rest()
        self._wake.clear()
        # Looked for after the clear: a barrier queued later sets the wake-up again itself.
        if any(type(item) is Barrier for item in list(q)):
            self._wake.set()

    def _process(self, items: list[Any]) -> None:
        """Turn one drained chunk into records, in order, and hand them to the lanes. Should
        that fail, the records not handed over are counted lost with the reason and every flush
        barrier of the chunk still passes (its flush then reports the loss)."""
        self._passed: list[Barrier] = []
        self._uploads_handed = []
        count = 0
        try:
            count = self._records(items)
        except Exception as exc:  # keep draining whatever went wrong
            count = self._lose_rest(items, exc)
        finally:
            with self._drain_lock:  # counted once: drained, no longer held
                self._drained += count
                self._holding = []
                self._handed = 0

    def _lose_rest(self, items: list[Any], exc: Exception) -> int:
        """Count what ``items`` held and was not handed to the lanes as lost, pass the
        barriers not passed yet; the records ``items`` held."""
        total = sum(map(record_count, items))
        with self._drain_lock:
            lost = total - self._handed
            self._handed = total
        if lost > 0:
            self._lost_early += lost
            for r in self.runners:
                r.count_loss("rejected", [], f"steplog drain thread error: {exc!r}", n=lost,
                             what=f"{lost} records of one drained chunk")
        for item in items:
            if type(item) is Barrier and not any(b is item for b in self._passed):
                self._pass(item)
            elif (type(item) is UploadRequest and item.snapshot is not None
                  and not any(u is item for u in self._uploads_handed)):
                item.snapshot.drop()  # never written: its memory is free again
        return total

    def _records(self, items: list[Any]) -> int:
        """Hand the chunk's records to the lanes, in call order; how many records it held."""
        ts = now_ms()
        finite = self._plain(items)
        if finite is not None:  # the common case: one block, no Python work per scalar
            self._dispatch([Scalars(items, ts, finite)], len(items), ts)
            return len(items)
        parts: list[Any] = []
        """Blocks and records not yet handed to the lanes, in call order."""
        raw: list[tuple[str, float, int | None]] = []
        """Scalars since the last part, values read back, automatic steps not yet assigned."""
        auto = False
        """Whether ``raw`` may have a missing step."""
        count = 0
        kinds = list(map(type, items))
        others = itertools.compress(range(len(items)), map(operator.is_not, kinds,
                                                           itertools.repeat(tuple)))
        start = 0
        for i in itertools.chain(others, (len(items),)):
            if i > start:  # a run of log_scalar tuples
                run = items[start:i]
                count += i - start
                if raw:  # numbered first: their names count before the run's
                    parts.append(self._block(raw, auto, ts))
                    raw, auto = [], False
                plain = self._plain(run)
                if plain is not None:
                    parts.append(Scalars(run, ts, plain))
                else:
                    self._read_values(run, raw)
                    auto = True
            if i == len(items):
                break
            start = i + 1
            item = items[i]
            kind = kinds[i]
            if kind is MetricsItem:
                count += len(item.values)
                try:
                    raw += _metrics_rows(item)
                except Exception as exc:
                    self._refuse(item, exc)
                auto = auto or item.step is None
                continue
            if kind is UploadRequest:
                count += 1
                job = Upload(item.artifact, item.snapshot, len(self.runners), self._staging,
                             self._sink_moves)
                self._uploads_handed.append(item)
                for r in self.runners:
                    if not r.uploads.put([job], 1, ts):
                        self._lost_early += 1
                        # A close whose deadline passed: kept for a later sync, if it can be.
                        r.keep_unsent([job], "the logger closed before delivery")
                        job.finished(stored=False)
                self._hand(1)
                continue
            if raw:
                parts.append(self._block(raw, auto, ts))
                raw, auto = [], False
            if kind is Barrier:
                if parts:
                    self._dispatch(parts, sum(map(record_count, parts)), ts)
                    parts = []
                self._pass(item)
            else:  # a param or a tag
                parts.append(item)
                count += 1
        if raw:
            parts.append(self._block(raw, auto, ts))
        if parts:
            self._dispatch(parts, sum(map(record_count, parts)), ts)
        return count

    def _pass(self, barrier: Barrier) -> None:
        """``barrier`` follows every record before it into each lane."""
        try:
            self._journal_sync()  # flush(): everything before it is on disk
        finally:
            barrier.expect(2 * len(self.runners), self._lost_early)
            for r in self.runners:
                for lane in r.lanes:
                    lane.add_barrier(barrier)
            self._passed.append(barrier)

    def _hand(self, n: int) -> None:
        """``n`` more records of the chunk are with the lanes (or counted lost)."""
        with self._drain_lock:
            self._handed += n

    def _plain(self, run: list[Any]) -> bool | None:
        """For a run of ``log_scalar`` tuples that all have an explicit step and a float value:
        count their names for the automatic steps and return whether every value is finite.
        ``None`` (nothing counted) for any other run. C-level passes only: the sum of the steps
        fails on a missing step or an item that is not such a tuple, the sum of the values on a
        value still on a device; a NaN or an infinity makes the sum non-finite."""
        try:
            sum(map(_STEP, run))
            total = sum(map(_VALUE, run))
        except TypeError:
            return None
        count_names(self._steps, run)
        return bool(total - total == 0)

    def _read_values(self, run: list[Any], raw: list[tuple[str, float, int | None]]) -> None:
        """Append the run's ``log_scalar`` tuples to ``raw`` with their values read back; a
        value that cannot be read back is refused (and uses no automatic step)."""
        try:
            sum(map(_VALUE, run))
        except TypeError:  # a value still on a device
            for item in run:
                try:
                    raw.append((item[0], _resolve(item[1]), item[2]))
                except Exception as exc:
                    self._refuse(item, exc)
        else:
            raw += run

    def _block(self, raw: list[tuple[str, float, int | None]], auto: bool, ts: int) -> Scalars:
        """A block of ``raw``, numbered (see :meth:`_numbered`); ``auto``: a step may be missing."""
        if auto:
            rows = self._numbered(raw)
        else:
            count_names(self._steps, raw)
            rows = raw  # type: ignore[assignment]
        total = sum(map(_VALUE, rows))
        return Scalars(rows, ts, bool(total - total == 0))

    def _numbered(self, raw: list[tuple[str, float, int | None]]) -> list[Row]:
        """``raw`` with every missing step replaced by the name's automatic step (its number of
        earlier points), counting every point; C-level passes, Python per distinct name."""
        names = list(map(_NAME, raw))
        steps = list(map(_STEP, raw))
        counts = self._steps
        missing = steps.count(None)
        if not missing:
            counts.update(names)
            return raw  # type: ignore[return-value]
        counters = {name: itertools.count(counts[name]) for name in set(names)}
        autos = list(map(next, map(counters.__getitem__, names)))
        for name, counter in counters.items():
            counts[name] = next(counter)
        if missing < len(steps):
            autos = [a if s is None else s for s, a in zip(steps, autos, strict=True)]
        return list(zip(names, map(_VALUE, raw), autos, strict=True))

    def _refuse(self, item: Any, exc: Exception) -> None:
        """A value that cannot be read back (a failed device copy, say): only that call's
        records are lost, with the reason; none of them is sent."""
        n = record_count(item)
        self._lost_early += n
        self._hand(n)
        for r in self.runners:
            r.count_loss("rejected", [item], f"could not capture the value: {exc!r}")

    def _dispatch(self, parts: list[Any], count: int, ts: int) -> None:
        journal = self.run_journal
        spill: tuple[Journal, int] | None = None
        if journal is not None and not self.journal_stopped:
            # Each block encoded once, here, while its rows are in this core's caches (rows
            # another thread reads later cost it ~100 ns each): the journal and any sink
            # host's wire copy those bytes.
            parts = [with_encoding(p) if type(p) is Scalars else p for p in parts]
            try:
                spill = (journal.journal, journal.append(parts, count))
            except (OSError, JournalError) as exc:  # a full disk: delivery goes on without it
                self._journal_failed(exc)
        for r, spills in zip(self.runners, self._spilling, strict=True):
            if not r.metrics.put(parts, count, ts, spill if spills else None):
                self._lost_early += count
                r.count_loss("failed", parts, "the logger closed before delivery")
        self._hand(count)

    # -- the journal -----------------------------------------------------------------------
    def _journal_sync(self) -> None:
        if self.run_journal is not None and not self.journal_stopped:
            try:
                self.run_journal.sync()
            except (OSError, JournalError) as exc:
                self._journal_failed(exc)

    def _journal_failed(self, exc: Exception) -> None:
        """Stop journaling (the journal keeps what it holds, whole, and spilled frames are
        still read back) and tell the training loop once (:class:`JournalStoppedError`)."""
        journal = self.run_journal
        if journal is None or self.journal_stopped:
            return
        self.journal_stopped = True
        self.journal_error = f"the journal in {journal.run_dir} stopped: {exc}"
        self.runners[0].warn("journal", f"steplog: {self.journal_error}; records are still "
                             "delivered, but no longer kept on disk for steplog sync")
        if isinstance(exc, JournalFullError) and exc.__cause__ is None:  # the budget
            fix = "raise Options.journal_max_bytes or let the sink catch up"
        else:
            fix = f"free space where {journal.run_dir} is"
        with contextlib.suppress(Exception):
            self.owner.alarm(JournalStoppedError(
                f"steplog: {self.journal_error}. Logging goes on and records are still "
                f"delivered, from memory only: a crash or kill now loses what has not arrived "
                f"yet, and a stalled sink makes log calls wait ({fix}; a new logger journals "
                "again)"))


def count_names(counts: collections.Counter[str], rows: list[Any]) -> None:
    """Add one to ``counts[name]`` for each row's name (its first item), as
    ``counts.update(names)`` does. When the names repeat with a period (a loop logging the same
    keys every step), each name of one period is added once, multiplied: C-level passes of a
    few ns a row instead of a dictionary update per row (about 100 ns, the drain's largest
    cost per scalar). A chunk that is not exactly periodic (a key added every few steps) is
    counted row by row, after at most three passes over its names in C."""
    names = list(map(_NAME, rows))
    n = len(names)
    limit = n // _MIN_REPEATS + 1
    period = 0
    for _ in range(_PERIODS_TRIED):  # a step may log its first key again
        try:
            period = names.index(names[0], period + 1, limit)
        except (ValueError, IndexError):
            break
        # Periodic: every name equals the one a period later (compared by identity first);
        # one period against the next first, so a wrong guess costs little.
        if names[period:2 * period] == names[:period] and names[period:] == names[:-period]:
            repeats, extra = divmod(n, period)
            for name in names[:period]:
                counts[name] += repeats
            counts.update(names[:extra])
            return
    counts.update(names)


def _metrics_rows(item: MetricsItem) -> list[tuple[str, float, int | None]]:
    """The rows of one ``log_metrics`` call, values read back (raises if one cannot be)."""
    values = item.values
    try:
        floats = list(map(float, values.values()))
    except TypeError:  # a value still on a device
        floats = list(map(_resolve, values.values()))
    return list(zip(values, floats, itertools.repeat(item.step)))


def _resolve(value: Any) -> float:
    if isinstance(value, PendingValue):
        return value.resolve()
    return float(value)
