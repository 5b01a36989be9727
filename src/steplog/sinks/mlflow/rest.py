"""MLflow's REST API spoken by the training process itself: msgspec, :mod:`.http1` for the JSON
calls over plain HTTP, and ``http.client`` for TLS and streamed uploads.

No ``mlflow`` (nor ``requests``) import: the training process pays only for what a request
costs. Credentials come from MLflow's own environment variables (``MLFLOW_TRACKING_TOKEN``,
``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``~/.mlflow/credentials``,
``MLFLOW_TRACKING_INSECURE_TLS``, ``MLFLOW_TRACKING_SERVER_CERT_PATH``,
``MLFLOW_TRACKING_CLIENT_CERT_PATH``). What only MLflow's client can do (an auth plugin, AWS
SigV4, a workspace header, request-header plugins, an HTTP proxy, a non-proxied artifact store
such as ``s3://``) is left to :class:`steplog.sinks.mlflow.client.HostTransport`:
:func:`needs_mlflow_client` says when.

Each lane has its own keep-alive connection (``api`` for runs and metrics, ``files`` for
artifacts), so the lanes never wait for each other; with ``in_flight`` > 1 the metrics lane sends
key-disjoint request streams (:mod:`.streams`) at once, each on its own connection. Every failure
to connect, send or receive is a :class:`RetryableError`; HTTP answers are classified by status
and MLflow's error code.
"""

from __future__ import annotations

import base64
import concurrent.futures
import configparser
import contextlib
import getpass
import http.client
import math
import mimetypes
import os
import ssl
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

import msgspec

from steplog.errors import PermanentError, RetryableError
from steplog.records import Artifact, Batch, scalar_objects
from steplog.retry import is_retryable, setup_refused
from steplog.sinks.base import RunStatus
from steplog.sinks.mlflow.common import (
    MAX_REQUEST_BYTES,
    RETRYABLE_STATUS,
    VERSION_TOKEN_TAG,
    Chunk,
    RunRef,
    about_the_request,
    exchange_limit_s,
    missing_run,
    plugins,
    redact,
    resume_problem,
    start_order,
    token_filter,
)
from steplog.sinks.mlflow.http1 import Closed, Http1Socket, ResponseError, host_header

__all__ = ["RestTransport", "default_run_tags", "needs_mlflow_client"]

_VALUE = attrgetter("value")
_LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
_INF = math.inf
_UPLOAD_BLOCK = 1 << 20
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
          ConnectionAbortedError)
"""How a kept-alive connection the server closed while idle fails on its next request."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("true", "1")


def needs_mlflow_client(tracking_uri: str) -> str | None:
    """Why ``tracking_uri`` needs MLflow's own client (run in a sink host), or ``None`` when
    this module's REST transport serves it."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme.lower() not in ("http", "https"):
        return f"the {parts.scheme or 'file'} store is MLflow's own code"
    if os.environ.get("MLFLOW_TRACKING_AUTH", "").strip():
        return "an MLflow auth plugin (MLFLOW_TRACKING_AUTH) signs the requests"
    if _flag("MLFLOW_TRACKING_AWS_SIGV4"):
        return "requests are signed with AWS SigV4"
    if os.environ.get("MLFLOW_WORKSPACE", "").strip():
        return "a workspace header (MLFLOW_WORKSPACE) is needed"
    if plugins("mlflow.request_header_provider"):
        return "a request-header plugin is installed"
    host = parts.hostname or ""
    proxies = urllib.request.getproxies()
    if proxies.get(parts.scheme.lower()) and not urllib.request.proxy_bypass(host):
        return "requests go through an HTTP proxy"
    return None


def _credentials() -> tuple[str | None, str | None]:
    """MLflow's username and password: the environment first, then ``~/.mlflow/credentials``."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return user, password
    path = Path(os.environ.get("MLFLOW_CREDENTIALS_FILE",
                               Path.home() / ".mlflow" / "credentials"))
    if path.is_file():
        config = configparser.ConfigParser()
        config.read(path)
        if config.has_section("mlflow"):
            user = user or config["mlflow"].get("mlflow_tracking_username")
            password = password or config["mlflow"].get("mlflow_tracking_password")
    return user, password


def default_run_tags(user_tags: dict[str, str]) -> dict[str, str]:
    """The tags MLflow's default and git context providers set on a new run, then ``user_tags``:
    user, source name and type, and the git commit, branch and origin of the main script."""
    user, _ = _credentials()
    if not user:
        try:
            user = getpass.getuser()
        except Exception:
            user = "unknown"
    main = sys.argv[0] if sys.argv and sys.argv[0] else None
    tags = {
        "mlflow.user": user,
        "mlflow.source.name": main or "<console>",
        "mlflow.source.type": "LOCAL",
    }
    if main:
        tags.update(_git_tags(Path(main).absolute().parent))
    tags.update({str(k): str(v) for k, v in user_tags.items()})
    return tags


def _git_tags(start: Path) -> dict[str, str]:
    """Commit, branch and origin URL of the git checkout holding ``start`` (plain file reads)."""
    for folder in (start, *start.parents):
        git = folder / ".git"
        if git.is_dir():
            break
    else:
        return {}
    try:
        head = (git / "HEAD").read_text().strip()
        tags: dict[str, str] = {}
        if head.startswith("ref: "):
            ref = head[5:]
            tags["mlflow.source.git.branch"] = ref.rpartition("refs/heads/")[2]
            ref_file = git / ref
            if ref_file.is_file():
                commit = ref_file.read_text().strip()
            else:
                packed = (git / "packed-refs").read_text() if (git / "packed-refs").is_file() \
                    else ""
                commit = next((line.split()[0] for line in packed.splitlines()
                               if line.endswith(" " + ref)), "")
        else:
            commit = head
        if commit:
            tags["mlflow.source.git.commit"] = commit
        config = configparser.ConfigParser()
        config.read(git / "config")
        url = config.get('remote "origin"', "url", fallback="")
        if url:
            tags["mlflow.source.git.repoURL"] = url
        return tags
    except (OSError, configparser.Error, ValueError):
        return {}


class _NotFound(PermanentError):
    """HTTP 404 / RESOURCE_DOES_NOT_EXIST."""


class _AlreadyExists(PermanentError):
    """RESOURCE_ALREADY_EXISTS (e.g. an experiment created meanwhile)."""


def http_error(code: int, body: bytes, method: str, path: str) -> Exception:
    """The Retryable/PermanentError for a non-2xx answer, with MLflow's message when it sent one."""
    error_code = ""
    message = ""
    try:
        decoded = msgspec.json.decode(body)
        if isinstance(decoded, dict):
            error_code = str(decoded.get("error_code", ""))
            message = str(decoded.get("message", ""))
    except msgspec.DecodeError:
        message = body[:500].decode("utf-8", "replace").strip()
    what = f"{method} {path}: HTTP {code}"
    if error_code:
        what += f" {error_code}"
    text = f"{what}: {message}" if message else what
    if code in RETRYABLE_STATUS or code >= 500:
        return RetryableError(text)
    if error_code == "RESOURCE_ALREADY_EXISTS":
        return _AlreadyExists(text)
    if code == 404 or error_code == "RESOURCE_DOES_NOT_EXIST":
        return _NotFound(text, whole_batch=True)
    return PermanentError(text, whole_batch=about_the_request(code, error_code, message))


class _Connection:
    """One keep-alive HTTP/1.1 connection to the server, used by one lane at a time: requests
    with a bytes body over plain HTTP go through :mod:`.http1` (half the CPU per request),
    streamed uploads and TLS through ``http.client`` (a second socket where a lane sends both)."""

    def __init__(self, parts: urllib.parse.SplitResult, timeout_s: float,
                 context: ssl.SSLContext | None) -> None:
        self._parts = parts
        self._timeout = timeout_s
        self._context = context
        self._conn: http.client.HTTPConnection | None = None
        self._wire: Http1Socket | None = None
        self._port = parts.port or (443 if context is not None else 80)
        self._host = host_header(parts)
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        host, port = self._parts.hostname or "", self._port
        if self._context is not None:
            return http.client.HTTPSConnection(host, port, timeout=self._timeout,
                                               context=self._context, blocksize=_UPLOAD_BLOCK)
        return http.client.HTTPConnection(host, port, timeout=self._timeout,
                                          blocksize=_UPLOAD_BLOCK)

    def request(self, method: str, target: str, body: bytes | _Readable | None,
                headers: dict[str, str], resend: bool = True) -> tuple[int, bytes]:
        """(status, body) of one request; a connection the server closed while idle is
        reopened once (``resend``: only for requests that are safe to repeat). Raises
        :class:`RetryableError` for every transport failure, :class:`PermanentError` for a TLS
        setup the server refuses (see :func:`~steplog.retry.setup_refused`)."""
        plain = self._context is None and (body is None or isinstance(body, bytes))
        once, drop = ((self._over_wire, self._close_wire) if plain
                      else (self._over_client, self._close_client))
        with self._lock:
            for attempt in (0, 1):
                reused = (self._wire if plain else self._conn) is not None
                try:
                    status, data, keep = once(method, target, body, headers)
                except ssl.SSLError as exc:
                    drop()
                    if setup_refused(exc):  # a certificate, protocol or cipher refused
                        raise PermanentError(f"{method} {target}: {exc}",
                                             whole_batch=True) from exc
                    raise RetryableError(f"{method} {target}: {exc!r}") from exc
                except (Closed, *_STALE) as exc:
                    drop()
                    if resend and attempt == 0 and reused and _rewind(body):
                        continue
                    raise RetryableError(f"{method} {target}: {exc!r}") from exc
                except (OSError, ResponseError, http.client.HTTPException) as exc:
                    drop()
                    raise RetryableError(f"{method} {target}: {exc!r}") from exc
                except BaseException:  # a refused request, an interrupt: never half-read
                    drop()
                    raise
                if not keep:
                    drop()
                return status, data
        raise AssertionError("unreachable")

    def _over_wire(self, method: str, target: str, body: bytes | _Readable | None,
                   headers: dict[str, str]) -> tuple[int, bytes, bool]:
        """One exchange through :mod:`.http1` (a bytes body over plain HTTP)."""
        wire = self._wire or Http1Socket(
            (self._parts.hostname or "", self._port), self._host, self._timeout,
            exchange_limit_s(self._timeout))
        self._wire = wire
        return wire.exchange(method, target, headers, cast("bytes | None", body))

    def _over_client(self, method: str, target: str, body: bytes | _Readable | None,
                     headers: dict[str, str]) -> tuple[int, bytes, bool]:
        """One exchange through ``http.client`` (TLS, or a streamed body)."""
        conn = self._conn or self._connect()
        self._conn = conn
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, not resp.will_close

    def _close_wire(self) -> None:
        if self._wire is not None:
            self._wire.close()
            self._wire = None

    def _close_client(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close_connection(self) -> None:
        self._close_wire()
        self._close_client()


class _Readable(Protocol):
    def read(self, n: int = -1) -> bytes: ...


class _Exactly:
    """The first ``size`` bytes of a file, however it grows meanwhile: the body always matches
    the Content-Length sent before it."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._size = size
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self._f.seek(offset, whence)
        self._left = max(0, self._size - pos)
        return pos


def _rewind(body: bytes | _Readable | None) -> bool:
    """Whether ``body`` can be sent again (bytes, or a file seekable back to its start)."""
    if body is None or isinstance(body, bytes):
        return True
    seek = getattr(body, "seek", None)
    if seek is None:
        return False
    try:
        seek(0)
    except OSError:
        return False
    return True


class RestTransport:
    """MLflow's REST API over keep-alive connections: ``api`` for the metrics lane (open,
    write, close), ``files`` for the upload lane, and ``in_flight - 1`` more for the request
    streams of :meth:`log_streams`."""

    def __init__(self, tracking_uri: str, timeout_s: float, in_flight: int = 1) -> None:
        parts = urllib.parse.urlsplit(tracking_uri)
        self.in_flight = in_flight
        self.tracking_uri = tracking_uri
        self._base_path = parts.path.rstrip("/")
        context = None
        if parts.scheme.lower() == "https":
            # As MLflow's requests session: its own variable, then requests' and curl's.
            ca = (os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
                  or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"))
            if ca and os.path.isdir(ca):
                context = ssl.create_default_context(capath=ca)
            else:
                context = ssl.create_default_context(cafile=ca or None)
            if _flag("MLFLOW_TRACKING_INSECURE_TLS"):
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            client_cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH")
            if client_cert:
                context.load_cert_chain(client_cert)
        headers = {"User-Agent": "steplog", "Content-Type": "application/json"}
        user, password = _credentials()
        if parts.username:  # credentials in the URI itself
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        if user and password:
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        self._headers = headers
        self._api = _Connection(parts, timeout_s, context)
        self._files = _Connection(parts, timeout_s, context)
        self._more = [_Connection(parts, timeout_s, context) for _ in range(in_flight - 1)]
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._encoder = msgspec.json.Encoder()
        self._fallback: Any = None
        self._timeout_s = timeout_s

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # idle: log_streams returns after its streams
            self._pool = None
        self._api.close_connection()
        self._files.close_connection()
        for conn in self._more:
            conn.close_connection()
        if self._fallback is not None:
            self._fallback.close()

    def _send(self, conn: _Connection, method: str, path: str, body: bytes | _Readable | None,
              headers: dict[str, str] | None = None, resend: bool = True) -> bytes:
        target = self._base_path + path
        status, data = conn.request(method, target, body,
                                    {**self._headers, **headers} if headers else self._headers,
                                    resend=resend)
        if status >= 300:
            raise http_error(status, data, method, path)
        return data

    def _call(self, endpoint: str, body: bytes | None = None, resend: bool = True,
              **query: Any) -> Any:
        path = "/api/2.0/mlflow/" + endpoint
        if body is None:
            data = self._send(self._api, "GET", f"{path}?{urllib.parse.urlencode(query)}", None)
        else:
            data = self._send(self._api, "POST", path, body, resend=resend)
        try:
            return msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            raise RetryableError(f"{endpoint}: the server answered with invalid JSON") from exc

    def run_tags(self, user_tags: dict[str, str]) -> dict[str, str]:
        return default_run_tags(user_tags)

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
    ) -> RunRef:
        body: dict[str, Any] = {
            "experiment_id": experiment_id,
            "start_time": start_ms,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        if run_name:
            body["run_name"] = run_name
        if "mlflow.user" in tags:
            body["user_id"] = tags["mlflow.user"]  # as MlflowClient.create_run does
        # Not resent here: a run the server created before the connection dropped is found
        # by the sink's token on the next attempt (MLflowSink.open), not created twice.
        info = self._call("runs/create", self._encoder.encode(body), resend=False)["run"]["info"]
        return RunRef(info["run_id"], experiment_id, info["artifact_uri"])

    def find_run(self, experiment_id: str, token: str, running_only: bool = False,
                 since_ms: int | None = None, until_ms: int | None = None,
                 oldest: bool = False) -> RunRef | None:
        body = self._encoder.encode(
            {
                "experiment_ids": [experiment_id],
                "filter": token_filter(token, running_only, since_ms, until_ms),
                "max_results": 1,
                "order_by": start_order(oldest),
            }
        )
        runs = self._call("runs/search", body).get("runs", [])
        if not runs:
            return None
        info = runs[0]["info"]
        end = info.get("end_time")
        return RunRef(info["run_id"], experiment_id, info["artifact_uri"],
                      info.get("status", "RUNNING"), None if end is None else int(end))

    def resume_run(self, run_id: str, experiment_name: str, running: bool = True) -> RunRef:
        try:
            info = self._call("runs/get", run_id=run_id)["run"]["info"]
        except _NotFound as exc:
            raise PermanentError(missing_run(run_id, self.tracking_uri, exc)) from exc
        experiment = self._call("experiments/get",
                                experiment_id=info["experiment_id"])["experiment"]
        problem = resume_problem(run_id, experiment_name, experiment.get("name"),
                                 info.get("lifecycle_stage", "active"))
        if problem is not None:
            raise PermanentError(problem)
        if running:
            self._call("runs/update",
                       self._encoder.encode({"run_id": run_id, "status": "RUNNING"}))
        return RunRef(run_id, str(info["experiment_id"]), info["artifact_uri"])

    def log_batch(self, run_id: str, chunk: Chunk) -> None:
        for body in self.bodies(run_id, chunk):
            self._send(self._api, "POST", _LOG_BATCH, body)

    def log_streams(self, run_id: str, streams: Sequence[Sequence[Chunk]],
                    stored: set[tuple[int, int]]) -> None:
        """Send each stream's requests in order on its own connection, at most
        :attr:`in_flight` streams at once; returns once every request was stored.

        ``stored`` holds ``(stream, request)`` of the requests the server acknowledged; they
        are skipped, and each newly stored one is added, so a retry with the same set resends
        only what was not stored. A stream stops at its first failure, the others go on; then
        the failure raised is one about the whole request (no permission, no run) if any, else
        a retryable one (what only a resend can cure), else the first refusal.
        """
        if len(streams) > self.in_flight:
            raise ValueError(f"{len(streams)} streams, at most {self.in_flight} in flight")
        conns = [self._api, *self._more]
        if len(streams) == 1:
            self._send_stream(conns[0], run_id, streams[0], 0, stored)
            return
        futures = [self._start(self._send_stream, conns[i], run_id, streams[i], i, stored)
                   for i in range(1, len(streams))]
        errors: list[BaseException] = []
        try:
            self._send_stream(conns[0], run_id, streams[0], 0, stored)
        except Exception as exc:
            errors.append(exc)
        for future in futures:  # each request has its own timeout: this wait is bounded
            failure = future.exception()
            if failure is not None:
                errors.append(failure)
        if errors:
            raise _worst(errors)

    def _start(self, fn: Callable[..., None], *args: Any) -> concurrent.futures.Future[None]:
        """``fn(*args)`` on a thread of the pool; once the interpreter is shutting down (the
        exit close: the pool takes no more work then), on a thread of its own."""
        try:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.in_flight - 1, thread_name_prefix="steplog-mlflow-stream")
            return self._pool.submit(fn, *args)
        except RuntimeError:  # also a pool first needed then: its module cannot load
            future: concurrent.futures.Future[None] = concurrent.futures.Future()

            def run() -> None:
                try:
                    fn(*args)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(None)

            threading.Thread(target=run, name="steplog-mlflow-stream", daemon=True).start()
            return future

    def _send_stream(self, conn: _Connection, run_id: str, chunks: Sequence[Chunk], index: int,
                     stored: set[tuple[int, int]]) -> None:
        for j, chunk in enumerate(chunks):
            if (index, j) in stored:
                continue
            for body in self.bodies(run_id, chunk):
                self._send(conn, "POST", _LOG_BATCH, body)
            stored.add((index, j))

    def bodies(self, run_id: str, chunk: Chunk) -> list[bytes]:
        """The ``log-batch`` request bodies for ``chunk``, each at most 1 MB, in order."""
        body = self._encode(run_id, chunk)
        if len(body) <= MAX_REQUEST_BYTES:
            return [body]
        first, second = chunk.halves()
        return self.bodies(run_id, first) + self.bodies(run_id, second)

    def _encode(self, run_id: str, chunk: Chunk) -> bytes:
        """The ``log-batch`` JSON body, its metrics encoded by one msgspec call from the rows of
        the chunk's blocks, as ``{"key":..,"value":..,"step":..,"timestamp":..}`` objects.

        msgspec writes NaN/inf as ``null``, which MLflow refuses, so they are sent as the
        protobuf JSON strings "NaN"/"Infinity". (A bare ``NaN`` token is not JSON and is
        mis-stored by MLflow 3.17 as a 0.0 point.)
        """
        enc = self._encoder.encode
        lines, finite, _ = scalar_objects(Batch.of(chunk.metrics).parts, key="key",
                                          rename=chunk.rename)
        try:
            if finite or _all_finite(lines):
                metrics = enc(lines)
            else:
                metrics = enc([_finite_or_dict(m) for m in lines])
        except (TypeError, msgspec.EncodeError) as exc:
            raise PermanentError(f"a metric value cannot be sent to MLflow: {exc}") from exc
        params = enc([{"key": k, "value": v} for k, v in chunk.params.items()])
        tags = enc([{"key": k, "value": v} for k, v in chunk.tags.items()])
        return b"".join((
            b'{"run_id":', enc(run_id), b',"metrics":', metrics,
            b',"params":', params, b',"tags":', tags, b"}",
        ))  # fmt: skip

    def end_run(self, run_id: str, status: RunStatus, end_ms: int) -> None:
        body = {"run_id": run_id, "status": status, "end_time": end_ms}
        self._call("runs/update", self._encoder.encode(body))

    def upload(self, run: RunRef, artifact: Artifact, path: str) -> None:
        parts = urllib.parse.urlsplit(run.artifact_uri)
        if parts.scheme != "mlflow-artifacts" or parts.netloc:
            # Another store (s3://, a shared path...): MLflow's client knows how to reach it.
            if self._fallback is None:
                from steplog.sinks.mlflow.client import HostTransport

                self._fallback = HostTransport(self.tracking_uri, self._timeout_s)
            self._fallback.upload(run, artifact, path)
            return
        root = f"/api/2.0/mlflow-artifacts/artifacts/{parts.path.strip('/')}"
        for rel, data in artifact_files(artifact, path):
            target = f"{root}/{urllib.parse.quote(rel)}"
            ctype = mimetypes.guess_type(rel)[0] or "application/octet-stream"
            if isinstance(data, bytes):
                self._send(self._files, "PUT", target, data, {"Content-Type": ctype})
            else:
                with open(data, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    self._send(self._files, "PUT", target, _Exactly(f, size),
                               {"Content-Type": ctype, "Content-Length": str(size)})

    def register_version(
        self, model: str, run: RunRef, path: str, tags: dict[str, str]
    ) -> str:
        """A version of registered model ``model`` (created if missing) whose source is the
        run artifact ``path``; an earlier version made from the same artifact is reused."""
        with contextlib.suppress(_AlreadyExists):  # registered earlier: add a version
            self._call("registered-models/create", self._encoder.encode({"name": model}))
        token = f"{run.run_id}/{path}"
        # By run only: a filter cannot name a model whose name holds both quotes.
        found = self._call("model-versions/search", filter=f"run_id='{run.run_id}'")
        for version in found.get("model_versions", []):
            if version.get("name") == model and any(
                    t.get("key") == VERSION_TOKEN_TAG and t.get("value") == token
                    for t in version.get("tags", [])):
                return str(version["version"])
        body = {
            "name": model,
            "source": f"{run.artifact_uri.rstrip('/')}/{path}",
            "run_id": run.run_id,
            "tags": [{"key": k, "value": v} for k, v in {**tags, VERSION_TOKEN_TAG: token}.items()],
        }
        created = self._call("model-versions/create", self._encoder.encode(body), resend=False)
        return str(created["model_version"]["version"])

    def describe(self) -> str:
        return redact(self.tracking_uri)


def _worst(errors: list[BaseException]) -> BaseException:
    """The failure that decides what happens to a batch of several request streams."""
    for exc in errors:
        if isinstance(exc, PermanentError) and exc.whole_batch:
            return exc
    for exc in errors:
        if is_retryable(exc):
            return exc
    return errors[0]


def _all_finite(metrics: list[Any]) -> bool:
    """True when every value is a finite number (one C-speed sum: NaN/inf propagate into it; a
    finite overflow only sends the batch down the slower exact path)."""
    try:
        total = sum(map(_VALUE, metrics))
    except TypeError:
        return False
    return bool(total - total == 0)


def _finite_or_dict(m: Any) -> Any:
    """``m`` (a stamped scalar), or a dict with a non-finite value as MLflow's JSON string."""
    v = m.value
    if v is None or isinstance(v, (str, bytes, bool)):
        raise PermanentError(f"metric {m.name!r} has a non-numeric value {v!r}")
    if math.isfinite(v):
        return m
    text = "NaN" if v != v else ("Infinity" if v == _INF else "-Infinity")
    return {"key": m.name, "value": text, "step": m.step, "timestamp": m.timestamp}


def artifact_files(artifact: Artifact, path: str) -> Iterator[tuple[str, bytes | str]]:
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
