"""Backends. Each sink module imports its backend lazily, so importing steplog stays light."""

from steplog.sinks.base import RunStatus, Sink
from steplog.sinks.file import FileSink

__all__ = ["FileSink", "RunStatus", "Sink"]
