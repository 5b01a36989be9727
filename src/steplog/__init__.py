"""steplog: experiment logging off the training step loop.

``log_*`` calls capture a value and enqueue it; a worker thread batches, retries and delivers to
files, MLflow or ClearML. ``flush()`` and ``close()`` report whether everything arrived.
"""

from steplog.checkpoints import load_policy
from steplog.errors import (
    JournalStoppedError,
    LoggerClosedError,
    PermanentError,
    RetryableError,
    SinkError,
    SteplogWarning,
)
from steplog.integrations.tensorboard import SummaryWriter
from steplog.lifecycle import State
from steplog.loggers import ClearMLLogger, FileLogger, Logger, MLFlowLogger
from steplog.pipeline import Options
from steplog.records import Artifact, Param, Scalar, Tag
from steplog.results import CloseResult, FlushResult, Loss, SinkStats, Stats
from steplog.retry import RetryPolicy
from steplog.sinks import FileSink, RunStatus, Sink
from steplog.sinks.clearml import ClearMLSink
from steplog.sinks.mlflow import MLflowSink

__all__ = [
    "Artifact",
    "ClearMLLogger",
    "ClearMLSink",
    "CloseResult",
    "FileLogger",
    "FileSink",
    "FlushResult",
    "JournalStoppedError",
    "Logger",
    "LoggerClosedError",
    "Loss",
    "MLFlowLogger",
    "MLflowSink",
    "Options",
    "Param",
    "PermanentError",
    "RetryPolicy",
    "RetryableError",
    "RunStatus",
    "Scalar",
    "Sink",
    "SinkError",
    "SinkStats",
    "State",
    "Stats",
    "SteplogWarning",
    "SummaryWriter",
    "Tag",
    "load_policy",
]

__version__ = "0.1.0"
