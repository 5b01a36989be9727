"""What the MLflow sink's parts share: MLflow's limits and key rules, the request plan (a
chunk), the run reference, the transport contract, and which refusals are about a whole request."""

from __future__ import annotations

import functools
import os
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from steplog.errors import PermanentError
from steplog.records import Artifact, Scalar
from steplog.sinks.base import RunStatus

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
    "RETRYABLE_STATUS",
    "RUN_TOKEN_TAG",
    "VERSION_TOKEN_TAG",
    "Chunk",
    "RunRef",
    "Transport",
    "about_the_request",
    "absolute_uri",
    "filter_literal",
    "key_problem",
    "plugins",
    "redact",
    "token_filter",
    "tracking_uri_problem",
]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""Where runs go without ``tracking_uri`` and ``MLFLOW_TRACKING_URI`` (as in MLflow 3.7+)."""

MAX_KEY_LENGTH = 250
MAX_METRICS_PER_REQUEST = 1000
MAX_PARAMS_TAGS_PER_REQUEST = 100
MAX_ENTITIES_PER_REQUEST = 1000
MAX_REQUEST_BYTES = 1_000_000
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

VERSION_TOKEN_TAG = "steplog.snapshot"
"""Model-version tag naming the run artifact a version was made from: a retried registration
finds the version instead of creating a second one."""
MOVED_FROM_TAG = "steplog.moved_from"
"""Tag of a run that ``steplog sync --to`` created: the tracking URI and run id (or experiment)
of the run whose missing records it received."""
RUN_TOKEN_TAG = "steplog.run_token"
"""Tag set on the run at creation, so a retried ``open`` finds the run a lost answer created."""

# MLflow's rule on POSIX servers (a Windows server also refuses ':'); \w is Unicode-aware, as
# in MLflow's own check, which runs the same regex on the same str.
_KEY_CHARS = re.compile(r"[/\w.\- :]*")
RETRYABLE_STATUS = frozenset({408, 429})


_BUILTIN_SCHEMES = frozenset({
    "", "file", "http", "https", "databricks", "databricks-uc", "uc",
    "sqlite", "postgresql", "mysql", "mssql",
})  # fmt: skip
"""Tracking URI schemes MLflow itself knows (database schemes may carry a ``+driver``)."""


def exchange_limit_s(request_timeout_s: float) -> float:
    """The longest one call to the server may take as a whole, answer included:
    ``max(60 s, 2 x request_timeout_s)`` (``request_timeout_s`` bounds each wait in it)."""
    return max(60.0, 2 * request_timeout_s)


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative local path (``sqlite:///mlflow.db``, a plain path or a relative
    ``file:`` URI: a file store) made absolute against the working directory now; any other
    URI as it is."""
    if uri in ("databricks", "databricks-uc", "uc"):
        return uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path, mark, query = uri[len("sqlite:///"):].partition("?")
        scheme = "file:" if path.startswith("file:") else ""  # SQLite's own URI form
        path = path[len(scheme):]
        if path in ("", ":memory:") or path.startswith("/"):
            return uri  # in memory, or absolute already
        return "sqlite:///" + scheme + os.path.abspath(path) + mark + query
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "" or len(parts.scheme) == 1:  # a plain path (or a Windows drive)
        return os.path.abspath(uri)
    if parts.scheme == "file" and not parts.netloc and not parts.path.startswith("/"):
        return "file://" + os.path.abspath(parts.path)
    return uri


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow could never use ``uri`` as a tracking URI; ``None`` when it may.

    Refused: an unknown scheme (unless an installed MLflow plugin registers it), an
    ``http(s)`` URI without a host, and a local file store, which MLflow 3.7+ refuses unless
    ``MLFLOW_ALLOW_FILE_STORE`` is true. Reaching the server is checked later, with retries.
    """
    if uri in ("databricks", "databricks-uc", "uc"):
        return None  # MLflow's bare forms of these stores
    if re.fullmatch(r"[\w.-]+:\d+", uri):  # host:port, as in "localhost:5000"
        return (f"tracking URI {uri!r} has no scheme MLflow knows; did you mean "
                f"http://{uri}?")
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError as exc:  # "http://[bad": an unclosed IPv6 bracket
        return f"tracking URI {redact_text(uri)!r} cannot be parsed ({exc})"
    scheme = parts.scheme.lower()
    if len(scheme) == 1:
        scheme = ""  # a Windows drive letter: a local path
    base = scheme.split("+", 1)[0]
    if base in ("http", "https"):
        return None if parts.hostname else f"tracking URI {redact(uri)!r} has no host"
    if base in ("", "file"):
        allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower()
        if allowed not in ("true", "1"):
            return (
                f"tracking URI {uri!r} is a local file store, which MLflow 3.7+ refuses unless "
                "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///mlflow.db (the default) or a "
                "server's http:// URI"
            )
        return None
    if base in _BUILTIN_SCHEMES or scheme in _BUILTIN_SCHEMES or _plugin_scheme(scheme):
        return None
    return (
        f"tracking URI {redact(uri)!r} has a scheme MLflow does not know ({scheme!r}). "
        "Known: http(s)://host, sqlite:///path, postgresql://, mysql://, mssql://, databricks"
    )


def _plugin_scheme(scheme: str) -> bool:
    return scheme in plugins("mlflow.tracking_store")


@functools.cache
def plugins(group: str) -> frozenset[str]:
    """The names of the installed MLflow plugins of entry-point ``group``, read once per process,
    as MLflow reads its own plugin registries when it is imported (a scan of every installed
    package's metadata costs about 15 ms of CPU)."""
    from importlib.metadata import entry_points

    return frozenset(ep.name for ep in entry_points(group=group))


def key_problem(name: str) -> str | None:
    """Why MLflow would refuse ``name`` as a metric, param or tag key; ``None`` if it is valid."""
    if not isinstance(name, str):
        return f"key must be a str, got {type(name).__name__}"
    if not name:
        return "key is empty"
    if len(name) > MAX_KEY_LENGTH:
        return f"key {name[:40]!r}... has {len(name)} characters; MLflow allows {MAX_KEY_LENGTH}"
    if _KEY_CHARS.fullmatch(name) is None:
        return (
            f"key {name!r} has characters MLflow refuses; allowed: alphanumerics, "
            "'_', '-', '.', '/', ' ' and ':'"
        )
    normal = posixpath.normpath(name)
    if normal == ".":
        return f"key {name!r} names the run's own folder; MLflow refuses it"
    if normal != name or normal.startswith(("/", "..")):
        return (
            f"key {name!r} is not a normalised relative path (MLflow would read it as {normal!r})"
        )
    return None

@dataclass
class Chunk:
    """One ``log-batch`` request: within MLflow's per-request limits (count; bytes are checked
    by the REST transport, which splits a chunk that encodes to more than 1 MB)."""

    metrics: Sequence[Scalar] = field(default_factory=list)
    """A :class:`~steplog.records.Batch` slice when planned from a pipeline batch (encoded
    from its blocks), a list of records in the sink host."""
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    rename: Callable[[str], str] | None = None
    """The name each metric is stored under (a rank's prefix in a shared run), applied when the
    request is encoded; ``None``: its own name."""

    def settings_room(self) -> bool:
        n = len(self.params) + len(self.tags)
        return n < MAX_PARAMS_TAGS_PER_REQUEST and n + len(self.metrics) < MAX_ENTITIES_PER_REQUEST

    def metric_room(self) -> int:
        used = len(self.metrics)
        return min(
            MAX_METRICS_PER_REQUEST - used,
            MAX_ENTITIES_PER_REQUEST - used - len(self.params) - len(self.tags),
        )

    def __bool__(self) -> bool:
        return bool(self.metrics or self.params or self.tags)

    def halves(self) -> tuple[Chunk, Chunk]:
        """Two smaller chunks that together hold this one (for a request over the byte limit).

        The server applies a request's params, metrics and tags as three sets, so moving
        entries between requests of one chunk changes nothing but the request count.
        """
        settings = [(k, v, True) for k, v in self.params.items()]
        settings += [(k, v, False) for k, v in self.tags.items()]
        if self.metrics and settings:
            return Chunk([], self.params, self.tags), Chunk(self.metrics, rename=self.rename)
        if len(self.metrics) > 1:
            mid = len(self.metrics) // 2
            return (Chunk(self.metrics[:mid], rename=self.rename),
                    Chunk(self.metrics[mid:], rename=self.rename))
        if len(settings) < 2:
            raise PermanentError("a single entry exceeds MLflow's 1 MB request limit")
        first, second = Chunk(), Chunk()
        for i, (k, v, is_param) in enumerate(settings):
            target = first if i < len(settings) // 2 else second
            (target.params if is_param else target.tags)[k] = v
        return first, second


@dataclass(frozen=True)
class RunRef:
    run_id: str
    experiment_id: str
    artifact_uri: str
    status: str = "RUNNING"
    """The run's status when it was found (``find_run``); RUNNING for a run just opened."""
    end_ms: int | None = None
    """When the run ended (ms since the epoch), as ``find_run`` found it; None while it runs."""


class Transport(Protocol):
    """What the sink needs from a backend; every method raises Retryable/PermanentError."""

    def run_tags(self, user_tags: dict[str, str]) -> dict[str, str]: ...
    def experiment_id(self, name: str) -> str: ...
    def create_run(
        self, experiment_id: str, run_name: str | None, tags: dict[str, str], start_ms: int
    ) -> RunRef: ...
    def find_run(
        self, experiment_id: str, token: str, running_only: bool = False,
        since_ms: int | None = None, until_ms: int | None = None, oldest: bool = False,
    ) -> RunRef | None:
        """The newest (``oldest``: the oldest) run tagged with ``token`` (``running_only``:
        still RUNNING; ``since_ms``, ``until_ms``: started then or later, then or earlier), if
        any, with its status and end time."""
    def resume_run(self, run_id: str, experiment_name: str, running: bool = True) -> RunRef:
        """The existing run ``run_id`` of ``experiment_name``, set RUNNING again when
        ``running``; :class:`PermanentError` when it does not exist, is deleted or is another
        experiment's."""
    def log_batch(self, run_id: str, chunk: Chunk) -> None: ...
    def upload(self, run: RunRef, artifact: Artifact, path: str) -> None: ...
    def register_version(
        self, model: str, run: RunRef, path: str, tags: dict[str, str]
    ) -> str: ...
    def end_run(self, run_id: str, status: RunStatus, end_ms: int) -> None: ...
    def close(self) -> None: ...


def resume_problem(run_id: str, experiment_name: str, run_experiment: str | None,
                   lifecycle_stage: str) -> str | None:
    """Why the run ``run_id`` (of the experiment named ``run_experiment``, in
    ``lifecycle_stage``) cannot be continued as a run of ``experiment_name``, or None."""
    if lifecycle_stage == "deleted":
        return (f"MLflow run {run_id} is deleted; restore it (mlflow runs restore --run-id "
                f"{run_id}) or log into a new run")
    if run_experiment != experiment_name:
        return (f"MLflow run {run_id} belongs to experiment {run_experiment!r}, not "
                f"{experiment_name!r}")
    return None


def missing_run(run_id: str, where: str, answer: object) -> str:
    return f"MLflow run {run_id} does not exist in {redact(where)} (the answer: {answer})"


def token_filter(token: str, running_only: bool = False, since_ms: int | None = None,
                 until_ms: int | None = None) -> str:
    """The search filter of the runs tagged with ``token`` (and still RUNNING, and started at
    ``since_ms`` or later, at ``until_ms`` or earlier)."""
    quoted = filter_literal(token)
    if quoted is None:  # a token is hex text: never so
        raise ValueError(f"a run token holding both quote characters: {token!r}")
    text = f"tags.`{RUN_TOKEN_TAG}` = {quoted}"
    if running_only:
        text += " and attributes.status = 'RUNNING'"
    if since_ms is not None:
        text += f" and attributes.start_time >= {int(since_ms)}"
    if until_ms is not None:
        text += f" and attributes.start_time <= {int(until_ms)}"
    return text


def start_order(oldest: bool) -> list[str]:
    """The search order of :meth:`Transport.find_run`: newest first, or oldest first."""
    return [f"attributes.start_time {'ASC' if oldest else 'DESC'}"]


def filter_literal(text: str) -> str | None:
    """``text`` quoted as a value of an MLflow search filter, which takes what lies between
    its quotes literally (a backslash escapes nothing): in single quotes, or in double quotes
    when it holds a single one; ``None`` when it holds both (no filter can name it)."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return None


def redact(uri: str) -> str:
    """``uri`` without a password or user in its network location."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:  # not even a URL to split: user information is taken out as text
        return redact_text(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/]*@")
"""A URL's scheme and user information: up to the last ``@`` before the path. A password may
hold ``@``, ``?`` or ``#`` (urllib3 reads it so), so an ``@`` in a query with no path before
it is taken too: in doubt, more goes."""


def redact_text(text: str) -> str:
    """``text`` with the user and password taken out of every URL in it (MLflow's error
    messages quote the tracking URI as given)."""
    return _USERINFO.sub(r"\1", text) if "@" in text else text


_WHOLE_REQUEST_CODES = frozenset({401, 403, 404, 405})
_WHOLE_REQUEST_ERRORS = frozenset(
    {"INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_DOES_NOT_EXIST"}
)


_RUN_NOT_ACTIVE = "must be in the 'active' state"
"""MLflow 3.17 refuses writes to a deleted run with a 400 INVALID_PARAMETER_VALUE saying this."""


def about_the_request(code: int, error_code: str, message: str) -> bool:
    """True when MLflow refused the request as a whole (auth, a deleted or missing run), so
    splitting the batch to find a bad entry would only repeat the refusal."""
    return (
        code in _WHOLE_REQUEST_CODES
        or error_code in _WHOLE_REQUEST_ERRORS
        or _RUN_NOT_ACTIVE in message
    )

