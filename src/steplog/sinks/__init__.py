"""Backends. Each sink module imports its backend lazily, so importing steplog stays light."""

from typing import Any

from steplog.sinks.base import RunStatus, Sink
from steplog.sinks.file import FileSink

__all__ = ["FileSink", "RunStatus", "Sink", "reattach", "redirect"]


def reattach(kind: str, target: dict[str, Any]) -> Sink:
    """The sink of kind ``kind`` for the run ``target`` describes (see :meth:`Sink.target`)."""
    if kind == "file":
        return FileSink.reattach(target)
    if kind == "mlflow":
        from steplog.sinks.mlflow import MLflowSink

        return MLflowSink.reattach(target)
    if kind == "clearml":
        from steplog.sinks.clearml import ClearMLSink

        return ClearMLSink.reattach(target)
    raise ValueError(f"no {kind!r} sink can upload into an earlier run")


def redirect(kind: str, target: dict[str, Any], tracking_uri: str) -> dict[str, Any]:
    """The target of a new MLflow run at ``tracking_uri`` for what the run ``target`` describes
    lacks (see :meth:`MLflowSink.redirected`); ``ValueError`` for a sink that is not MLflow's."""
    if kind == "mlflow":
        from steplog.sinks.mlflow import MLflowSink

        return MLflowSink.redirected(target, tracking_uri)
    raise ValueError(f"a {kind} sink cannot be moved to an MLflow run (only MLflow sinks can)")
