"""The seed's logger classes: ``FileLogger``, ``MLFlowLogger`` and ``ClearMLLogger``, each a
:class:`~steplog.logger.Logger` with one sink (``Logger`` itself is re-exported here, where the
seed's code imports it from)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from steplog.logger import Logger
from steplog.pipeline import Options
from steplog.sinks.clearml import ClearMLSink
from steplog.sinks.file import Existing, FileSink, Offload
from steplog.sinks.mlflow import MLflowSink
from steplog.system import SystemSampler

__all__ = ["ClearMLLogger", "FileLogger", "Logger", "MLFlowLogger"]


@Logger.register("file")
class FileLogger(Logger):
    """Logs into a directory of plain files (see :mod:`steplog.sinks.file` for the layout).

    ``existing`` says what happens when ``output_dir`` already holds a run: ``"aside"``
    (default) moves that run's files into ``previous/<time>/`` first, ``"append"`` continues
    it, ``"error"`` raises ``FileExistsError``. An unwritable directory raises at once.
    ``offload`` says where the scalar lines are encoded and written (see
    :data:`steplog.sinks.file.Offload`): by default, in a writer process once the rate is high.
    """

    def __init__(
        self, output_dir: str | os.PathLike[str], logging_freq: int = 1, *,
        options: Options | None = None, existing: Existing = "aside", offload: Offload = "auto",
    ) -> None:
        self.output_dir = os.fspath(output_dir)
        self._offload: Offload = offload
        sink = FileSink(self.output_dir, existing=existing, offload=offload)
        super().__init__(logging_freq, sinks=[sink], options=options)

    def continued(self) -> FileLogger:
        """A :class:`FileLogger` appending to this closed logger's run (see
        :meth:`Logger.continued`)."""
        self._check_continuable()
        return self._continue_with(FileLogger(
            self.output_dir, self.logging_freq, options=self._given_options, existing="append",
            offload=self._offload))


@Logger.register("mlflow")
class MLFlowLogger(Logger):
    """Logs one MLflow run through :class:`~steplog.sinks.mlflow.MLflowSink`.

    ``tracking_uri=None`` uses ``MLFLOW_TRACKING_URI``, else the embedded default
    ``sqlite:///mlflow.db``. The run is created on the worker right away (``run_id`` is ``None``
    until then) and ended at close: ``FINISHED``, or ``FAILED``/``KILLED`` when the process dies
    of an exception or a signal. ``log_system_metrics=True`` samples CPU, memory and GPU every
    ``system_metrics_interval_s`` seconds into the same run (needs psutil; GPUs need pynvml).
    ``tags`` are set on the run when it is created. With ``registered_model_name``, every
    ``save_policy`` also creates a new version of that registered model, whose source is the
    snapshot's run artifact and whose ``step`` tag is its step. ``max_in_flight`` (default:
    ``STEPLOG_MLFLOW_MAX_IN_FLIGHT``, else 1): most ``log-batch`` requests in flight at once to a
    tracking server with several workers (see docs/mlflow-server.md).

    ``run_id`` logs on into that existing run of ``experiment_name`` instead of creating one
    (a job restarted after a pre-emption, a later stage): the worker sets it ``RUNNING`` again
    and the close ends it as usual; ``run_name`` and ``tags`` are then not applied. A run that
    does not exist, is deleted or belongs to another experiment can never be written: every
    record is refused with that reason (a warning, a falsy close result). It continues one
    run, so it needs the rank policy ``"zero"``. Automatic steps start from 0 again: give
    steps explicitly.
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
        registered_model_name: str | None = None,
        max_in_flight: int | None = None,
        run_id: str | None = None,
    ) -> None:
        self.experiment_name = experiment_name
        self.run_name = run_name
        self._settings: dict[str, Any] = {
            "log_system_metrics": log_system_metrics,
            "system_metrics_interval_s": system_metrics_interval_s,
            "request_timeout_s": request_timeout_s,
            "registered_model_name": registered_model_name,
            "max_in_flight": max_in_flight,
            "tags": tags,
        }
        """What :meth:`continued` builds its logger with (besides the run)."""
        self.sink = MLflowSink(experiment_name, tracking_uri=tracking_uri, run_name=run_name,
                               request_timeout_s=request_timeout_s,
                               tags=dict(tags) if tags is not None else None,
                               registered_model_name=registered_model_name,
                               max_in_flight=max_in_flight, run_id=run_id)
        # Check the optional dependency before any thread starts.
        sampler = None
        if log_system_metrics and self._rank_plan.samples_system:  # one sampler per node
            sampler = SystemSampler(self._log_sample, system_metrics_interval_s)
        super().__init__(logging_freq, sinks=[self.sink], options=options)
        if sampler is not None:
            self._life.helpers.append(sampler)
            sampler.start()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the worker created (or continued) the run."""
        return self.sink.run_id

    def continued(self) -> MLFlowLogger:
        """An :class:`MLFlowLogger` logging on into this closed logger's run, with the same
        tracking URI and settings (see :meth:`Logger.continued`); ``RuntimeError`` when the run
        was never created, ``NotImplementedError`` under the rank policy ``"all"`` or
        ``"own"`` (a run shared by the ranks, or one per rank)."""
        if self.sink.ranks is not None:
            raise NotImplementedError(
                f"steplog: under the rank policy {self.sink.ranks['policy']!r} the ranks log "
                "into a shared run or one run each, which a later logger cannot continue")
        self._check_continuable()
        run_id = self.run_id
        if run_id is None:
            raise RuntimeError(f"steplog: this MLFlowLogger's run was never created "
                               f"({self.sink.describe()}), so there is no run to log on into")
        return self._continue_with(MLFlowLogger(
            self.experiment_name, tracking_uri=self.sink.tracking_uri, run_name=self.run_name,
            logging_freq=self.logging_freq, options=self._given_options, run_id=run_id,
            **self._settings))


@Logger.register("clearml")
class ClearMLLogger(Logger):
    """Logs one ClearML Task through :class:`~steplog.sinks.clearml.ClearMLSink`.

    The Task is created under ``project_name`` when the logger is built; :attr:`task` is the
    real ``clearml.Task`` and ``_logger`` its ``clearml.Logger``, for direct ClearML calls.
    Scalars named ``"group/metric"`` are stored as title ``group``, series ``metric`` (no slash:
    title ``"metrics"``); parameters are merged into the Task's hyperparameters (``General``);
    ``save_agent`` and ``log_artifact`` store Task artifacts; ``save_policy`` registers an
    ``OutputModel`` with its weights.

    ``offline=True`` (or ``CLEARML_OFFLINE_MODE=1``) records the run locally as a ClearML offline
    session. Otherwise ClearML's configuration (``clearml-init`` or ``CLEARML_API_*``) is needed:
    without it, construction raises ``ValueError`` naming the fixes; a server that does not
    answer within ``connect_timeout_s`` makes the run an offline session, and the close result
    is falsy with the command that uploads it. ``tags`` are Task tags; ``task_init_kwargs``
    override steplog's ``Task.init`` arguments (see :mod:`steplog.sinks.clearml.sink`).

    A run on a ClearML server journals its metric records (:attr:`run_dir`) and
    ``steplog sync`` sends what the server did not store into the same Task; an offline session
    is not journaled (its files are the record).
    """

    def __init__(
        self,
        project_name: str,
        task_name: str,
        logging_freq: int = 1,
        *,
        offline: bool | None = None,
        tags: Sequence[str] | None = None,
        output_uri: str | None = None,
        connect_timeout_s: float = 5.0,
        task_init_kwargs: Mapping[str, Any] | None = None,
        options: Options | None = None,
    ) -> None:
        self.project_name = project_name
        self.task_name = task_name
        self._settings: dict[str, Any] = {
            "tags": tags, "output_uri": output_uri, "connect_timeout_s": connect_timeout_s,
            "task_init_kwargs": dict(task_init_kwargs or {}),
        }
        """What :meth:`continued` builds its logger with (besides the Task)."""
        self.sink = ClearMLSink(project_name, task_name, offline=offline, tags=tags,
                                output_uri=output_uri, connect_timeout_s=connect_timeout_s,
                                task_init_kwargs=task_init_kwargs)
        super().__init__(logging_freq, sinks=[self.sink], options=options)
        self.task = self.sink.task
        self._logger = self.task.get_logger()

    def continued(self) -> ClearMLLogger:
        """A :class:`ClearMLLogger` logging on into this closed logger's Task, with the same
        settings (see :meth:`Logger.continued`): ``Task.init(continue_last_task=<its id>)``,
        online or in the same offline session, with no iteration offset (steps are stored as
        given)."""
        if self.sink.task_name != self.task_name:  # one Task per rank (ranks="own")
            raise NotImplementedError(
                "steplog: under the rank policy 'own' each rank logs into its own Task, which "
                "a later logger cannot continue")
        self._check_continuable()
        settings = self._settings
        init = {**settings["task_init_kwargs"], "continue_last_task": self.task.id}
        logger = ClearMLLogger(self.project_name, self.task_name, self.logging_freq,
                               offline=self.sink.offline, tags=settings["tags"],
                               output_uri=settings["output_uri"],
                               connect_timeout_s=settings["connect_timeout_s"],
                               task_init_kwargs=init, options=self._given_options)
        if logger.task is not None:
            logger.task.set_initial_iteration(0)  # ClearML would add the last iteration
        logger.sink.carry_over(self.sink)
        return self._continue_with(logger)

    @property
    def offline_session(self) -> str | None:
        """The folder of the ClearML offline session (``None`` when the run goes to a server)."""
        return self.sink.session_folder
