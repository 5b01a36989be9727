"""The seed-compatible logger classes: thin presets over the pipeline and its sinks.

Every ``log_*``/``save_*`` call validates its arguments, captures the values as they are at the
call, and enqueues them; it never waits on a sink (except under the ``block`` queue-full policy
when the queue is full). Delivery happens on the logger's worker threads.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, SupportsFloat, TypeVar

from steplog import lifecycle
from steplog.capture import capture_object, capture_param, capture_step, capture_value
from steplog.errors import LoggerClosedError
from steplog.paths import safe_relpath
from steplog.pipeline import MetricsItem, Options, Pipeline, UploadRequest
from steplog.records import Artifact, Param, Tag, now_ms
from steplog.results import CloseResult, FlushResult, Stats
from steplog.sinks.base import RunStatus, Sink
from steplog.sinks.file import FileSink
from steplog.sinks.mlflow import MLflowSink
from steplog.system import SystemSampler

__all__ = ["FileLogger", "Logger", "MLFlowLogger"]

L = TypeVar("L", bound="type[Logger]")


class _InertQueue:
    """Stands in for the queue of a logger with no sinks, or inherited by a forked child."""

    __slots__ = ()

    def __len__(self) -> int:
        return 0

    def append(self, item: object) -> None:
        pass


class _ClosedQueue:
    """Stands in for the queue once the logger is closed: logging raises."""

    __slots__ = ()

    def __len__(self) -> int:
        return 0

    def append(self, item: object) -> None:
        raise LoggerClosedError("this logger is closed; create a new one to log more")


_INERT = _InertQueue()
_CLOSED = _ClosedQueue()


class Logger:
    """Base logger. With no sinks it validates every call and records nothing (a no-op default).

    Args:
        logging_freq: the interval :meth:`should_log` uses; the loop decides whether to honour it.
        sinks: where records go; all of them receive every record through one queue.
        options: queue size, queue-full policy, drain interval, retries, exit deadline.
    """

    _registry: ClassVar[dict[str, type[Logger]]] = {}

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
        self.exit_timeout_s = self.options.exit_timeout_s
        self._sinks = tuple(sinks)
        self._names: set[str] = set()
        self._pipeline: Pipeline | None = None
        self._q: Any = _INERT
        self._cap = 1
        self._forked = False
        self._samplers: list[SystemSampler] = []
        if self._sinks:
            self._pipeline = Pipeline(self._sinks, self.options)
            self._q = self._pipeline.queue
            self._cap = self._pipeline.capacity
            lifecycle.register(self, self._pipeline, self.exit_timeout_s)

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
    def log_scalar(self, name: str, value: SupportsFloat, iteration: int | None = None) -> None:
        """Queue one point of ``name``. ``iteration=None`` uses the number of earlier calls for
        ``name`` (0, 1, 2, ...). Raises ``TypeError`` for a non-numeric value."""
        if type(value) is not float:
            value = capture_value(value)  # type: ignore[assignment]
        if name not in self._names:
            self._new_name(name)
        if iteration is not None and type(iteration) is not int:
            iteration = capture_step(iteration)
        q = self._q
        if len(q) >= self._cap:
            self._put((name, value, iteration))
            return
        q.append((name, value, iteration))

    def log_metrics(
        self, metrics: Mapping[str, SupportsFloat], iteration: int | None = None
    ) -> None:
        """Queue one point per key, all at ``iteration`` (or each at its own automatic step).
        Raises ``TypeError`` (and queues nothing) if any value is not numeric."""
        try:
            values = metrics.copy()  # type: ignore[attr-defined]
            # One C-level pass: a sum of plain floats and ints is a float; anything else
            # (strings, tensors, numpy scalars, None, an empty dict) takes the careful path.
            plain = type(sum(values.values())) is float
        except Exception:
            plain = False
        if not plain:
            values = _capture_metrics(metrics)
            if not values:
                return
        if not self._names.issuperset(values):
            for k in values:
                if k not in self._names:
                    self._new_name(k)
        if iteration is not None and type(iteration) is not int:
            iteration = capture_step(iteration)
        q = self._q
        if len(q) >= self._cap:
            self._put(MetricsItem(values, iteration))
            return
        q.append(MetricsItem(values, iteration))

    def _new_name(self, name: object) -> None:
        if type(name) is not str:
            raise TypeError(f"a metric name must be a str, got {type(name).__name__}")
        if not name or name.isspace():
            raise ValueError("a metric name must not be empty")
        for sink in self._sinks:
            sink.check_name(name)
        self._names.add(name)

    def _put(self, item: object) -> None:
        if self._pipeline is None or self._pipeline.closed:
            self._q.append(item)  # inert: nothing; closed: raises
            return
        self._pipeline.put(item)

    # -- rare records ----------------------------------------------------------------------
    def log_parameters(self, params: Mapping[str, Any]) -> None:
        """Queue run parameters; each value is snapshotted now (deep copy, JSON-compatible)."""
        self._put_settings(params, "params", lambda k, v, ts: Param(k, capture_param(v), ts))

    def log_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue run tags (values are stored as strings)."""
        self._put_settings(tags, "tags", lambda k, v, ts: Tag(k, str(v), ts))

    def _put_settings(
        self, items: Mapping[str, Any], what: str, build: Callable[[str, Any, int], object]
    ) -> None:
        """Validate every key and build every record first, so a bad one queues nothing."""
        if not isinstance(items, Mapping):
            raise TypeError(f"{what} must be a mapping, got {type(items).__name__}")
        ts = now_ms()
        records = []
        for k, v in items.items():
            if k not in self._names:
                self._new_name(k)
            records.append(build(k, v, ts))
        for r in records:
            self._put(r)

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
        src = _existing(path)
        dest = safe_relpath(name if name is not None else src.name)
        if step is not None:
            step = capture_step(step)
        self._upload(
            Artifact(
                name=dest,
                timestamp=now_ms(),
                source=str(src),
                kind=type or "artifact",
                step=step,
                metadata=capture_param(metadata) if metadata is not None else None,
                aliases=list(aliases) if aliases is not None else None,
            )
        )

    def log_file(self, path: str | os.PathLike[str], name: str, move: bool = False) -> None:
        """Queue ``path`` to be stored as ``<name>/<base name of path>``; ``move=True`` lets the
        worker move the file instead of copying it."""
        src = _existing(path)
        dest = safe_relpath(f"{name}/{src.name}")
        self._upload(Artifact(name=dest, timestamp=now_ms(), source=str(src), kind="file",
                              move=bool(move)))

    def log_directory(self, dir: str | os.PathLike[str], path: str | None = None) -> None:
        """Queue a directory tree to be stored under ``path`` (default: the directory's name)."""
        src = _existing(dir)
        if not src.is_dir():
            raise NotADirectoryError(f"not a directory: {src}")
        dest = safe_relpath(path if path is not None else src.name)
        self._upload(Artifact(name=dest, timestamp=now_ms(), source=str(src), kind="directory"))

    def log_figure(self, fig: Any, name: str, iteration: int | None = None) -> None:
        """Render a matplotlib figure to PNG now (the figure may change or close right after)
        and queue it as ``name`` (``.png`` added if missing; ``_<iteration>`` before it)."""
        if not hasattr(fig, "savefig"):
            raise TypeError(f"expected a matplotlib figure, got {type(fig).__name__}")
        base, ext = os.path.splitext(safe_relpath(name))
        if iteration is not None:
            iteration = capture_step(iteration)
            base = f"{base}_{iteration}"
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self._upload(Artifact(name=base + (ext or ".png"), timestamp=now_ms(), data=buf.getvalue(),
                              kind="figure", step=iteration))

    def save_policy(self, policy: Any, name: str = "policy") -> None:
        """Snapshot ``policy`` now (deep copy) and queue it as ``<name>/model.pth`` (torch.save,
        or pickle when torch is not loaded); serialisation happens on the worker."""
        dest = safe_relpath(f"{name}/model.pth")
        self._upload(Artifact(name=dest, timestamp=now_ms(), kind="policy"),
                     snapshot=capture_object(policy))

    def save_agent(self, agent: object, name: str = "agent.pth") -> None:
        """Snapshot ``agent`` now (deep copy) and queue it as ``name``."""
        dest = safe_relpath(name)
        self._upload(Artifact(name=dest, timestamp=now_ms(), kind="agent"),
                     snapshot=capture_object(agent))

    def _upload(self, artifact: Artifact, snapshot: Any = None) -> None:
        self._put(UploadRequest(artifact, snapshot))

    # -- barriers --------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> FlushResult:
        """Return once every record logged before this call is acknowledged by every sink
        (truthy), or after ``timeout`` seconds (falsy, with what is pending)."""
        if self._pipeline is None:
            return FlushResult(ok=True, pending=0, elapsed_s=0.0)
        return self._pipeline.flush(timeout)

    def close(self, timeout: float | None = None, status: RunStatus = "FINISHED") -> CloseResult:
        """Flush, end every run with ``status`` and stop the worker, within ``timeout`` seconds.
        Calling it again returns the same result; logging afterwards raises
        :class:`~steplog.errors.LoggerClosedError`."""
        for sampler in self._samplers:
            sampler.stop()
        if self._pipeline is None:
            if not self._forked:
                self._q = _CLOSED
            return CloseResult(ok=True, delivered=0, undelivered=0, dropped=0, rejected=0,
                               elapsed_s=0.0, timed_out=False)
        self._q = _CLOSED
        result = self._pipeline.close(timeout, status)
        lifecycle.unregister(self._pipeline)
        return result

    def stats(self) -> Stats:
        """Counters of this logger: enqueued, delivered, dropped, rejected, retried, queue depth,
        lag of the oldest undelivered record."""
        if self._pipeline is None:
            return Stats(enqueued=0, delivered=0, dropped=0, rejected=0, failed=0, retried=0,
                         queue_depth=0, lag_s=0.0, sinks={})
        return self._pipeline.stats()

    def __enter__(self) -> Logger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        status: RunStatus = "FINISHED"
        if exc_type is not None:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        self.close(status=status)

    def _after_fork_in_child(self) -> None:
        # The parent's threads do not exist here and its locks may be held: drop them all.
        self._forked = True
        self._pipeline = None
        self._q = _INERT


def _capture_metrics(metrics: object) -> dict[str, Any]:
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name to number, got "
                        f"{type(metrics).__name__}")
    return {k: capture_value(v) for k, v in metrics.items()}


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(os.fspath(path)).absolute()
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {p}")
    return p


@Logger.register("file")
class FileLogger(Logger):
    """Logs into a directory of plain files (see :mod:`steplog.sinks.file` for the layout)."""

    def __init__(
        self, output_dir: str | os.PathLike[str], logging_freq: int = 1, *,
        options: Options | None = None,
    ) -> None:
        self.output_dir = os.fspath(output_dir)
        os.makedirs(self.output_dir, exist_ok=True)  # fail here, not on the worker
        super().__init__(logging_freq, sinks=[FileSink(self.output_dir)], options=options)


@Logger.register("mlflow")
class MLFlowLogger(Logger):
    """Logs one MLflow run through :class:`~steplog.sinks.mlflow.MLflowSink`.

    ``tracking_uri=None`` uses ``MLFLOW_TRACKING_URI``, else the embedded default
    ``sqlite:///mlflow.db``. The run is created on the worker right away (``run_id`` is ``None``
    until then) and ended at close: ``FINISHED``, or ``FAILED``/``KILLED`` when the process dies
    of an exception or a signal. ``log_system_metrics=True`` samples CPU, memory and GPU every
    ``system_metrics_interval_s`` seconds into the same run (needs psutil; GPUs need pynvml).
    ``tags`` are set on the run when it is created.
    """

    def __init__(
        self,
        experiment_name: str,
        *,
        tracking_uri: str | None = None,
        run_name: str | None = None,
        log_system_metrics: bool = False,
        logging_freq: int = 1,
        options: Options | None = None,
        system_metrics_interval_s: float = 10.0,
        request_timeout_s: float = 30.0,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.sink = MLflowSink(experiment_name, tracking_uri=tracking_uri, run_name=run_name,
                               request_timeout_s=request_timeout_s,
                               tags=dict(tags) if tags is not None else None)
        # Check the optional dependency before any thread starts.
        sampler = None
        if log_system_metrics:
            sampler = SystemSampler(self.log_metrics, system_metrics_interval_s)
        super().__init__(logging_freq, sinks=[self.sink], options=options)
        if sampler is not None:
            self._samplers.append(sampler)
            sampler.start()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the worker created the run."""
        return self.sink.run_id


Logger.register("blank")(Logger)
