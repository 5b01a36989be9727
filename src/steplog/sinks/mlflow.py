"""The MLflow sink: one MLflow run, written with ``log-batch`` requests.

Two transports, chosen in :meth:`MLflowSink.open` from the tracking URI:

* ``http(s)://`` (a tracking server): the sink speaks MLflow's REST API itself over persistent
  ``requests`` sessions (one per lane), with our timeout and no retries of its own, so the
  pipeline's retry policy is the only one in play. A batch is encoded to JSON by msgspec in one
  pass (no protobuf entity per metric). Artifacts go through the server's artifact proxy when the
  run's artifact URI is ``mlflow-artifacts:``; other artifact stores use MLflow's own client.
  Servers that need an auth plugin, AWS SigV4, the Databricks SDK or a workspace header use
  the ``MlflowClient`` transport below, for fidelity over speed.
* anything else (``sqlite:///mlflow.db``, other databases, ``databricks``): ``MlflowClient``.

``mlflow`` and ``requests`` are imported in :meth:`MLflowSink.open`, never when steplog is imported.

Values: parameter values are stored as ``str(value)`` (MLflow's own convention) truncated to
6000 characters, tag values truncated to 8000, as MLflow would. NaN is stored as NaN; MLflow
stores +/-infinity as +/-``sys.float_info.max``.
"""

from __future__ import annotations

import contextlib
import math
import mimetypes
import os
import posixpath
import re
import shutil
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import msgspec

from steplog.errors import PermanentError, RetryableError
from steplog.paths import safe_relpath
from steplog.records import Artifact, MetricRecord, Param, Scalar, Tag, now_ms
from steplog.sinks.base import RunStatus, Sink

__all__ = ["DEFAULT_TRACKING_URI", "MLflowSink", "key_problem", "tracking_uri_problem"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""Where runs go without ``tracking_uri`` and ``MLFLOW_TRACKING_URI`` (as in MLflow 3.7+)."""

MAX_KEY_LENGTH = 250
MAX_METRICS_PER_REQUEST = 1000
MAX_PARAMS_TAGS_PER_REQUEST = 100
MAX_ENTITIES_PER_REQUEST = 1000
MAX_REQUEST_BYTES = 1_000_000
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

RUN_TOKEN_TAG = "steplog.run_token"
"""Tag set on the run at creation, so a retried ``open`` finds the run a lost answer created."""

# MLflow's rule on POSIX servers (a Windows server also refuses ':'); \w is Unicode-aware, as
# in MLflow's own check, which runs the same regex on the same str.
_KEY_CHARS = re.compile(r"[/\w.\- :]*")
_NAME = attrgetter("name")
_VALUE = attrgetter("value")
_RETRYABLE_STATUS = frozenset({408, 429})
_INF = math.inf


_BUILTIN_SCHEMES = frozenset({
    "", "file", "http", "https", "databricks", "databricks-uc", "uc",
    "sqlite", "postgresql", "mysql", "mssql",
})  # fmt: skip
"""Tracking URI schemes MLflow itself knows (database schemes may carry a ``+driver``)."""


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow could never use ``uri`` as a tracking URI; ``None`` when it may.

    Refused: an unknown scheme (unless an installed MLflow plugin registers it), an
    ``http(s)`` URI without a host, and a local file store, which MLflow 3.7+ refuses unless
    ``MLFLOW_ALLOW_FILE_STORE`` is true. Reaching the server is checked later, with retries.
    """
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if len(scheme) == 1:
        scheme = ""  # a Windows drive letter: a local path
    base = scheme.split("+", 1)[0]
    if base in ("http", "https"):
        return None if parts.hostname else f"tracking URI {_redact(uri)!r} has no host"
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
    hint = ""
    if parts.path.isdigit():  # host:port, as in "localhost:5000"
        hint = f"; did you mean http://{uri}?"
    return (
        f"tracking URI {_redact(uri)!r} has a scheme MLflow does not know ({scheme!r}){hint} "
        "Known: http(s)://host, sqlite:///path, postgresql://, mysql://, mssql://, databricks"
    )


def _plugin_scheme(scheme: str) -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == scheme for ep in entry_points(group="mlflow.tracking_store"))


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
    if normal != name or normal.startswith(("/", "..")):
        return (
            f"key {name!r} is not a normalised relative path (MLflow would read it as {normal!r})"
        )
    return None


@dataclass
class _Chunk:
    """One ``log-batch`` request: within MLflow's per-request limits (count; bytes are checked
    by the REST transport, which splits a chunk that encodes to more than 1 MB)."""

    metrics: list[Scalar] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

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

    def halves(self) -> tuple[_Chunk, _Chunk]:
        """Two smaller chunks that together hold this one (for a request over the byte limit).

        The server applies a request's params, metrics and tags as three sets, so moving
        entries between requests of one chunk changes nothing but the request count.
        """
        settings = [(k, v, True) for k, v in self.params.items()]
        settings += [(k, v, False) for k, v in self.tags.items()]
        if self.metrics and settings:
            return _Chunk([], self.params, self.tags), _Chunk(self.metrics)
        if len(self.metrics) > 1:
            mid = len(self.metrics) // 2
            return _Chunk(self.metrics[:mid]), _Chunk(self.metrics[mid:])
        if len(settings) < 2:
            raise PermanentError("a single entry exceeds MLflow's 1 MB request limit")
        first, second = _Chunk(), _Chunk()
        for i, (k, v, is_param) in enumerate(settings):
            target = first if i < len(settings) // 2 else second
            (target.params if is_param else target.tags)[k] = v
        return first, second


@dataclass(frozen=True)
class _RunRef:
    run_id: str
    experiment_id: str
    artifact_uri: str


class _Transport(Protocol):
    """What the sink needs from a backend; every method raises Retryable/PermanentError."""

    def experiment_id(self, name: str) -> str: ...
    def create_run(
        self, experiment_id: str, run_name: str | None, tags: dict[str, str], start_ms: int
    ) -> _RunRef: ...
    def find_run(self, experiment_id: str, token: str) -> _RunRef | None: ...
    def log_batch(self, run_id: str, chunk: _Chunk) -> None: ...
    def upload(self, run: _RunRef, artifact: Artifact, path: str) -> None: ...
    def end_run(self, run_id: str, status: RunStatus, end_ms: int) -> None: ...
    def close(self) -> None: ...


class MLflowSink(Sink):
    """Writes one MLflow run: every record of a successful :meth:`write` is stored, in call
    order, and a failed ``write`` may be retried as a whole without creating duplicates."""

    kind: ClassVar[str] = "mlflow"
    max_batch = 1000

    def __init__(
        self,
        experiment_name: str,
        *,
        tracking_uri: str | None = None,
        run_name: str | None = None,
        request_timeout_s: float = 30.0,
        tags: dict[str, str] | None = None,
    ) -> None:
        if not isinstance(experiment_name, str) or not experiment_name:
            raise ValueError("experiment_name must be a non-empty str")
        if request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        self.experiment_name = experiment_name
        self.tracking_uri = (
            tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        )
        self.run_name = run_name
        self.request_timeout_s = request_timeout_s
        """Longest wait to connect, or for the server's next bytes, per HTTP request (s)."""
        self._user_tags = dict(tags or {})
        self._token = uuid.uuid4().hex
        self._transport: _Transport | None = None
        self._run: _RunRef | None = None
        self._create_tried = False
        self._params: dict[str, str] = {}
        """Params the server acknowledged, as stored: a changed value is refused locally."""
        self._good_keys: set[str] = set()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, ``None`` until :meth:`open` succeeded."""
        return None if self._run is None else self._run.run_id

    @property
    def experiment_id(self) -> str | None:
        """The MLflow experiment id, ``None`` until :meth:`open` succeeded."""
        return None if self._run is None else self._run.experiment_id

    def describe(self) -> str:
        where = _redact(self.tracking_uri)
        if self._run is None:
            return f"mlflow {where} experiment {self.experiment_name!r}"
        if where.startswith(("http://", "https://")):
            run = self._run
            return f"{where.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
        return f"mlflow {where} run {self._run.run_id}"

    # -- lifecycle ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Refuse a tracking URI MLflow can never use (``ValueError``), before any thread starts."""
        problem = tracking_uri_problem(self.tracking_uri)
        if problem is not None:
            raise ValueError(problem)
        # mlflow and requests import concurrent.futures.thread, which cannot be imported on a
        # worker thread once the interpreter started shutting down (a short script that exits
        # before the run was opened): import it here, on the caller's thread.
        import concurrent.futures.thread  # noqa: F401

    def open(self) -> None:
        """The experiment exists and this sink's run is RUNNING; safe to call again after a
        failure (a run created by an attempt whose answer was lost is found, not duplicated)."""
        if self._run is not None:
            return
        if self._transport is None:
            self._transport = _make_transport(self.tracking_uri, self.request_timeout_s)
        transport = self._transport
        exp_id = transport.experiment_id(self.experiment_name)
        if self._create_tried:
            found = transport.find_run(exp_id, self._token)
            if found is not None:
                self._run = found
                return
        from mlflow.tracking.context.registry import resolve_tags

        tags = {str(k): str(v) for k, v in resolve_tags(self._user_tags).items()}
        tags[RUN_TOKEN_TAG] = self._token
        self._create_tried = True
        self._run = transport.create_run(exp_id, self.run_name, tags, now_ms())

    def close(self, status: RunStatus) -> None:
        """The run is ended with ``status`` and the connections are closed (no-op if never
        opened; safe to call again after a failure)."""
        if self._transport is None:
            return
        if self._run is not None:
            self._transport.end_run(self._run.run_id, status, now_ms())
        self._transport.close()
        self._transport = None

    # -- metrics lane ------------------------------------------------------------------------

    def check_name(self, name: str) -> None:
        """Raise ``ValueError`` if MLflow refuses ``name`` as a key (length, characters, path)."""
        problem = key_problem(name)
        if problem is not None:
            raise ValueError(problem)
        self._good_keys.add(name)

    def write(self, records: Sequence[MetricRecord]) -> None:
        """Store the batch with as few ``log-batch`` requests as MLflow's limits allow.

        The batch is validated before any request is sent: a bad key or a param whose value
        differs from one logged earlier in this run raises :class:`PermanentError` naming it,
        and nothing is sent. A failure part way leaves only what a retry of the same batch
        writes again identically (metric rows are stored once; params with the same value and
        tags are accepted again).
        """
        if self._run is None or self._transport is None:
            raise RetryableError("the MLflow run is not open yet")
        if not records:
            return
        chunks = self._plan(records if isinstance(records, (list, tuple)) else list(records))
        run_id = self._run.run_id
        for chunk in chunks:
            self._transport.log_batch(run_id, chunk)
            if chunk.params:
                self._params.update(chunk.params)

    def _plan(self, records: Sequence[MetricRecord]) -> list[_Chunk]:
        """Validate ``records`` and cut them into requests, keeping call order between requests."""
        unknown = set(map(_NAME, records)) - self._good_keys
        for key in unknown:
            problem = key_problem(key)
            if problem is not None:
                raise PermanentError(problem)
        self._good_keys |= unknown

        kinds = list(map(type, records))
        n = len(records)
        if kinds.count(Scalar) == n:  # the common case: no per-record Python work
            step = MAX_METRICS_PER_REQUEST
            scalars = cast("Sequence[Scalar]", records)
            return [_Chunk(list(scalars[i : i + step])) for i in range(0, n, step)]

        chunks: list[_Chunk] = []
        cur = _Chunk()
        pending: dict[str, str] = {}
        start = 0
        for i in [i for i, k in enumerate(kinds) if k is not Scalar] + [n]:
            run: Sequence[Any] = records[start:i]
            while run:
                room = cur.metric_room()
                if room <= 0:
                    chunks.append(cur)
                    cur = _Chunk()
                    continue
                cur.metrics.extend(run[:room])
                run = run[room:]
            start = i + 1
            if i == n:
                break
            rec = records[i]
            if kinds[i] is Param:
                value = _param_str(rec.value)
                before = self._params.get(rec.name, pending.get(rec.name))
                if before is not None:
                    if before != value:
                        raise PermanentError(
                            f"param {rec.name!r} changed from {before!r} to {value!r}; "
                            "MLflow params cannot change within a run"
                        )
                    continue  # already stored or already in this batch: nothing to send
                pending[rec.name] = value
                if not cur.settings_room():
                    chunks.append(cur)
                    cur = _Chunk()
                cur.params[rec.name] = value
            elif kinds[i] is Tag:
                value = str(rec.value)[:MAX_TAG_VALUE_LENGTH]
                if rec.name not in cur.tags and not cur.settings_room():
                    chunks.append(cur)
                    cur = _Chunk()
                cur.tags[rec.name] = value  # later value of a tag wins, as on the server
            else:
                raise PermanentError(f"the mlflow sink cannot write a {kinds[i].__name__}")
        if cur:
            chunks.append(cur)
        return chunks

    # -- upload lane -------------------------------------------------------------------------

    def upload(self, artifact: Artifact) -> None:
        """The file, directory (its contents, recursively) or bytes are stored with the run
        under ``artifact.name``; a retry overwrites what a failed attempt stored."""
        if self._run is None or self._transport is None:
            raise RetryableError("the MLflow run is not open yet")
        if artifact.data is None and artifact.source is None:
            raise PermanentError(f"artifact {artifact.name!r} has neither data nor a source")
        if artifact.source is not None and not os.path.exists(artifact.source):
            raise PermanentError(f"artifact source {artifact.source!r} does not exist")
        is_dir = artifact.data is None and os.path.isdir(str(artifact.source))
        try:
            # A directory may go to the run's artifact root; a file or bytes need a name.
            path = "" if is_dir and artifact.name in ("", ".") else safe_relpath(artifact.name)
        except (TypeError, ValueError) as exc:
            raise PermanentError(str(exc)) from exc
        self._transport.upload(self._run, artifact, path)


def _param_str(value: Any) -> str:
    return str(value)[:MAX_PARAM_VALUE_LENGTH]


def _redact(uri: str) -> str:
    """``uri`` without a password or user in its network location."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _make_transport(tracking_uri: str, timeout_s: float) -> _Transport:
    scheme = urllib.parse.urlsplit(tracking_uri).scheme.lower()
    if scheme in ("http", "https"):
        from mlflow.utils.credentials import get_default_host_creds

        creds = get_default_host_creds(tracking_uri)  # type: ignore[no-untyped-call]
        simple = not (
            getattr(creds, "aws_sigv4", False)
            or getattr(creds, "auth", None)
            or getattr(creds, "use_databricks_sdk", False)
            or getattr(creds, "client_secret", None)
            or os.environ.get("MLFLOW_WORKSPACE", "").strip()
        )
        if simple:
            return _RestTransport(tracking_uri, creds, timeout_s)
    return _ClientTransport(tracking_uri)


# -- REST transport ----------------------------------------------------------------------------


class _RestTransport:
    """MLflow's REST API over two persistent sessions: ``_api`` for the metrics lane (open,
    write, close) and ``_files`` for the upload lane, so the lanes never share a connection."""

    def __init__(self, tracking_uri: str, creds: Any, timeout_s: float) -> None:
        import requests
        from mlflow.tracking.request_header.registry import resolve_request_headers

        self._requests = requests
        self.tracking_uri = tracking_uri
        self._base = creds.host.rstrip("/")
        self._api_root = f"{self._base}/api/2.0/mlflow/"
        self._timeout = (timeout_s, timeout_s)
        extra = resolve_request_headers()  # type: ignore[no-untyped-call]
        headers = {str(k): str(v) for k, v in extra.items()}
        if creds.username and creds.password:
            self._auth: Any = (creds.username, creds.password)
        else:
            self._auth = None
            if creds.token:
                headers["Authorization"] = f"Bearer {creds.token}"
        if creds.ignore_tls_verification:
            self._verify: Any = False
        else:
            self._verify = creds.server_cert_path or True
        self._cert = creds.client_cert_path
        self._headers = headers
        self._api = self._session()
        self._files = self._session()
        self._encoder = msgspec.json.Encoder()
        self._fallback: _ClientTransport | None = None

    def _session(self) -> Any:
        s = self._requests.Session()
        s.headers.update(self._headers)
        s.auth = self._auth
        s.verify = self._verify
        s.cert = self._cert
        return s

    def close(self) -> None:
        self._api.close()
        self._files.close()
        if self._fallback is not None:
            self._fallback.close()

    # requests: exceptions raised before or while talking to the server are retryable.
    def _send(self, session: Any, method: str, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self._timeout)
        try:
            resp = session.request(method, url, allow_redirects=False, **kwargs)
        except self._requests.exceptions.InvalidURL as exc:
            raise PermanentError(f"{method} {_redact(url)}: {exc}") from exc
        except (self._requests.exceptions.RequestException, OSError) as exc:
            raise RetryableError(f"{method} {_redact(url)}: {_root_cause(exc)}") from exc
        if resp.status_code >= 300:
            raise _http_error(resp, method, url)
        return resp

    def _call(self, endpoint: str, body: bytes | None = None, **query: Any) -> Any:
        url = self._api_root + endpoint
        if body is None:
            resp = self._send(self._api, "GET", url, params=query)
        else:
            resp = self._send(
                self._api, "POST", url, data=body, headers={"Content-Type": "application/json"}
            )
        try:
            return msgspec.json.decode(resp.content)
        except msgspec.DecodeError as exc:
            raise RetryableError(f"{endpoint}: the server answered with invalid JSON") from exc

    def experiment_id(self, name: str) -> str:
        try:
            exp = self._call("experiments/get-by-name", experiment_name=name)["experiment"]
        except _NotFound:
            try:
                body = self._encoder.encode({"name": name})
                return str(self._call("experiments/create", body)["experiment_id"])
            except _AlreadyExists:  # created meanwhile by another process
                exp = self._call("experiments/get-by-name", experiment_name=name)["experiment"]
        if exp.get("lifecycle_stage") == "deleted":
            raise PermanentError(f"experiment {name!r} is deleted; restore it or use another name")
        return str(exp["experiment_id"])

    def create_run(
        self, experiment_id: str, run_name: str | None, tags: dict[str, str], start_ms: int
    ) -> _RunRef:
        body: dict[str, Any] = {
            "experiment_id": experiment_id,
            "start_time": start_ms,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        if run_name:
            body["run_name"] = run_name
        if "mlflow.user" in tags:
            body["user_id"] = tags["mlflow.user"]  # as MlflowClient.create_run does
        info = self._call("runs/create", self._encoder.encode(body))["run"]["info"]
        return _RunRef(info["run_id"], experiment_id, info["artifact_uri"])

    def find_run(self, experiment_id: str, token: str) -> _RunRef | None:
        body = self._encoder.encode(
            {
                "experiment_ids": [experiment_id],
                "filter": f"tags.`{RUN_TOKEN_TAG}` = '{token}'",
                "max_results": 1,
            }
        )
        runs = self._call("runs/search", body).get("runs", [])
        if not runs:
            return None
        info = runs[0]["info"]
        return _RunRef(info["run_id"], experiment_id, info["artifact_uri"])

    def log_batch(self, run_id: str, chunk: _Chunk) -> None:
        url = self._api_root + "runs/log-batch"
        for body in self.bodies(run_id, chunk):
            self._send(
                self._api, "POST", url, data=body, headers={"Content-Type": "application/json"}
            )

    def bodies(self, run_id: str, chunk: _Chunk) -> list[bytes]:
        """The ``log-batch`` request bodies for ``chunk``, each at most 1 MB, in order."""
        body = self._encode(run_id, chunk)
        if len(body) <= MAX_REQUEST_BYTES:
            return [body]
        first, second = chunk.halves()
        return self.bodies(run_id, first) + self.bodies(run_id, second)

    def _encode(self, run_id: str, chunk: _Chunk) -> bytes:
        """The ``log-batch`` JSON body in one msgspec pass over the Scalar structs.

        Scalars encode as ``{"name":..,"value":..,"step":..,"timestamp":..}``; MLflow wants
        ``key`` for ``name``. Keys were validated (no '"'), so ``"name":`` occurs only as a field
        name and one bytes.replace renames every field. msgspec writes NaN/inf as ``null``, which
        MLflow refuses, so they are sent as the protobuf JSON strings "NaN"/"Infinity".
        (A bare ``NaN`` token is not JSON and is mis-stored by MLflow 3.17 as a 0.0 point.)
        """
        enc = self._encoder.encode
        try:
            if _all_finite(chunk.metrics):
                metrics = enc(chunk.metrics)
            else:
                metrics = enc([_finite_or_dict(m) for m in chunk.metrics])
        except (TypeError, msgspec.EncodeError) as exc:
            raise PermanentError(f"a metric value cannot be sent to MLflow: {exc}") from exc
        metrics = metrics.replace(b'"name":', b'"key":')
        params = enc([{"key": k, "value": v} for k, v in chunk.params.items()])
        tags = enc([{"key": k, "value": v} for k, v in chunk.tags.items()])
        return b"".join((
            b'{"run_id":', enc(run_id), b',"metrics":', metrics,
            b',"params":', params, b',"tags":', tags, b"}",
        ))  # fmt: skip

    def end_run(self, run_id: str, status: RunStatus, end_ms: int) -> None:
        body = {"run_id": run_id, "status": status, "end_time": end_ms}
        self._call("runs/update", self._encoder.encode(body))

    def upload(self, run: _RunRef, artifact: Artifact, path: str) -> None:
        parts = urllib.parse.urlsplit(run.artifact_uri)
        if parts.scheme != "mlflow-artifacts" or parts.netloc:
            # Another store (s3://, a shared path...): MLflow's client knows how to reach it.
            if self._fallback is None:
                self._fallback = _ClientTransport(self.tracking_uri)
            self._fallback.upload(run, artifact, path)
            return
        root = f"{self._base}/api/2.0/mlflow-artifacts/artifacts/{parts.path.strip('/')}"
        for rel, data in _artifact_files(artifact, path):
            url = f"{root}/{urllib.parse.quote(rel)}"
            ctype = mimetypes.guess_type(rel)[0] or "application/octet-stream"
            if isinstance(data, bytes):
                self._send(self._files, "PUT", url, data=data, headers={"Content-Type": ctype})
            else:
                with open(data, "rb") as f:
                    self._send(self._files, "PUT", url, data=f, headers={"Content-Type": ctype})


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error (theirs nest 2-3 levels deep)."""
    while True:
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException) and exc.args:
            inner = exc.args[0]
        if not isinstance(inner, BaseException) or inner is exc:
            return str(exc)
        exc = inner


def _all_finite(metrics: list[Scalar]) -> bool:
    """True when every value is a finite number (one C-speed sum: NaN/inf propagate into it; a
    finite overflow only sends the batch down the slower exact path)."""
    try:
        total = sum(map(_VALUE, metrics))
    except TypeError:
        return False
    return bool(total - total == 0)


def _finite_or_dict(m: Scalar) -> Scalar | dict[str, Any]:
    v = m.value
    if v is None or isinstance(v, (str, bytes, bool)):
        raise PermanentError(f"metric {m.name!r} has a non-numeric value {v!r}")
    if math.isfinite(v):
        return m
    text = "NaN" if v != v else ("Infinity" if v == _INF else "-Infinity")
    return {"name": m.name, "value": text, "step": m.step, "timestamp": m.timestamp}


def _artifact_files(artifact: Artifact, path: str) -> Iterator[tuple[str, bytes | str]]:
    """(artifact path, bytes or local file) for every file the artifact stores, sorted."""
    if artifact.data is not None:
        yield path, artifact.data
        return
    source = str(artifact.source)
    if not os.path.isdir(source):
        yield path, source
        return
    for root, dirs, files in os.walk(source):
        dirs.sort()
        rel_root = os.path.relpath(root, source).replace(os.sep, "/")
        for name in sorted(files):
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            yield (f"{path}/{rel}" if path else rel), os.path.join(root, name)


class _NotFound(PermanentError):
    """HTTP 404 / RESOURCE_DOES_NOT_EXIST."""


class _AlreadyExists(PermanentError):
    """RESOURCE_ALREADY_EXISTS (e.g. an experiment created meanwhile)."""


_WHOLE_REQUEST_CODES = frozenset({401, 403, 404, 405})
_WHOLE_REQUEST_ERRORS = frozenset(
    {"INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_DOES_NOT_EXIST"}
)


_RUN_NOT_ACTIVE = "must be in the 'active' state"
"""MLflow 3.17 refuses writes to a deleted run with a 400 INVALID_PARAMETER_VALUE saying this."""


def _about_the_request(code: int, error_code: str, message: str) -> bool:
    """True when MLflow refused the request as a whole (auth, a deleted or missing run), so
    splitting the batch to find a bad entry would only repeat the refusal."""
    return (
        code in _WHOLE_REQUEST_CODES
        or error_code in _WHOLE_REQUEST_ERRORS
        or _RUN_NOT_ACTIVE in message
    )


def _http_error(resp: Any, method: str, url: str) -> Exception:
    """The Retryable/PermanentError for a non-2xx answer, with MLflow's message when it sent one."""
    code = resp.status_code
    error_code = ""
    message = ""
    try:
        body = msgspec.json.decode(resp.content)
        if isinstance(body, dict):
            error_code = str(body.get("error_code", ""))
            message = str(body.get("message", ""))
    except msgspec.DecodeError:
        message = resp.text[:500].strip()
    what = f"{method} {urllib.parse.urlsplit(url).path}: HTTP {code}"
    if error_code:
        what += f" {error_code}"
    text = f"{what}: {message}" if message else what
    if code in _RETRYABLE_STATUS or code >= 500:
        return RetryableError(text)
    if error_code == "RESOURCE_ALREADY_EXISTS":
        return _AlreadyExists(text)
    if code == 404 or error_code == "RESOURCE_DOES_NOT_EXIST":
        return _NotFound(text, whole_batch=True)
    return PermanentError(text, whole_batch=_about_the_request(code, error_code, message))


# -- MlflowClient transport ---------------------------------------------------------------------


class _ClientTransport:
    """``MlflowClient`` for stores without REST (sqlite and other databases) and servers that need
    MLflow's own auth plugins. MLflow's error codes are mapped to Retryable/PermanentError."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        with _mlflow_errors():  # e.g. a ./mlruns file store MLflow 3.7+ refuses
            self.client = MlflowClient(tracking_uri=tracking_uri)

    def close(self) -> None:
        """Nothing to release: the client holds no connection of its own."""

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
    ) -> _RunRef:
        with _mlflow_errors():
            run = self.client.create_run(
                experiment_id, start_time=start_ms, tags=tags, run_name=run_name
            )
        return _RunRef(run.info.run_id, experiment_id, run.info.artifact_uri)

    def find_run(self, experiment_id: str, token: str) -> _RunRef | None:
        with _mlflow_errors():
            runs = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_TOKEN_TAG}` = '{token}'", max_results=1
            )
        if not runs:
            return None
        return _RunRef(runs[0].info.run_id, experiment_id, runs[0].info.artifact_uri)

    def log_batch(self, run_id: str, chunk: _Chunk) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.entities import Param as MParam

        metrics = [Metric(m.name, m.value, m.timestamp, m.step) for m in chunk.metrics]
        params = [MParam(k, v) for k, v in chunk.params.items()]
        tags = [RunTag(k, v) for k, v in chunk.tags.items()]
        with _mlflow_errors():
            self.client.log_batch(run_id, metrics, params, tags, synchronous=True)

    def end_run(self, run_id: str, status: RunStatus, end_ms: int) -> None:
        with _mlflow_errors():
            self.client.set_terminated(run_id, status, end_time=end_ms)

    def upload(self, run: _RunRef, artifact: Artifact, path: str) -> None:
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
                    _link_or_copy(str(source), staged)
                self.client.log_artifact(run.run_id, staged, dirname or None)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@contextlib.contextmanager
def _mlflow_errors() -> Iterator[None]:
    """MLflow's exceptions become Retryable (HTTP 5xx/429 codes, OS errors) or PermanentError."""
    try:
        yield
    except (PermanentError, RetryableError):
        raise
    except OSError as exc:
        raise RetryableError(str(exc)) from exc
    except Exception as exc:
        status = getattr(exc, "get_http_status_code", None)
        if not callable(status):
            raise  # not MLflow's: the pipeline classifies it (requests errors are retryable)
        code = int(status())
        if code in _RETRYABLE_STATUS or code >= 500:
            raise RetryableError(str(exc)) from exc
        error_code = str(getattr(exc, "error_code", ""))
        text = str(exc)
        raise PermanentError(text, whole_batch=_about_the_request(code, error_code, text)) from exc
