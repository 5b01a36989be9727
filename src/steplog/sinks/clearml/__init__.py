"""The ClearML sink (see :mod:`steplog.sinks.clearml.sink`): one ClearML Task, written in
batches; :mod:`~steplog.sinks.clearml.offline` records a run locally as an offline session, and
:mod:`~steplog.sinks.clearml.api` holds the direct API calls ``steplog sync`` makes."""

from steplog.sinks.clearml.api import CONFIG_HELP
from steplog.sinks.clearml.offline import import_command, offline_requested
from steplog.sinks.clearml.sink import ClearMLSink, split_name

__all__ = ["CONFIG_HELP", "ClearMLSink", "import_command", "offline_requested", "split_name"]
