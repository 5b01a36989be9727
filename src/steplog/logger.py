"""``Logger``: the API every steplog logger shares (the seed's ``Logger``), over the pipeline.

Every ``log_*``/``save_*`` call validates its arguments, captures the values as they are at the
call, and enqueues them; it never waits on a sink (except under the ``block`` queue-full policy
when the queue is full). Delivery happens on the logger's worker threads.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, SupportsFloat, TypeVar

import msgspec

from steplog.arguments import (
    artifact_of,
    capture_metrics,
    check_name,
    data_of,
    directory_of,
    figure_of,
    file_of,
    utf8_problem,
)
from steplog.capture import capture_param, capture_step, capture_value
from steplog.checkpoints import CheckpointMemory, Snapshot, capture_checkpoint
from steplog.errors import LoggerClosedError, SteplogWarning
from steplog.images import encode_png
from steplog.lifecycle import Lifecycle, State, terminated, unclean_report
from steplog.paths import safe_relpath
from steplog.pipeline import MetricsItem, Options, UploadRequest
from steplog.pipeline.options import options_given
from steplog.ranks import RankPlan, inert_class
from steplog.ranks import plan as plan_ranks
from steplog.records import Artifact, Param, Tag, now_ms
from steplog.results import CloseResult, FlushResult, Stats
from steplog.sinks.base import RunStatus, Sink

__all__ = ["Logger", "exit_status"]

L = TypeVar("L", bound="type[Logger]")
Successor = TypeVar("Successor", bound="Logger")



class Logger:
    """Base logger. With no sinks it validates every call and records nothing (a no-op default).

    Args:
        logging_freq: the interval :meth:`should_log` uses; the loop decides whether to honour it.
        sinks: where records go; all of them receive every record through one queue.
        options: queue size, queue-full policy, drain interval, retries, deadlines.

    Raises at construction when a sink's destination can never work (an unwritable directory, a
    tracking URI MLflow cannot use).
    """

    _registry: ClassVar[dict[str, type[Logger]]] = {}
    _rank_plan: RankPlan

    def __new__(cls, *args: Any, **kwargs: Any) -> Logger:
        # The rank policy (steplog.ranks): a rank that does not log gets an inert logger,
        # built without running any of this class's constructors.
        rank_plan = plan_ranks(getattr(options_given(args, kwargs), "ranks", None))
        if not rank_plan.logs:
            inert: Logger = object.__new__(inert_class(cls, rank_plan))
            return inert
        logger = object.__new__(cls)
        logger._rank_plan = rank_plan
        return logger

    def __init__(
        self,
        logging_freq: int = 1,
        *,
        sinks: Sequence[Sink] = (),
        options: Options | None = None,
    ) -> None:
        if type(logging_freq) is not int or logging_freq < 1:
            raise ValueError(f"logging_freq must be an int >= 1, got {logging_freq!r}")
        self.logging_freq = logging_freq
        self.last_logging_iteration = 0
        self.options = options or Options()
        self._given_options = options
        self._successor: Logger | None = None
        """The logger :meth:`continued` gave this one's run to."""
        ranks = self._rank_plan
        wanted = self.options.ranks
        if ranks.distributed and wanted is not None and wanted != ranks.policy:
            # The policy was chosen in __new__, from the call's options= (a subclass that
            # builds its own Options passes them on too late for that).
            raise ValueError(
                f"steplog: Options(ranks={wanted!r}) reached {type(self).__name__}.__init__ but "
                f"not the constructor call, which chose ranks={ranks.policy!r} for every rank; "
                f"pass options=Options(ranks={wanted!r}) to the constructor, or set "
                f"STEPLOG_RANKS={wanted}")
        if ranks.splits:  # each rank journals in its own directory
            self.options = dataclasses.replace(
                self.options, runs_dir=ranks.runs_dir(self.options.runs_dir))
        self.exit_timeout_s = self.options.exit_timeout_s
        self._sinks = tuple(sinks)
        for sink in self._sinks:
            ranks.adapt(sink)
            sink.prepare()
        self._names: set[str] = set()
        self._saves: dict[str, int] = {}
        self._saves_lock = threading.Lock()
        self._checkpoints = CheckpointMemory(self.options.checkpoint_memory_bytes,
                                             self.options.checkpoint_policy)
        # The hot path appends to the pipeline's queue while it has room; once the logger stops
        # accepting (or an alarm waits, or the idle drain thread sleeps until a record comes),
        # its lifecycle sets _cap to 0 so that every call goes through _put, which asks the
        # lifecycle (the one "accepting" check) and wakes the drain thread.
        self._cap = 0
        self._life = Lifecycle(self._sinks, self.options, weakref.WeakMethod(self._close_gate))
        self._life.helpers.append(self._checkpoints)  # its reuse buffers go at close
        pipeline = self._life.pipeline
        self._q: collections.deque[Any] = pipeline.queue if pipeline else collections.deque()
        self._life.connect_gate()  # the worker started meanwhile: it decides, under its lock

    def _close_gate(self, open_: bool) -> None:
        pipeline = self._life.pipeline
        self._cap = pipeline.capacity if open_ and pipeline is not None else 0

    # -- registry --------------------------------------------------------------------------
    @classmethod
    def register(cls, name: str) -> Callable[[L], L]:
        """Class decorator: make ``Logger.create(name, ...)`` build the decorated class."""

        def decorator(subclass: L) -> L:
            cls._registry[name] = subclass
            return subclass

        return decorator

    @classmethod
    def create(cls, type_: str, **kwargs: Any) -> Logger:
        """Build the logger registered under ``type_`` ("file", "mlflow", "blank", or your own)."""
        if type_ not in cls._registry:
            known = ", ".join(sorted(cls._registry))
            raise ValueError(f"unknown logger type {type_!r}; known types: {known}")
        return cls._registry[type_](**kwargs)

    # -- the seed's helpers ----------------------------------------------------------------
    def should_log(self, iteration: int) -> bool:
        """True once per ``logging_freq`` iterations: when ``iteration + 1`` enters a new interval
        of that length since the last time this returned True."""
        iteration += 1
        if iteration // self.logging_freq > self.last_logging_iteration // self.logging_freq:
            self.last_logging_iteration = iteration
            return True
        return False

    # -- hot path --------------------------------------------------------------------------
    # One short function per call, no Python call below it in the common case (a float, a known
    # name, an int step, room in the queue): a few type checks, a set lookup, a length check and
    # a deque append, ~1.5x a bare deque.append of a tuple (~135 ns) for log_scalar and ~400 ns
    # for a 10-key log_metrics (benchmarks/bench_hot_path.py, docs/benchmarks.md). A new name,
    # a tensor, a full queue, a closing logger or the first record for a resting drain thread
    # takes a slower branch.
    def log_scalar(self, name: str, value: SupportsFloat, iteration: int | None = None) -> None:
        """Queue one point of ``name``. ``iteration=None`` uses the number of earlier calls for
        ``name`` (0, 1, 2, ...). Raises ``TypeError`` for a non-numeric value."""
        if type(value) is not float:
            value = capture_value(value)  # type: ignore[assignment]
        if name not in self._names:
            self._new_name(name)
        # One shift sends steps outside [0, 2**63) (rare) to the careful check of the range.
        if iteration is not None and (type(iteration) is not int or iteration >> 63):
            iteration = capture_step(iteration)
        q = self._q
        if len(q) >= self._cap:
            self._put((name, value, iteration))
            return
        item = (name, value, iteration)
        q.append(item)
        if not self._cap:  # close() started between the check and the append
            self._late(item)

    def log_metrics(
        self, metrics: Mapping[str, SupportsFloat], iteration: int | None = None
    ) -> None:
        """Queue one point per key, all at ``iteration`` (or each at its own automatic step).
        Raises ``TypeError`` for a value that is not numeric, ``ValueError`` for an int too
        large for a float, naming the key; then nothing of the call is queued."""
        plain = False
        if isinstance(metrics, dict):  # other mappings (a ChainMap's copy shares its maps)
            values: dict[str, Any] = (  # take the careful path, which reads every key now
                metrics.copy() if type(metrics) is dict else dict(metrics))
            # One C-level pass: a sum of plain floats and ints started at 0.0 is a float, and
            # adding an int too large for a float to a float raises; anything else (strings,
            # tensors, numpy scalars, None) and an empty dict take the careful path.
            try:
                plain = type(sum(values.values(), 0.0)) is float and len(values) > 0
            except Exception:
                plain = False
        if not plain:
            values = capture_metrics(metrics)
            if not values:
                return
        if not self._names.issuperset(values):
            self._check_names(values)
        # One shift sends steps outside [0, 2**63) (rare) to the careful check of the range.
        if iteration is not None and (type(iteration) is not int or iteration >> 63):
            iteration = capture_step(iteration)
        q = self._q
        if len(q) >= self._cap:
            self._put(MetricsItem(values, iteration))
            return
        item = MetricsItem(values, iteration)
        q.append(item)
        if not self._cap:  # close() started between the check and the append
            self._late(item)

    def _new_name(self, name: object) -> None:
        self._names.add(check_name(name, self._sinks))

    def _check_names(self, names: Iterable[object]) -> None:
        """Check each name not used before against every sink, in order (``ValueError`` for
        the first one a sink can never store); the names checked so far are remembered."""
        known = self._names
        for name in names:
            if name not in known:
                self._new_name(name)

    def _late(self, item: object) -> None:
        """A record appended just after the logger stopped accepting: take it back and raise,
        unless the worker already took it (then it is delivered like any other). With the logger
        still open (the gate shut for an alarm), the record was appended before any close
        changed the state, so it is delivered."""
        if self._life.accepting:  # the gate shut for the drain thread's rest: wake it
            self._life.end_rest()
            return
        pipeline = self._life.pipeline
        if pipeline is not None and pipeline.withdraw(item):
            raise LoggerClosedError("this logger is closing; the record was not logged")

    def _put(self, item: object, raise_alarm: bool = True) -> None:
        """The slow path: a full queue, a logger that no longer accepts records, an alarm
        to raise (after the call did its work, unless ``raise_alarm`` is false), or the first
        record for a resting drain thread (which :meth:`Pipeline.put` wakes)."""
        life = self._life
        pipeline = life.admit()
        if pipeline is not None and pipeline.put(item) and not self._cap:
            self._late(item)
        if raise_alarm:
            life.raise_alarm()

    def _log_sample(self, values: Mapping[str, float]) -> None:
        """Queue a system sample (the sampler thread's door): as :meth:`log_metrics` at an
        automatic step, except that an alarm meant for the training loop stays for its next
        call instead of ending the sampler."""
        if not self._names.issuperset(values):
            self._check_names(values)
        self._put(MetricsItem(dict(values), None), raise_alarm=False)

    # -- rare records ----------------------------------------------------------------------
    def log_parameters(self, params: Mapping[str, Any]) -> None:
        """Queue run parameters; each value is snapshotted now (deep copy, JSON-compatible)."""
        self._queue_settings(self._param_records(params), "params")

    def log_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue run tags (values are stored as strings)."""
        self._queue_settings(self._tag_records(tags), "tags")

    def _param_records(self, params: Mapping[str, Any]) -> list[Param | Tag]:
        """The records of a ``log_parameters`` call, every key and value checked; nothing
        queued."""
        return self._setting_records(params, "params",
                                     lambda k, v, ts: Param(k, capture_param(v), ts))

    def _tag_records(self, tags: Mapping[str, Any]) -> list[Param | Tag]:
        """The records of a ``log_tags`` call, every key and value checked; nothing queued."""
        return self._setting_records(tags, "tags", lambda k, v, ts: Tag(k, str(v), ts))

    def _setting_records(
        self, items: Mapping[str, Any], what: str, build: Callable[[str, Any, int], Param | Tag]
    ) -> list[Param | Tag]:
        """Validate every key and build every record (``TypeError``/``ValueError`` naming the
        first bad one)."""
        if not isinstance(items, Mapping):
            raise TypeError(f"{what} must be a mapping, got {type(items).__name__}")
        ts = now_ms()
        records = []
        for k, v in items.items():
            if k not in self._names:
                self._new_name(k)
            try:
                record = build(k, v, ts)
            except (TypeError, ValueError) as exc:
                kind = ValueError if isinstance(exc, ValueError) else TypeError
                raise kind(f"{what} {k!r}: {exc}") from exc
            problem = utf8_problem(record.value)
            if problem is not None:
                raise ValueError(f"{what} {k!r}: the value {problem}")
            records.append(record)
        return records

    def _queue_settings(self, records: list[Param | Tag], what: str) -> None:
        """Queue checked param or tag records (``what``: how the error messages name them)."""
        pipeline = self._life.admit()
        if pipeline is None:
            return
        queued: list[Param | Tag] = []
        dropped = 0  # by the queue-full policy (counted as dropped)
        try:
            for r in records:
                if pipeline.put(r):
                    queued.append(r)
                else:
                    dropped += 1
        except LoggerClosedError:  # close() started while a put waited for room
            back = sum(pipeline.withdraw(r) for r in queued)
            also = f", and {dropped} dropped by the queue-full policy" if dropped else ""
            raise LoggerClosedError(
                f"the logger started closing while this call waited for room in its full "
                f"queue: {len(records) - len(queued) - dropped + back} of the {len(records)} "
                f"{what} of this call were not logged{also}") from None
        # close() started during this call: take back what is still queued
        if not self._cap and not self._life.accepting:
            back = sum(pipeline.withdraw(r) for r in queued)
            if back:
                raise LoggerClosedError(
                    f"this logger is closing: {back} of the {len(records)} {what} of this call "
                    "were not logged"
                )
        self._life.raise_alarm()

    def log_artifact(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        type: str | None = None,
        step: int | None = None,
        metadata: dict[str, Any] | None = None,
        aliases: list[str] | None = None,
    ) -> None:
        """Queue a file (or directory) to store with the run under ``name`` (default: its base
        name). Raises ``FileNotFoundError`` now if it does not exist, ``ValueError`` for a name
        that would leave the run directory. The file is read by the worker: do not change it
        until :meth:`flush` returns."""
        self._upload(artifact_of(path, name, "artifact" if type is None else type, step,
                                 metadata, aliases))

    def log_file(self, path: str | os.PathLike[str], name: str, move: bool = False) -> None:
        """Queue ``path`` to be stored as ``<name>/<base name of path>``; with ``move=True``
        ``path`` is gone once every sink stored it (renamed into a file run, else removed after
        the copies; a link is removed, what it names is stored), and stays where it was when a
        sink could not store it."""
        self._upload(file_of(path, name, move))

    def log_directory(self, dir: str | os.PathLike[str], path: str | None = None) -> None:
        """Queue a directory tree to be stored under ``path`` (default: the directory's name)."""
        self._upload(directory_of(dir, path))

    def log_figure(self, fig: Any, name: str, iteration: int | None = None) -> None:
        """Render a matplotlib figure to PNG now (the figure may change or close right after)
        and queue it as ``name`` (``.png`` added if missing; ``_<iteration>`` before it)."""
        self._upload(figure_of(fig, name, iteration))

    def log_text(self, text: str, name: str, iteration: int | None = None) -> None:
        """Queue ``text`` as the UTF-8 file ``name`` (``.txt`` added if it has no extension;
        ``_<iteration>`` before it)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        self._upload(data_of(text.encode(), name, ".txt", iteration, "text"))

    def log_image(
        self, image: Any, name: str, iteration: int | None = None, *, dataformats: str = "HWC"
    ) -> None:
        """Encode an image array (numpy or torch; ``uint8``, or floats in ``[0, 1]``) to PNG
        now and queue it as ``name`` (``.png`` added if missing; ``_<iteration>`` before it).
        ``dataformats`` names its axes (``"HWC"``, ``"CHW"``, ``"HW"``, ...; ``"NCHW"``: a
        batch, drawn as one grid of up to eight images a row)."""
        self._upload(data_of(encode_png(image, dataformats), name, ".png", iteration, "image"))

    def save_policy(
        self,
        policy: Any,
        name: str = "policy",
        *,
        step: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Snapshot ``policy``'s weights now and queue them as the checkpoint ``name`` at
        ``step`` (``None``: the number of earlier saves of ``name``).

        A ``torch.nn.Module``, an optimizer, or a dict/list of them, of state_dicts, tensors
        and plain values is captured as its tensors (CPU tensors copied now, CUDA tensors
        copied without synchronising the training stream) into host buffers reused from the
        previous save of ``name``; each sink stores ``model.pth`` (``torch.load(path,
        weights_only=True)`` gives the state_dict back) and ``meta.json`` (class, step,
        ``save_to_dict()`` when the object has one, ``metadata``, sizes, sha256). Any other
        object is deep-copied now and pickled by the worker (load it with
        ``weights_only=False``). Raises ``TypeError`` when the object cannot be copied and
        ``TimeoutError`` when the checkpoint memory bound (``Options.checkpoint_memory_bytes``)
        leaves no room within ``Options.block_timeout_s``.
        """
        dest = safe_relpath(name)
        self._check_upload_name(dest)
        if step is not None:
            step = capture_step(step)
        # One deadline for the whole call: a save that waits for another one's room (under
        # the lock) does not get a second block_timeout_s of its own.
        deadline = time.monotonic() + self.options.block_timeout_s
        if not self._saves_lock.acquire(timeout=self.options.block_timeout_s):
            raise TimeoutError(
                f"snapshot {dest!r} was not saved: another save_policy call of this logger "
                f"still waited for room after block_timeout_s="
                f"{self.options.block_timeout_s:g} s (Options.checkpoint_memory_bytes = "
                f"{self.options.checkpoint_memory_bytes:,})")
        try:  # one automatic step per save, in call order
            auto = self._saves.get(dest, 0)
            if step is None:
                step = auto
            if self._life.admit() is None:  # raises once closed; None: nothing is recorded
                return
            snapshot = capture_checkpoint(
                policy, dest, self._checkpoints, step=step, metadata=metadata,
                deadline=deadline,
            )
            self._saves[dest] = auto + 1
            self._upload(Artifact(name=dest, timestamp=now_ms(), kind="policy", step=step,
                                  checkpoint=True,
                                  metadata=capture_param(dict(metadata)) if metadata else None),
                         snapshot=snapshot, checked=True)
        finally:
            self._saves_lock.release()

    def save_agent(self, agent: object, name: str = "agent.pth") -> None:
        """Snapshot ``agent`` now and queue it as the file ``name``: weights (a module, an
        optimizer, a dict of them or of plain values) are captured as in :meth:`save_policy`
        and load with ``weights_only=True``; any other object is deep-copied now (``TypeError``
        when it cannot be) and pickled by the worker, which rejects one that cannot be
        serialised, with the reason in the flush and close results."""
        dest = safe_relpath(name)
        self._check_upload_name(dest)
        if self._life.admit() is None:
            return
        snapshot = capture_checkpoint(
            agent, dest, self._checkpoints, step=None, metadata=None,
            deadline=time.monotonic() + self.options.block_timeout_s,
        )
        self._upload(Artifact(name=dest, timestamp=now_ms(), kind="agent"), snapshot=snapshot,
                     checked=True)

    def _check_upload_name(self, name: str) -> None:
        for sink in self._sinks:
            sink.check_upload_name(name)

    def _upload(self, artifact: Artifact, snapshot: Snapshot | None = None,
                checked: bool = False) -> None:
        """Queue ``artifact`` (its name checked by every sink unless ``checked``: the caller
        did so before taking its snapshot)."""
        item = UploadRequest(artifact, snapshot)
        queued = False
        try:
            if not checked:
                self._check_upload_name(artifact.name)
            pipeline = self._life.admit()
            queued = pipeline is not None and pipeline.put(item)
            if queued and not self._cap:
                self._late(item)
        except BaseException:
            queued = False
            raise
        finally:
            if snapshot is not None and not queued:
                snapshot.drop()  # never queued (dropped, taken back): free its memory
        self._life.raise_alarm()

    # -- barriers --------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until every record logged before this call was stored by every sink (truthy
        result), or ``timeout`` seconds passed, or a record of the run was refused or could not
        be delivered (falsy, with what is pending and what was lost, and why).

        ``timeout=None`` means ``Options.timeout_s`` (120 s by default); it must be a finite
        number of seconds >= 0. During a ``close`` in another thread, waits for that close.
        """
        return self._life.flush(timeout)

    def close(self, timeout: float | None = None, status: RunStatus = "FINISHED") -> CloseResult:
        """Deliver what was logged, end every run with ``status`` and stop the worker, within
        ``timeout`` seconds (``None``: ``Options.timeout_s``). The result is truthy only when
        every record was stored by every sink and every run ended.

        From the first call on, logging raises :class:`~steplog.errors.LoggerClosedError`.
        Calling it again returns the first result; a call while another thread closes waits for
        that close within its own timeout. A sink never sees its run ended while one of its
        calls is still running: after a timeout, the run is ended when that call returns.
        """
        return self._life.close(timeout, status)

    def continued(self) -> Logger:
        """A new logger, with this one's settings, that logs on into this logger's run: for a
        later stage of the same job (``trainer.test`` after ``trainer.fit``, say).

        This logger must be closed, by a close that finished in time, and its run not continued
        yet, so that two loggers never write the run at once (``RuntimeError`` otherwise). When
        this logger's journal still keeps records for ``steplog sync``, the new logger decides
        the run's status (a sync of that journal leaves it alone). The new logger's automatic
        steps start from 0 again: give steps explicitly to log on after the earlier ones.
        ``NotImplementedError`` for a logger whose run cannot be continued (one built on sinks
        of your own, a run of one rank among several)."""
        raise NotImplementedError(
            f"steplog: {type(self).__name__} cannot log on into a run it ended; build a new "
            "logger, or keep this one open for the later stage")

    def _check_continuable(self) -> None:
        """Raise ``RuntimeError`` unless this logger's close finished in time and its run was
        not continued yet."""
        result = self._life.result
        name = type(self).__name__
        if result is None:
            raise RuntimeError(f"steplog: close this {name} before logging on into its run with "
                               "continued(): two loggers must not write one run at once")
        if result.timed_out:
            raise RuntimeError(f"steplog: this {name}'s close timed out, so its worker may still "
                               "be writing the run; its run cannot be continued by another "
                               "logger in this process")
        if self._successor is not None:
            raise RuntimeError(f"steplog: this {name}'s run was already continued by another "
                               "logger; call continued() on that one once it is closed")

    def _continue_with(self, successor: Successor) -> Successor:
        """Record ``successor`` as the logger the run went on in; a journal that still keeps
        records for a later sync leaves the run's status to it."""
        self._successor = successor
        pipeline = self._life.pipeline
        if pipeline is not None and pipeline.run_journal is not None and pipeline.journal_kept:
            with contextlib.suppress(Exception):
                pipeline.run_journal.hand_over()
        return successor

    async def aflush(self, timeout: float | None = None) -> FlushResult:
        """:meth:`flush` for asyncio and trio: the same result, without blocking the event
        loop. Cancellation stops the wait at once and leaves the logger as it was (records
        are still delivered; nothing is left waiting). See :mod:`steplog.aio`."""
        from steplog.aio import aflush

        return await aflush(self, timeout)

    async def aclose(self, timeout: float | None = None,
                     status: RunStatus = "FINISHED") -> CloseResult:
        """:meth:`close` for asyncio and trio, without blocking the event loop. When the wait
        is cancelled or ``timeout`` passes first, the close goes on in the background within
        its own deadline, and a later ``close()``/``aclose()`` returns its result."""
        from steplog.aio import aclose

        return await aclose(self, timeout, status)

    async def __aenter__(self) -> Logger:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Shielded: a block cancelled by an expired cancel scope (or a task group) still waits
        # for the close, within its deadline, as a `with` block does.
        import anyio

        with anyio.CancelScope(shield=True):
            result = await self.aclose(status=exit_status(exc_type, exc))
        self._report_unclean(result, "leaving an async with block")

    @property
    def run_dir(self) -> str | None:
        """The directory of this logger's journal (loggers with a remote sink), where
        ``steplog sync`` finds what a sink did not store; ``None`` without a journal."""
        pipeline = self._life.pipeline
        journal = pipeline.run_journal if pipeline is not None else None
        return str(journal.run_dir) if journal is not None else None

    @property
    def state(self) -> State:
        """Where the logger is in its life: ``OPEN``, ``CLOSING``, ``CLOSED`` or ``INERT``."""
        return self._life.state

    def stats(self) -> Stats:
        """Counters of this logger, in records: enqueued, delivered, dropped, rejected, failed,
        retried, queue depth, lag of the oldest undelivered record, and the same per sink."""
        stats = self._life.stats()
        if self._checkpoints.superseded:
            stats = msgspec.structs.replace(stats, superseded=self._checkpoints.superseded)
        return stats

    def __enter__(self) -> Logger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._report_unclean(self.close(status=exit_status(exc_type, exc)),
                             "leaving a with block")

    def _report_unclean(self, result: CloseResult, when: str) -> None:
        """A falsy close result that no caller sees (a ``with`` block's) becomes one warning
        saying what did not arrive and how to deliver it later."""
        if not result:
            warnings.warn(unclean_report(self._life, result, when,
                                         "timed out" if result.timed_out else ""),
                          SteplogWarning, stacklevel=3)


def exit_status(exc_type: type[BaseException] | None, exc: BaseException | None) -> RunStatus:
    """The status of a run left by ``exc``: ``KILLED`` for Ctrl-C, once a SIGTERM came
    (steplog's handler raises ``SystemExit``) or for a cancellation (asyncio's or trio's: an
    expired cancel scope, or a Ctrl-C under asyncio, which cancels the main task);
    ``FINISHED`` for ``sys.exit()`` with status 0; else ``FAILED``. An exception group (a task
    group's) is judged by its leaves: ``KILLED`` when one of them is, ``FINISHED`` when every
    leaf is, else ``FAILED``."""
    if exc_type is None:
        return "FINISHED"
    if terminated():
        return "KILLED"
    if exc is None:
        return _leaf_status(exc_type, None)
    statuses = {_leaf_status(type(leaf), leaf) for leaf in _leaves(exc)}
    return ("KILLED" if "KILLED" in statuses else "FAILED" if "FAILED" in statuses
            else "FINISHED")


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    # The built-in class (Python 3.11+), or the backport anyio and trio use before it.
    group = getattr(builtins, "BaseExceptionGroup", None) or getattr(
        sys.modules.get("exceptiongroup"), "BaseExceptionGroup", None)
    if group is not None and isinstance(exc, group):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _leaf_status(exc_type: type[BaseException], exc: BaseException | None) -> RunStatus:
    if issubclass(exc_type, KeyboardInterrupt) or _is_cancellation(exc_type):
        return "KILLED"
    if issubclass(exc_type, SystemExit) and getattr(exc, "code", None) in (None, 0):
        return "FINISHED"
    return "FAILED"


def _is_cancellation(exc_type: type[BaseException]) -> bool:
    """Whether ``exc_type`` is asyncio's or trio's cancellation (neither is imported here)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and issubclass(exc_type, asyncio.CancelledError):
        return True
    trio = sys.modules.get("trio")
    return trio is not None and issubclass(exc_type, trio.Cancelled)


Logger.register("blank")(Logger)
