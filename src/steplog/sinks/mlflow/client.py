"""MLflow's own client, for stores and servers the REST transport does not serve.

:class:`ClientTransport` wraps ``MlflowClient`` (SQLAlchemy stores such as the embedded
``sqlite:///mlflow.db``, databricks, plugin stores, auth plugins, cloud artifact stores) and maps
MLflow's errors to Retryable/PermanentError. It runs in a sink host process
(:class:`HostTransport`, :mod:`steplog.host`): MLflow's imports, schema migrations and
SQLAlchemy work then use another core instead of the training process's GIL. The training
process never imports ``mlflow`` for it.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from pathlib import Path

from steplog.errors import PermanentError, RetryableError
from steplog.frames import decode_batch, encode_batch
from steplog.host import Host
from steplog.paths import link_or_copy
from steplog.records import Artifact, Batch, Scalar
from steplog.retry import setup_refused
from steplog.sinks.base import RunStatus
from steplog.sinks.mlflow.common import (
    MAX_METRICS_PER_REQUEST,
    RETRYABLE_STATUS,
    VERSION_TOKEN_TAG,
    Chunk,
    RunRef,
    about_the_request,
    exchange_limit_s,
    missing_run,
    redact_text,
    resume_problem,
    start_order,
    token_filter,
)
from steplog.sinks.mlflow.new_store import create_sqlite_store
from steplog.sinks.mlflow.sqlite_fast import RUN_NOT_WRITABLE, FastPath, open_fast_path

__all__ = ["ClientTransport", "HostTransport"]


class HostTransport:
    """The transport contract, served by a :class:`ClientTransport` in a sink host process.

    ``ClientTransport`` keeps no state a new host would miss (runs are addressed by id), so a
    host that died is replaced on the next call; retried calls are safe (MLflow stores identical
    metric rows once, accepts an unchanged param again, and ``open`` finds a run by its token).
    """

    def __init__(self, tracking_uri: str, timeout_s: float) -> None:
        self.tracking_uri = tracking_uri
        self.host = Host("steplog.sinks.mlflow.client:ClientTransport", [tracking_uri],
                         call_timeout_s=exchange_limit_s(timeout_s))

    def run_tags(self, user_tags: dict[str, str]) -> dict[str, str]:
        tags: dict[str, str] = self.host.call("api", "run_tags", user_tags)
        return tags

    def experiment_id(self, name: str) -> str:
        return str(self.host.call("api", "experiment_id", name))

    def create_run(
        self, experiment_id: str, run_name: str | None, tags: dict[str, str], start_ms: int
    ) -> RunRef:
        ref: RunRef = self.host.call("api", "create_run", experiment_id, run_name, tags,
                                     start_ms, returns=RunRef)
        return ref

    def find_run(self, experiment_id: str, token: str, running_only: bool = False,
                 since_ms: int | None = None, until_ms: int | None = None,
                 oldest: bool = False) -> RunRef | None:
        ref: RunRef | None = self.host.call("api", "find_run", experiment_id, token,
                                            running_only, since_ms, until_ms, oldest,
                                            returns=RunRef | None)
        return ref

    def resume_run(self, run_id: str, experiment_name: str, running: bool = True) -> RunRef:
        ref: RunRef = self.host.call("api", "resume_run", run_id, experiment_name, running,
                                     returns=RunRef)
        return ref

    def metrics_path(self, run_id: str) -> str | None:
        """``None`` when the host writes this run's metric points into the sqlite store's
        tables itself (:mod:`.sqlite_fast`), else why they go through ``log_batch``."""
        reason: str | None = self.host.call("api", "metrics_path", run_id)
        return reason

    def log_metrics(self, run_id: str, batch: Batch) -> None:
        """Every scalar of ``batch`` (no params or tags), in one host call: for a run on the
        fast path, which has no per-request limit."""
        self.host.call("api", "log_frame", run_id, encode_batch(batch), {}, {})

    def log_batch(self, run_id: str, chunk: Chunk) -> None:
        # The metrics travel as one journal frame (msgpack of whole blocks, ~15 ns per scalar
        # here): the host builds the records, on its own core.
        batch = Batch.of(chunk.metrics)
        frame = encode_batch(batch if chunk.rename is None else batch.renamed(chunk.rename))
        self.host.call("api", "log_frame", run_id, frame, chunk.params, chunk.tags)

    def upload(self, run: RunRef, artifact: Artifact, path: str) -> None:
        self.host.call("files", "upload", run, artifact, path)

    def end_run(self, run_id: str, status: RunStatus, end_ms: int) -> None:
        self.host.call("api", "end_run", run_id, status, end_ms)

    def register_version(
        self, model: str, run: RunRef, path: str, tags: dict[str, str]
    ) -> str:
        return str(self.host.call("files", "register_version", model, run, path, tags))

    def close(self) -> None:
        self.host.close()


# -- in the host ---------------------------------------------------------------------------------


class ClientTransport:
    """``MlflowClient`` for stores without REST (sqlite and other databases) and servers that need
    MLflow's own auth plugins. MLflow's error codes are mapped to Retryable/PermanentError."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        create_sqlite_store(tracking_uri)
        self.tracking_uri = tracking_uri
        with _mlflow_errors():  # e.g. a ./mlruns file store MLflow 3.7+ refuses
            self.client = MlflowClient(tracking_uri=tracking_uri)
        self._runs: set[str] = set()
        """Runs this client created or wrote to."""
        self._fast: FastPath | str | None = None
        """The fast path into a sqlite store, or why there is none (None: not checked yet)."""
        self._fast_runs: dict[str, str | None] = {}
        """Per run: None when its points take the fast path, else why not."""

    def close(self) -> None:
        """The fast path's connection is closed (the client holds none of its own)."""
        if isinstance(self._fast, FastPath):
            self._fast.close()

    def metrics_path(self, run_id: str) -> str | None:
        """None when this run's metric points are written by the fast path, else why they go
        through ``log_batch``: the gate is checked when the store is first opened here, the
        run's state when the run is first seen."""
        if run_id in self._fast_runs:
            return self._fast_runs[run_id]
        if self._fast is None:
            self._fast = open_fast_path(self.tracking_uri)
        fast = self._fast
        if isinstance(fast, str):
            reason: str | None = fast
        else:
            try:
                reason = fast.run_problem(run_id)
            except Exception as exc:
                reason = f"the run could not be read from the store: {exc}"
            if reason is not None:
                reason = f"{RUN_NOT_WRITABLE}: {reason}"
        self._fast_runs[run_id] = reason
        return reason

    def run_tags(self, user_tags: dict[str, str]) -> dict[str, str]:
        """MLflow's context tags (user, source, git, and those of context plugins), then
        ``user_tags``."""
        from mlflow.tracking.context.registry import resolve_tags

        return {str(k): str(v) for k, v in resolve_tags(user_tags).items()}

    def on_parent_death(self) -> None:
        """The training process died without ending its runs: end them ``KILLED``."""
        for run_id in self._runs:
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, "KILLED")

    def experiment_id(self, name: str) -> str:
        with _mlflow_errors():
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    return str(self.client.create_experiment(name))
                except Exception as exc:
                    if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                        raise
                exp = self.client.get_experiment_by_name(name)
            if exp is None or exp.lifecycle_stage == "deleted":
                raise PermanentError(f"experiment {name!r} is deleted; restore it or use another")
            return str(exp.experiment_id)

    def create_run(
        self, experiment_id: str, run_name: str | None, tags: dict[str, str], start_ms: int
    ) -> RunRef:
        with _mlflow_errors():
            run = self.client.create_run(
                experiment_id, start_time=start_ms, tags=tags, run_name=run_name
            )
        self._runs.add(run.info.run_id)
        return RunRef(run.info.run_id, experiment_id, run.info.artifact_uri)

    def find_run(self, experiment_id: str, token: str, running_only: bool = False,
                 since_ms: int | None = None, until_ms: int | None = None,
                 oldest: bool = False) -> RunRef | None:
        with _mlflow_errors():
            runs = self.client.search_runs(
                [experiment_id],
                filter_string=token_filter(token, running_only, since_ms, until_ms),
                max_results=1, order_by=start_order(oldest),
            )
        if not runs:
            return None
        info = runs[0].info
        return RunRef(info.run_id, experiment_id, info.artifact_uri, info.status,
                      info.end_time)

    def resume_run(self, run_id: str, experiment_name: str, running: bool = True) -> RunRef:
        with _mlflow_errors():
            try:
                run = self.client.get_run(run_id)
            except Exception as exc:
                if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                    raise PermanentError(missing_run(run_id, self.tracking_uri, exc)) from exc
                raise
            info = run.info
            experiment = self.client.get_experiment(info.experiment_id)
            problem = resume_problem(run_id, experiment_name, experiment.name,
                                     info.lifecycle_stage)
            if problem is not None:
                raise PermanentError(problem)
            if running:
                self.client.update_run(run_id, status="RUNNING")
        self._runs.add(run_id)
        return RunRef(run_id, str(info.experiment_id), info.artifact_uri)

    def log_frame(self, run_id: str, frame: bytes, params: dict[str, str],
                  tags: dict[str, str]) -> None:
        """:meth:`log_batch` of the scalars encoded in ``frame`` (:func:`encode_batch`), its
        metric points written by the fast path when the run takes it (params first and tags
        last through ``MlflowClient``, as ``log_batch`` applies them)."""
        batch = decode_batch(frame)
        fast = self._fast
        if self.metrics_path(run_id) is None and isinstance(fast, FastPath):
            self._runs.add(run_id)
            if params:
                self.log_batch(run_id, Chunk([], params, {}))
            fast.write(run_id, batch)
            if tags:
                self.log_batch(run_id, Chunk([], {}, tags))
            return
        metrics = [r for r in batch if type(r) is Scalar]
        for i in range(0, max(1, len(metrics)), MAX_METRICS_PER_REQUEST):
            self.log_batch(run_id, Chunk(metrics[i:i + MAX_METRICS_PER_REQUEST],
                                         params if i == 0 else {}, tags if i == 0 else {}))

    def log_batch(self, run_id: str, chunk: Chunk) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.entities import Param as MParam

        metrics = [Metric(m.name, m.value, m.timestamp, m.step) for m in chunk.metrics]
        params = [MParam(k, v) for k, v in chunk.params.items()]
        tags = [RunTag(k, v) for k, v in chunk.tags.items()]
        self._runs.add(run_id)
        with _mlflow_errors():
            self.client.log_batch(run_id, metrics, params, tags, synchronous=True)

    def end_run(self, run_id: str, status: RunStatus, end_ms: int) -> None:
        with _mlflow_errors():
            self.client.set_terminated(run_id, status, end_time=end_ms)
        self._runs.discard(run_id)

    def register_version(
        self, model: str, run: RunRef, path: str, tags: dict[str, str]
    ) -> str:
        """As :meth:`RestTransport.register_version`, through ``MlflowClient``."""
        token = f"{run.run_id}/{path}"
        with _mlflow_errors():
            try:
                self.client.create_registered_model(model)
            except Exception as exc:
                if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
            # By run only: a filter cannot name a model whose name holds both quotes.
            for version in self.client.search_model_versions(f"run_id='{run.run_id}'"):
                if version.name == model and version.tags.get(VERSION_TOKEN_TAG) == token:
                    return str(version.version)
            created = self.client.create_model_version(
                model, f"{run.artifact_uri.rstrip('/')}/{path}", run_id=run.run_id,
                tags={**tags, VERSION_TOKEN_TAG: token},
            )
        return str(created.version)

    def upload(self, run: RunRef, artifact: Artifact, path: str) -> None:
        dirname, basename = posixpath.split(path)
        with _mlflow_errors():
            if artifact.data is None and os.path.isdir(str(artifact.source)):
                self.client.log_artifacts(run.run_id, str(artifact.source), path or None)
                return
            source = None if artifact.data is not None else str(artifact.source)
            if source is not None and os.path.basename(source) == basename:
                self.client.log_artifact(run.run_id, source, dirname or None)
                return
            # log_artifact keeps the local file name: stage the payload under the wanted one.
            with tempfile.TemporaryDirectory(prefix="steplog-mlflow-") as tmp:
                staged = os.path.join(tmp, basename)
                if artifact.data is not None:
                    Path(staged).write_bytes(artifact.data)
                else:
                    link_or_copy(str(source), staged)
                self.client.log_artifact(run.run_id, staged, dirname or None)


@contextlib.contextmanager
def _mlflow_errors() -> Iterator[None]:
    """MLflow's exceptions become Retryable (HTTP 5xx/429 codes, OS errors) or PermanentError."""
    try:
        yield
    except (PermanentError, RetryableError):
        raise
    except Exception as exc:
        # A TLS setup or a URL that cannot work, also inside the MlflowException MLflow wraps
        # requests' error in (without saying it is the cause).
        if setup_refused(exc):
            raise PermanentError(redact_text(str(exc)), whole_batch=True) from exc
        if isinstance(exc, OSError):  # requests' errors among them
            raise RetryableError(redact_text(str(exc))) from exc
        status = getattr(exc, "get_http_status_code", None)
        if not callable(status):
            raise  # not MLflow's: the pipeline classifies it (requests errors are retryable)
        code = int(status())
        text = redact_text(str(exc))
        if code in RETRYABLE_STATUS or code >= 500:
            raise RetryableError(text) from exc
        error_code = str(getattr(exc, "error_code", ""))
        raise PermanentError(text, whole_batch=about_the_request(code, error_code, text)) from exc
