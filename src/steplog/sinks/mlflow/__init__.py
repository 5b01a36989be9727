"""The MLflow sink (see :mod:`steplog.sinks.mlflow.sink`): REST in the training process for
plain servers, MLflow's own client in a sink host process for everything else."""

from steplog.sinks.mlflow.common import (
    DEFAULT_TRACKING_URI,
    MAX_ENTITIES_PER_REQUEST,
    MAX_KEY_LENGTH,
    MAX_METRICS_PER_REQUEST,
    MAX_PARAM_VALUE_LENGTH,
    MAX_PARAMS_TAGS_PER_REQUEST,
    MAX_REQUEST_BYTES,
    MAX_TAG_VALUE_LENGTH,
    MOVED_FROM_TAG,
    RUN_TOKEN_TAG,
    key_problem,
    tracking_uri_problem,
)
from steplog.sinks.mlflow.sink import MLflowSink

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MAX_ENTITIES_PER_REQUEST",
    "MAX_KEY_LENGTH",
    "MAX_METRICS_PER_REQUEST",
    "MAX_PARAMS_TAGS_PER_REQUEST",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_REQUEST_BYTES",
    "MAX_TAG_VALUE_LENGTH",
    "MOVED_FROM_TAG",
    "RUN_TOKEN_TAG",
    "MLflowSink",
    "key_problem",
    "tracking_uri_problem",
]
