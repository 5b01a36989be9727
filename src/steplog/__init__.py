"""steplog: experiment logging off the training step loop.

``log_*`` calls capture a value and enqueue it; a worker thread batches, retries and delivers to
files, MLflow or ClearML. ``flush()`` and ``close()`` report whether everything arrived.
"""

from steplog.errors import LoggerClosedError, PermanentError, RetryableError, SinkError
from steplog.loggers import FileLogger, Logger
from steplog.pipeline import Options, SteplogWarning
from steplog.records import Artifact, Param, Scalar, Tag
from steplog.results import CloseResult, FlushResult, Rejection, SinkStats, Stats
from steplog.retry import RetryPolicy
from steplog.sinks import FileSink, RunStatus, Sink

__all__ = [
    "Artifact",
    "CloseResult",
    "FileLogger",
    "FileSink",
    "FlushResult",
    "Logger",
    "LoggerClosedError",
    "Options",
    "Param",
    "PermanentError",
    "Rejection",
    "RetryPolicy",
    "RetryableError",
    "RunStatus",
    "Scalar",
    "Sink",
    "SinkError",
    "SinkStats",
    "Stats",
    "SteplogWarning",
    "Tag",
]

__version__ = "0.1.0"
