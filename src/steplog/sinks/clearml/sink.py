"""The ClearML sink: one ClearML Task, written in batches.

The Task is created with ``Task.init`` on the caller's thread when the logger is built, so
``task`` is the real ``clearml.Task`` from the start. ClearML's per-event Python work stays off
the step loop:

* **Scalars** go as whole batches of ClearML scalar events, encoded by msgspec in one pass: in
  offline mode one JSON line appended to the session's ``metrics.jsonl`` (the format
  ``Task.import_offline_session`` reads), online one ``events.add_batch`` request through the
  Task's own API session (its credentials, its ``api.http`` settings). ``report_scalar`` would
  cost about 45 us of Python per point; a batch costs well under 1 us per point.
* **Parameters** are merged into the Task's hyperparameters (section ``General``; nested dicts
  become ``a/b`` keys), **tags** become user properties, **artifacts** Task artifacts, and a
  saved **policy** an ``OutputModel`` in the model registry (offline too).

The Task runs ClearML's reporter in a thread (not a forked subprocess), without automatic
framework binding, resource monitoring, console capture or repository detection: each of these
costs the training process CPU, and the forked reporter can block ``Task.close`` for minutes.
``task_init_kwargs`` turns any of them back on. steplog owns the Task's end: ClearML's own exit
and signal hooks are removed, and the Task is closed (``completed``, ``failed`` or ``stopped``)
when the logger closes, after its last record.

Values: ClearML cannot store NaN or infinity; like ClearML's own ``report_scalar``, they are
stored as 0.0 (counted in :attr:`ClearMLSink.nonfinite`, with one warning).

The journal and ``steplog sync``: an online Task is remote and replayable, so its logger journals
metric records and ``steplog sync`` sends what the server did not store into the same Task
(:meth:`ClearMLSink.reattach`). The ClearML server stores a scalar event under an id derived
from (task, iteration, title, series) and overwrites it when the same point comes again, and
parameters and user properties are set to a value, so a replay stores nothing twice. An offline
session is not journaled: the sink appends each batch to the session's files on the worker as
it goes, so they are themselves the record, and ``Task.import_offline_session`` uploads them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from steplog.errors import PermanentError, RetryableError, SteplogWarning
from steplog.paths import link_or_copy, safe_relpath
from steplog.records import Artifact, Batch, MetricRecord, Param, Scalar, Scalars, Tag
from steplog.sinks.base import RunStatus, Sink
from steplog.sinks.clearml.api import (
    CONFIG_HELP,
    configuration_problem,
    configured_api_host,
    end_task,
    force_parameters,
    refused_events,
    response_text,
    session_for,
    set_properties,
    task_info,
    why_unreachable,
    without_userinfo,
)
from steplog.sinks.clearml.offline import (
    append_line,
    import_command,
    offline_requested,
    open_metrics_file,
)

__all__ = ["ClearMLSink", "split_name"]

_NO_FRAMEWORKS = (
    "matplotlib", "tensorflow", "tensorboard", "pytorch", "xgboost", "scikit", "fastai",
    "lightgbm", "hydra", "detect_repository", "tfdefines", "joblib", "megengine", "catboost",
    "gradio", "jsonargparse",
)
_NONFINITE_MARK = b'"value":null'


class _ScalarEvent(msgspec.Struct, gc=False):
    """A ClearML ``training_stats_scalar`` event, fields in the SDK's order."""

    timestamp: int
    type: str
    task: str
    iter: int
    metric: str
    variant: str
    value: float


def split_name(name: str) -> tuple[str, str]:
    """ClearML's (title, series) for a steplog metric name: ``"loss/train"`` is title
    ``"loss"``, series ``"train"`` (split at the first slash); a name without a slash is
    series ``name`` under the title ``"metrics"``."""
    title, sep, series = name.partition("/")
    if sep and title and series:
        return title, series
    return "metrics", name


class ClearMLSink(Sink):
    """Writes one ClearML Task. A retried :meth:`write` sends the same events again; ClearML
    keeps one value per (title, series, iteration), so a retry adds no points."""

    kind: ClassVar[str] = "clearml"
    max_batch = 10_000

    def __init__(
        self,
        project_name: str,
        task_name: str,
        *,
        offline: bool | None = None,
        tags: Sequence[str] | None = None,
        output_uri: str | None = None,
        connect_timeout_s: float = 5.0,
        task_init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        for what, value in (("project_name", project_name), ("task_name", task_name)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{what} must be a non-empty str, got {value!r}")
        if not connect_timeout_s > 0 or math.isinf(connect_timeout_s):
            raise ValueError(f"connect_timeout_s must be a finite number > 0, got "
                             f"{connect_timeout_s!r}")
        self.project_name = project_name
        self.task_name = task_name
        self.offline = offline_requested(offline)
        self.tags = list(tags) if tags is not None else None
        self.output_uri = output_uri
        self.connect_timeout_s = connect_timeout_s
        self.task_init_kwargs = dict(task_init_kwargs or {})
        self.remote = not self.offline
        self.task: Any = None
        """The ``clearml.Task`` (set by :meth:`prepare`)."""
        self.api_host: str | None = None
        """The API server of an online Task, without credentials (set by :meth:`prepare`)."""
        self._task_id: str | None = None
        """The Task a reattached sink writes into (``steplog sync``); ``None`` for a logger's."""
        self._session: Any = None
        """A reattached sink's own ClearML API session (set by :meth:`open`)."""
        self.unreachable: str | None = None
        """Why the server could not be reached at start (the run was then recorded offline)."""
        self.nonfinite = 0
        """Points stored as 0.0 because ClearML cannot store NaN or infinity."""
        self._encoder = msgspec.json.Encoder()
        self._names: dict[str, tuple[str, str]] = {}
        self._versions: dict[str, int] = {}
        self._metrics_file: int | None = None
        self._staging: str | None = None
        self._closed = False

    # -- life ----------------------------------------------------------------------------

    @property
    def session_folder(self) -> str | None:
        """The offline session's folder (``None`` online)."""
        if self.task is None or not self.offline:
            return None
        return str(self.task.get_offline_mode_folder())

    def describe(self) -> str:
        if self._task_id is not None:
            return f"clearml task {self._task_id} on {self.api_host}"
        if self.task is None:
            return f"clearml project {self.project_name!r} task {self.task_name!r}"
        if self.offline:
            return f"clearml offline session {self.session_folder}"
        with contextlib.suppress(Exception):
            return str(self.task.get_output_log_web_page())
        return f"clearml task {self.task.id}"

    def prepare(self) -> None:
        """Create the Task (on the caller's thread). Raises ``ImportError`` without clearml and
        ``ValueError`` naming the fixes when ClearML is not configured; a server that does not
        answer within ``connect_timeout_s`` makes the run an offline session (with a warning),
        and the close result then says it still has to be uploaded. A reattached sink (see
        :meth:`reattach`) creates nothing."""
        if self.task is not None or self._task_id is not None:
            return
        try:
            from clearml import Task
        except ImportError as exc:
            raise ImportError(
                "ClearMLLogger needs the clearml package: pip install 'steplog[clearml]'"
            ) from exc
        if not self.offline:
            problem = configuration_problem()
            if problem is not None:
                raise ValueError(problem)
            host = configured_api_host()
            self.unreachable = why_unreachable(host, self.connect_timeout_s)
            if self.unreachable is not None:
                warnings.warn(
                    f"{self.unreachable}; recording the run as a ClearML offline session "
                    "instead (the close result says where, and how to upload it)",
                    SteplogWarning,
                    stacklevel=4,
                )
                self.offline = True
                self.remote = False  # the offline session is the record: nothing to journal
            else:
                self.api_host = without_userinfo(host)
        running: Any = Task.current_task()
        if running is not None:
            # Task.init would hand back that Task (same names) or refuse (other names); either
            # way this logger would end a Task it does not own.
            raise ValueError(
                f"ClearML allows one running Task per process and {running.id} "
                f"({running.name!r}) is running: close it (or its ClearMLLogger) first"
            )
        if self.offline:
            Task.set_offline(True)
        elif Task.is_offline():  # set by an earlier offline logger of this process
            Task.set_offline(False)
        # Thread reporter: the forked one costs ~200 us of CPU per point in this process and
        # can block Task.close for minutes.
        setattr(Task, "_report_subprocess_enabled", False)  # noqa: B010 - typed as lazy
        kwargs: dict[str, Any] = {
            "reuse_last_task_id": False,
            "auto_connect_frameworks": dict.fromkeys(_NO_FRAMEWORKS, False),
            "auto_connect_arg_parser": False,
            "auto_resource_monitoring": False,
            "auto_connect_streams": False,
        }
        if self.tags is not None:
            kwargs["tags"] = self.tags
        if self.output_uri is not None:
            kwargs["output_uri"] = self.output_uri
        elif not self.offline:
            kwargs["output_uri"] = True  # models are uploaded (to the files server) by default
        kwargs.update(self.task_init_kwargs)
        try:
            task: Any = Task.init(
                project_name=self.project_name, task_name=self.task_name, **kwargs
            )
        except Exception as exc:
            if type(exc).__name__ == "MissingConfigError":
                raise ValueError(CONFIG_HELP) from exc
            raise
        # steplog ends the Task after its last record: ClearML's own exit hook would close it
        # before the logger's final records, and its signal handler would run that close
        # inside a signal handler.
        atexit.unregister(task._at_exit)
        Task._remove_signal_hooks()
        Task._remove_exception_hooks()
        # ClearML's fork hooks would start reporter threads in every forked child (a DataLoader
        # worker, say) and make its exit wait; a forked child's logger is inert anyway.
        from clearml.binding.environ_bind import PatchOsFork

        PatchOsFork.patch_fork(None)  # type: ignore[arg-type]
        self.task = task
        if self.offline:
            self._metrics_file = open_metrics_file(Path(task.get_offline_mode_folder()))

    # -- the journal and steplog sync -----------------------------------------------------

    def replayable(self) -> bool:
        """True online: the server keeps one event per (task, iteration, title, series) and
        overwrites it when it comes again; parameters and properties are set to a value. An
        offline session is not replayed (its files are the record; see the module docstring)."""
        return not self.offline

    def target(self) -> dict[str, Any] | None:
        """The online Task: its API server, project, name and id (no credentials); ``None`` for
        an offline session."""
        if self.offline:
            return None
        return {
            "api_host": self.api_host,
            "project_name": self.project_name,
            "task_name": self.task_name,
            "task_id": self.task.id if self.task is not None else self._task_id,
            "connect_timeout_s": self.connect_timeout_s,
        }

    @classmethod
    def reattach(cls, target: dict[str, Any]) -> ClearMLSink:
        """Writes into the Task ``target`` names through a ClearML API session of its own,
        opened by :meth:`open`: no ``Task.init``, no new Task, none of ClearML's hooks. The
        server comes from ``target``, the credentials from this machine (``clearml.conf`` or
        ``CLEARML_API_*``). Raises ``ValueError`` when ``target`` names no Task: a logger creates
        its Task when it is built, before it journals anything."""
        task_id, host = target.get("task_id"), target.get("api_host")
        if not task_id or not host:
            raise ValueError(f"the journal names no ClearML task to write into ({target!r})")
        sink = cls(str(target["project_name"]), str(target["task_name"]), offline=False,
                   connect_timeout_s=float(target.get("connect_timeout_s", 5.0)))
        sink.api_host = str(host)
        sink._task_id = str(task_id)
        return sink

    def open(self) -> None:
        """A reattached sink connects to its Task's server and finds the Task there (a logger's
        sink has its Task from :meth:`prepare`). Raises :class:`RetryableError` when the server
        does not answer within ``connect_timeout_s``, :class:`PermanentError` without
        credentials or when the server refuses (no such task, no permission)."""
        if self._task_id is None or self._session is not None:
            return
        assert self.api_host is not None
        session = session_for(self.api_host, self.connect_timeout_s)
        task_info(session, self._task_id)
        self._session = session

    def release(self) -> None:
        self._session = None

    # -- life, continued -----------------------------------------------------------------

    def close(self, status: RunStatus) -> None:
        """Everything is on disk or on the server, and the Task is closed with ``status``
        (offline: the session is zipped). Safe to call again after a failure."""
        if self._task_id is not None:
            if self._session is not None:
                end_task(self._session, self._task_id, status)
            return
        task = self.task
        if task is None or self._closed:
            return
        task.set_user_properties(**{"steplog.status": status})
        task.flush(wait_for_uploads=True)
        task.close()
        if not self.offline and status != "FINISHED":
            reason = f"the training process ended with {status}"
            if status == "FAILED":
                task.mark_failed(status_reason=reason, force=True)
            else:
                task.mark_stopped(force=True, status_message=reason)
        self._closed = True
        if self._metrics_file is not None:
            os.close(self._metrics_file)
            self._metrics_file = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if self.unreachable is None and self.offline:
            zip_path = f"{self.session_folder}.zip"
            print(f"steplog: the ClearML offline session is {zip_path}; upload it with: "
                  f"{import_command(zip_path)}", file=sys.stderr)
        if self.unreachable is not None:
            zip_path = f"{self.session_folder}.zip"
            raise PermanentError(
                f"{self.unreachable}, so nothing reached the server: the run is the offline "
                f"session {zip_path}; upload it with: {import_command(zip_path)}",
                whole_batch=True,
            )

    # -- metrics lane --------------------------------------------------------------------

    def write(self, records: Sequence[MetricRecord]) -> None:
        """Store the batch's scalars as one batch of events, then its parameters and tags."""
        task = self.task
        if self._task_id is not None and self._session is None:
            raise RetryableError("the ClearML task is not open yet")
        if (task is None and self._session is None) or self._closed:
            raise PermanentError("the ClearML task is closed", whole_batch=True)
        names = self._names
        task_id: str = task.id if task is not None else str(self._task_id)
        events: list[_ScalarEvent] = []
        add = events.append
        params: dict[str, Any] = {}
        props: dict[str, str] = {}
        for part in Batch.of(records).parts:
            if type(part) is Scalars:
                ts = part.timestamp
                for name, value, step in part.rows:
                    pair = names.get(name)
                    if pair is None:
                        pair = names[name] = split_name(name)
                    add(_ScalarEvent(ts, "training_stats_scalar", task_id, step, pair[0],
                                     pair[1], value))
            elif type(part) is Scalar:
                pair = names.get(part.name)
                if pair is None:
                    pair = names[part.name] = split_name(part.name)
                add(_ScalarEvent(part.timestamp, "training_stats_scalar", task_id, part.step,
                                 pair[0], pair[1], part.value))
            elif type(part) is Param:
                _flatten(params, f"General/{part.name}", part.value)
            elif type(part) is Tag:
                props[part.name] = part.value
        if events:
            self._write_events(events)
        if self._session is not None:
            # steplog sync: the Task may have ended, and ClearML's Task object edits only a
            # running one.
            if params:
                force_parameters(self._session, task_id, params)
            if props:
                set_properties(self._session, task_id, props)
            return
        if params:
            task.update_parameters(params)
        if props:
            task.set_user_properties(**props)

    def _write_events(self, events: list[_ScalarEvent]) -> None:
        if self._metrics_file is not None:
            data = self._encoder.encode(events)
            if _NONFINITE_MARK in data:
                data = self._encoder.encode(self._finite(events))
            append_line(self._metrics_file, data + b"\n")
        else:
            lines = self._encoder.encode_lines(events)
            if _NONFINITE_MARK in lines:
                lines = self._encoder.encode_lines(self._finite(events))
            self._send_events(lines)

    def _finite(self, events: list[_ScalarEvent]) -> list[_ScalarEvent]:
        out = []
        for e in events:
            if not math.isfinite(e.value):
                e = msgspec.structs.replace(e, value=0.0)
                self.nonfinite += 1
                if self.nonfinite == 1:
                    # -W error must not turn this note into a failed batch.
                    with contextlib.suppress(Warning):
                        warnings.warn(
                            f"ClearML cannot store NaN or infinity: {e.metric}/{e.variant} at "
                            f"iteration {e.iter} (and any later ones) stored as 0.0, as "
                            "ClearML's report_scalar does", SteplogWarning, stacklevel=2)
            out.append(e)
        return out

    def _send_events(self, lines: bytes) -> None:
        from clearml.backend_api.services import events as api_events

        session = self._session if self._session is not None else self.task.session
        responses = session.send_request_batch(
            service="events", action="add_batch", version=api_events.AddBatchRequest._version,
            data=[lines.decode().rstrip("\n")],
        )
        for res in responses or ():
            code = getattr(res, "status_code", None)
            if code is None or code == 429 or code >= 500:
                raise RetryableError(f"ClearML events.add_batch answered {code}: "
                                     f"{response_text(res)}")
            if code != 200:
                # A refusal of the request itself: authentication, an invalid or locked task.
                raise PermanentError(f"ClearML events.add_batch answered {code}: "
                                     f"{response_text(res)}", whole_batch=True)
            refused = refused_events(res)
            if refused:
                # Some events were refused inside a 200: resending is safe (ClearML keys a
                # point by task, title, series and iteration), so the batch is split until the
                # refused points are isolated.
                raise PermanentError(f"ClearML refused {refused}")

    # -- upload lane ---------------------------------------------------------------------

    def upload(self, artifact: Artifact) -> None:
        """A policy becomes an ``OutputModel`` with its weights; anything else a Task artifact
        named ``artifact.name`` (a later one of the same name replaces it, as in ClearML)."""
        task = self.task
        if self._task_id is not None:
            raise PermanentError(
                f"steplog sync does not upload files into an earlier ClearML task (ClearML adds "
                f"artifacts and models to a running Task only): upload {artifact.name!r} into "
                f"task {self._task_id} with the ClearML SDK", whole_batch=True)
        if task is None or self._closed:
            raise PermanentError("the ClearML task is closed", whole_batch=True)
        try:
            name = safe_relpath(artifact.name)
        except (TypeError, ValueError) as exc:
            raise PermanentError(str(exc)) from exc
        if artifact.checkpoint and artifact.source and os.path.isdir(artifact.source):
            self._register_model(artifact, name, Path(artifact.source))
            return
        with self._local_copy(artifact, name) as path:
            metadata: dict[str, Any] = dict(artifact.metadata or {})
            metadata.setdefault("kind", artifact.kind)
            if artifact.step is not None:
                metadata.setdefault("step", artifact.step)
            if artifact.aliases:
                metadata.setdefault("aliases", ",".join(artifact.aliases))
            if not task.upload_artifact(name, artifact_object=path, metadata=metadata,
                                        wait_on_upload=True):
                raise RetryableError(f"ClearML did not store artifact {name!r}")

    def carry_over(self, earlier: ClearMLSink) -> None:
        """Go on from ``earlier``, the sink of the closed logger whose Task this one continues:
        weights files keep counting versions from its saves (no name is reused, so none is
        overwritten), and an offline session keeps its models (the SDK's continued Task
        starts with none and would write ``task.json`` without them)."""
        for name, version in earlier._versions.items():
            self._versions[name] = max(self._versions.get(name, 0), version)
        if self.offline and earlier.offline and self.task is not None and earlier.task is not None:
            models = list(getattr(earlier.task, "_offline_output_models", []))
            self.task._offline_output_models[:0] = models

    def _register_model(self, artifact: Artifact, name: str, snapshot: Path) -> None:
        """An ``OutputModel`` named ``name`` whose design is the snapshot's ``meta.json`` and
        whose weights are its ``model.pth`` (under a name unique to this save)."""
        from clearml import OutputModel

        meta_file = snapshot / "meta.json"
        design: dict[str, Any] = {}
        if meta_file.is_file():
            design = json.loads(meta_file.read_text())
        version = self._versions[name] = self._versions.get(name, 0) + 1
        folder = self._scratch()
        weights = folder / f"{name.replace('/', '-')}-step{artifact.step or 0}-v{version}.pth"
        try:
            link_or_copy(snapshot / "model.pth", weights)
            model = OutputModel(task=self.task, name=name, framework="PyTorch",
                                config_dict=design)
            try:
                model.update_weights(weights_filename=str(weights), iteration=artifact.step,
                                     auto_delete_file=False, async_enable=False)
            except AttributeError:
                if not self.offline:
                    raise
                # clearml 2.1.12: update_weights raises offline (its DummyModel has no
                # "locked"); this is the offline recording it would reach.
                model._update_weights_offline(weights_filename=str(weights),
                                              iteration=artifact.step)
                # ClearML writes the model record to task.json only at close; write it now,
                # so that a flush leaves it on disk.
                self.task._edit()
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _scratch(self) -> Path:
        """A new empty folder in this sink's staging directory (removed at close)."""
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix="steplog-clearml-")
        return Path(tempfile.mkdtemp(dir=self._staging))

    @contextlib.contextmanager
    def _local_copy(self, artifact: Artifact, name: str) -> Any:
        """A path ClearML may read under a meaningful, unique base name (ClearML names
        offline copies by base name), removed afterwards when it is ours."""
        if artifact.source is not None and not os.path.exists(artifact.source):
            raise PermanentError(f"artifact source {artifact.source!r} does not exist")
        if artifact.data is None and artifact.source is None:
            raise PermanentError(f"artifact {name!r} has neither data nor a source")
        if artifact.data is None and not artifact.cleanup:
            yield Path(str(artifact.source))
            return
        path = self._scratch() / name.replace("/", "-")
        try:
            if artifact.data is not None:
                path.write_bytes(artifact.data)
            else:
                link_or_copy(str(artifact.source), path)
            yield path
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)


def _flatten(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(out, f"{key}/{k}", v)
    else:
        out[key] = value
