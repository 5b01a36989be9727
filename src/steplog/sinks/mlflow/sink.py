"""The MLflow sink: one MLflow run, written with ``log-batch`` requests.

Two transports, chosen in :meth:`MLflowSink.open` from the tracking URI:

* ``http(s)://`` (a tracking server) with plain credentials: the sink speaks MLflow's REST API
  itself (:mod:`.rest`), in the training process, with msgspec and the standard library's HTTP
  client: no ``mlflow`` import, one msgspec pass per batch, no retries of its own. With
  ``max_in_flight`` K > 1 a write takes up to K * 1000 points and keeps up to K ``log-batch``
  requests in flight, no two with the same key (:mod:`.streams`); it returns once all are stored.
* anything else (the embedded ``sqlite:///mlflow.db``, other databases, ``databricks``, plugin
  stores) and servers that need MLflow's own client (an auth plugin, AWS SigV4, a workspace
  header, request-header plugins, an HTTP proxy): ``MlflowClient`` in a sink host process
  (:mod:`.client`, :mod:`steplog.host`), so its Python work runs on another core.

Values: parameter values are stored as ``str(value)`` (MLflow's own convention) truncated to
6000 characters, tag values truncated to 8000, as MLflow would. NaN is stored as NaN; MLflow
stores +/-infinity as +/-``sys.float_info.max``.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Sequence
from operator import attrgetter
from typing import Any, ClassVar, Protocol, cast

from steplog.errors import PermanentError, RetryableError, SteplogWarning
from steplog.paths import safe_relpath
from steplog.ranks import latest_start_ms
from steplog.records import Artifact, Batch, MetricRecord, Param, Scalar, Scalars, Tag, now_ms
from steplog.sinks.base import ACTIVE_UNTIL, RunStatus, Sink
from steplog.sinks.mlflow.common import (
    DEFAULT_TRACKING_URI,
    MAX_METRICS_PER_REQUEST,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    MOVED_FROM_TAG,
    RUN_TOKEN_TAG,
    Chunk,
    RunRef,
    Transport,
    absolute_uri,
    key_problem,
    redact,
    tracking_uri_problem,
)
from steplog.sinks.mlflow.streams import key_streams, scalars_only

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "IN_FLIGHT_ENV", "SQLITE_MAX_BATCH", "MLflowSink"]

SQLITE_MAX_BATCH = 10_000
"""Most records per write into a ``sqlite:`` store."""


class _FastTransport(Protocol):
    def log_metrics(self, run_id: str, batch: Batch) -> None: ...


_NAME = attrgetter("name")
_JOIN_WAIT_S = 2.0
"""Longest one ``open`` of a rank other than 0 looks for the shared run before it reports
that the run does not exist yet (the pipeline then retries with backoff)."""
_JOIN_POLL_S = 0.2

DEFAULT_MAX_IN_FLIGHT = 1
"""``log-batch`` requests in flight per run when neither ``max_in_flight`` nor
:data:`IN_FLIGHT_ENV` says otherwise."""
IN_FLIGHT_ENV = "STEPLOG_MLFLOW_MAX_IN_FLIGHT"
"""Environment variable giving ``max_in_flight`` when the sink is built without it (also read by
``steplog sync``)."""
_MOST_IN_FLIGHT = 64
_SHARED_RUNS: collections.Counter[tuple[int, str, str, str]] = collections.Counter()
"""Loggers made so far per rank, job, experiment and run name under ``ranks="all"``: a
second stage with the same names (``trainer.test`` after ``fit``) gets a run of its own, the
same on every rank, instead of joining the first stage's run."""
_SHARED_LOCK = threading.Lock()


def shared_run_token(group: str, experiment: str, run_name: str | None, nth: int = 0) -> str:
    """The token (``steplog.run_token``) of the run the ranks of job ``group`` share under
    ``ranks="all"``, for each rank's ``nth`` logger (from 0) with these names."""
    shared = "\0".join((group, experiment, run_name or ""))
    if nth:
        shared += f"\0{nth}"
    return hashlib.sha256(shared.encode()).hexdigest()[:32]


class MLflowSink(Sink):
    """Writes one MLflow run: every record of a successful :meth:`write` is stored, in call
    order, and a failed ``write`` may be retried as a whole without creating duplicates."""

    kind: ClassVar[str] = "mlflow"
    remote = True
    max_batch = 1000

    def __init__(
        self,
        experiment_name: str,
        *,
        tracking_uri: str | None = None,
        run_name: str | None = None,
        request_timeout_s: float = 30.0,
        tags: dict[str, str] | None = None,
        registered_model_name: str | None = None,
        max_in_flight: int | None = None,
        run_id: str | None = None,
    ) -> None:
        if not isinstance(experiment_name, str) or not experiment_name:
            raise ValueError("experiment_name must be a non-empty str")
        if run_id is not None and (not isinstance(run_id, str) or not run_id.strip()):
            raise ValueError(f"run_id must be a non-empty str or None, got {run_id!r}")
        if request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        self.experiment_name = experiment_name
        # A relative store is where the process was when the logger was made, whatever
        # directory the process (or the sink host started later) is in afterwards.
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        self.tracking_uri = uri if tracking_uri_problem(uri) else absolute_uri(uri)
        self.run_name = run_name
        self.request_timeout_s: float = request_timeout_s
        """Longest wait to connect, or for the server's next bytes, per HTTP request (s)."""
        self._user_tags = {str(k): str(v) for k, v in (tags or {}).items()}  # as MLflow
        if registered_model_name is not None and (
            not isinstance(registered_model_name, str) or not registered_model_name.strip()
        ):
            raise ValueError("registered_model_name must be a non-empty str or None")
        self.registered_model_name: str | None = registered_model_name
        """Every saved policy becomes a new version of this registered model."""
        self.max_in_flight = _in_flight(max_in_flight)
        """Most ``log-batch`` requests in flight at once for the run, on a tracking server
        spoken to over REST (MLflow's client in a sink host sends one at a time)."""
        if self.max_in_flight > 1 and urllib.parse.urlsplit(self.tracking_uri).scheme in (
                "http", "https"):
            self.max_batch = MAX_METRICS_PER_REQUEST * self.max_in_flight
        self._partial: tuple[Sequence[MetricRecord], list[list[Chunk]],
                             set[tuple[int, int]]] | None = None
        """The batch whose last write failed part way, its request streams and the requests
        stored: a retry of that same batch resends only the others."""
        self._token = uuid.uuid4().hex
        self._transport: Transport | None = None
        self._run: RunRef | None = None
        self._create_tried = False
        self._params: dict[str, str] = {}
        """Params the server acknowledged, as stored: a changed value is refused locally."""
        self._good_keys: set[str] = set()
        self._uploaded: set[tuple[str, int]] = set()
        """Artifacts stored whose model version is not registered yet (a retry skips them)."""
        self._fast: bool | None = None
        """Whether the sink host writes this run's metric points into the sqlite store itself
        (None: not asked yet)."""
        self._info: dict[str, str] = {}
        self._resume = run_id
        """The existing run this sink logs on into, instead of creating one."""
        if self.tracking_uri.startswith("sqlite:"):
            # One host call and one transaction per 10,000 points on the fast path; chunks of
            # 1000 (MLflow's request limit) otherwise, as before.
            self.max_batch = SQLITE_MAX_BATCH
        self._ranks: dict[str, Any] | None = None
        """This rank's place under the ``"all"``/``"own"`` rank policy (see :meth:`join_ranks`)."""
        self._keys: _RankKeys | None = None
        """Under ``"all"``: metric name -> ``rank<R>/<name>``."""
        self._reattached = False
        self._launched_ms: int | None = None
        """Under ``"all"``: the shared run is not older than this (ms since the epoch)."""
        self._started_ms: int | None = None
        """Under ``"all"``: an ended shared run is this launch's when it ended then or later."""
        self._ends_shared = False
        """A sync created the shared run (rank 0 never did): it ends it too."""
        self._active_ms: int | None = None
        """For a sync: when the journal's process last wrote a frame (ms since the epoch)."""

    @property
    def ranks(self) -> dict[str, Any] | None:
        """This rank's place under the rank policy ``"all"`` or ``"own"`` (policy, rank,
        world size, group); ``None`` otherwise."""
        return self._ranks

    def join_ranks(self, policy: str, rank: int, world_size: int, group: str, *,
                   launched_ms: int | None = None, started_ms: int | None = None) -> None:
        """Log as rank ``rank`` of ``world_size`` of the job ``group`` (see
        :mod:`steplog.ranks`); called before the run is opened.

        ``"all"``: the run is shared by every rank of the job: rank 0 creates it, tagged with a
        token derived from ``group``, the experiment and the run name; another rank finds it by
        that token, among the runs started at ``launched_ms`` or later (a run an earlier
        launch with the same identity left RUNNING is older) that are RUNNING or ended at
        ``started_ms`` (this process's start) or later (rank 0 ended this launch's run before
        this rank looked; a run of an earlier launch ended before), and writes its metrics as
        ``rank<R>/<name>`` and its files under ``rank<R>/``
        (params and tags unprefixed); only rank 0 ends it, each rank sets the tag
        ``steplog.rank<R>.status`` at its close.
        ``"own"``: the rank's own run, named ``<run_name>-rank<R>`` (``rank<R>``). Both tag the
        run with ``steplog.group``, ``steplog.ranks`` and ``steplog.world_size``."""
        if policy not in ("all", "own"):
            raise ValueError(f"policy must be 'all' or 'own', got {policy!r}")
        if self._resume is not None:
            raise ValueError(f"run_id continues one run, but the rank policy {policy!r} gives "
                             "the ranks a shared run or one run each; continue a run with the "
                             "rank policy 'zero' (only rank 0 logs)")
        self._ranks = {"policy": policy, "rank": rank, "world_size": world_size, "group": group}
        self._launched_ms = launched_ms if policy == "all" else None
        self._started_ms = started_ms if policy == "all" else None
        self._user_tags.update({"steplog.group": group, "steplog.ranks": policy,
                                "steplog.world_size": str(world_size)})
        if policy == "own":
            self._user_tags["steplog.rank"] = str(rank)
            self.run_name = f"{self.run_name}-rank{rank}" if self.run_name else f"rank{rank}"
        else:
            key = (rank, group, self.experiment_name, self.run_name or "")
            with _SHARED_LOCK:  # the n-th such logger of every rank shares one run
                nth = _SHARED_RUNS[key]
                _SHARED_RUNS[key] += 1
            self._token = shared_run_token(group, self.experiment_name, self.run_name, nth)
        self._use_ranks()

    def _use_ranks(self) -> None:
        ranks = self._ranks
        self._keys = (_RankKeys(f"rank{ranks['rank']}/")
                      if ranks is not None and ranks["policy"] == "all" else None)

    @property
    def _shared(self) -> bool:
        return self._ranks is not None and self._ranks["policy"] == "all"

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, ``None`` until :meth:`open` succeeded."""
        return None if self._run is None else self._run.run_id

    @property
    def experiment_id(self) -> str | None:
        """The MLflow experiment id, ``None`` until :meth:`open` succeeded."""
        return None if self._run is None else self._run.experiment_id

    @property
    def host_pid(self) -> int | None:
        """The process id of the sink host running MLflow's client for this run, ``None`` when
        the sink speaks REST itself (or no host runs at the moment)."""
        host = getattr(self._transport, "host", None)
        return None if host is None else host.pid

    def describe(self) -> str:
        where = redact(self.tracking_uri)
        if self._run is None:
            if self._resume is not None:
                return f"mlflow {where} run {self._resume}"
            return f"mlflow {where} experiment {self.experiment_name!r}"
        if where.startswith(("http://", "https://")):
            run = self._run
            return f"{where.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
        return f"mlflow {where} run {self._run.run_id}"

    def replayable(self) -> bool:
        """MLflow stores identical metric rows once and accepts an unchanged param again,
        except in a local file store (``file:``/``./mlruns``), which keeps every row."""
        scheme = urllib.parse.urlsplit(self.tracking_uri).scheme
        return scheme not in ("", "file")

    def target(self) -> dict[str, Any] | None:
        run = self._run
        return {
            "tracking_uri": portable_uri(self.tracking_uri),
            "experiment_name": self.experiment_name,
            "run_name": self.run_name,
            "run_token": self._token,
            "run_id": run.run_id if run else None,
            "experiment_id": run.experiment_id if run else None,
            "artifact_uri": run.artifact_uri if run else None,
            "registered_model_name": self.registered_model_name,
            "request_timeout_s": self.request_timeout_s,
            "tags": self._user_tags,
            "ranks": self._ranks,
            "max_in_flight": self.max_in_flight,
            "resume_run_id": self._resume,
            "launched_ms": self._launched_ms,
            "started_ms": self._started_ms,
            "ends_shared": self._ends_shared,
        }

    @classmethod
    def reattach(cls, target: dict[str, Any]) -> MLflowSink:
        """Writes into the run ``target`` names; one whose creation never succeeded is found by
        its token or created by :meth:`open`. Credentials come from the environment, as for
        any MLflow client (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME``...); the
        requests in flight from :data:`IN_FLIGHT_ENV` when set, else as the logger had them."""
        in_flight = None if os.environ.get(IN_FLIGHT_ENV) else target.get("max_in_flight")
        sink = cls(target["experiment_name"], tracking_uri=target["tracking_uri"],
                   run_name=target.get("run_name"),
                   request_timeout_s=float(target.get("request_timeout_s", 30.0)),
                   registered_model_name=target.get("registered_model_name"),
                   tags=target.get("tags"), max_in_flight=in_flight,
                   run_id=target.get("resume_run_id"))
        sink.prepare()
        sink._reattached = True
        if target.get("ranks"):
            sink._ranks = dict(target["ranks"])
            sink._use_ranks()
            if sink._shared:  # which launch's shared run the journal belongs to
                sink._launched_ms = target.get("launched_ms")
                sink._started_ms = target.get("started_ms")
                sink._active_ms = target.get(ACTIVE_UNTIL)
                sink._ends_shared = bool(target.get("ends_shared"))
        if target.get("run_token"):
            sink._token = target["run_token"]
            sink._create_tried = True  # look for the run before creating one
        if target.get("run_id"):
            sink._run = RunRef(target["run_id"], target["experiment_id"],
                               target["artifact_uri"])
        sink._transport = make_transport(sink.tracking_uri, sink.request_timeout_s,
                                         sink.max_in_flight)
        return sink

    @classmethod
    def redirected(cls, target: dict[str, Any], tracking_uri: str) -> dict[str, Any]:
        """The target of a new run at ``tracking_uri`` for what the run ``target`` describes
        lacks: the same experiment name, run name, user tags, registered model and request
        timeout, a run token of its own (so an interrupted move finds its run again instead of
        creating a second one; the same token for every journal of one original run, so that
        the journals of a continued run move into one new run), no run yet, and a
        ``steplog.moved_from`` tag naming the original run. ``ValueError`` for a tracking URI
        MLflow can never use, or for a local file store (``file:``, a plain path), which stores
        a row again each time it is sent, so an interrupted move would leave duplicates."""
        problem = tracking_uri_problem(tracking_uri)
        if problem is not None:
            raise ValueError(problem)
        if urllib.parse.urlsplit(tracking_uri).scheme in ("", "file"):
            raise ValueError(f"{tracking_uri!r} is a local file store, which keeps every row "
                             "it is sent: a sync that is interrupted and run again would "
                             "store points twice there; use a server or a database URI "
                             "(sqlite:///..., http://...)")
        origin = target.get("tracking_uri") or "?"
        if target.get("run_id") or target.get("resume_run_id"):
            origin += f" run {target.get('run_id') or target['resume_run_id']}"
        else:
            origin += f" experiment {target.get('experiment_name')!r} (its run never existed)"
        tags = {str(k): str(v) for k, v in (target.get("tags") or {}).items()}
        tags[MOVED_FROM_TAG] = origin
        token = uuid.uuid4().hex
        original = target.get("run_id") or target.get("resume_run_id")
        if (target.get("ranks") or {}).get("policy") == "all" and target.get("run_token"):
            # Every rank's journal of a shared run moves into one new shared run.
            moved = f"{target['run_token']}\0{portable_uri(tracking_uri)}"
            token = hashlib.sha256(moved.encode()).hexdigest()[:32]
        elif original:
            # Every journal of one run (a run continued by later loggers) moves into one new
            # run: each finds the run the first move created by this token.
            moved = f"run {original}\0{target.get('tracking_uri')}\0{portable_uri(tracking_uri)}"
            token = hashlib.sha256(moved.encode()).hexdigest()[:32]
        return {
            **target,
            "tracking_uri": portable_uri(tracking_uri),
            "run_token": token,
            "ends_shared": False,  # the sync that creates the new shared run ends it
            "run_id": None,
            "experiment_id": None,
            "artifact_uri": None,
            "tags": tags,
            "resume_run_id": None,
        }

    def release(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- lifecycle ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Refuse a tracking URI MLflow can never use (``ValueError``), before any thread starts."""
        problem = tracking_uri_problem(self.tracking_uri)
        if problem is not None:
            raise ValueError(problem)

    def open(self) -> None:
        """The experiment exists and this sink's run is RUNNING (created, or the ``run_id``
        given set RUNNING again); safe to call again after a failure (a run created by an
        attempt whose answer was lost is found, not duplicated)."""
        if self._run is not None:
            return
        if self._transport is None:
            self._transport = make_transport(self.tracking_uri, self.request_timeout_s,
                                             self.max_in_flight)
        transport = self._transport
        if self._resume is not None:
            # A sync (reattached) writes into the run as it is and ends it only when the
            # logger closed: it never leaves it RUNNING.
            self._run = transport.resume_run(self._resume, self.experiment_name,
                                             running=not self._reattached)
            return
        exp_id = transport.experiment_id(self.experiment_name)
        ranks = self._ranks
        if ranks is not None and ranks["policy"] == "all" and (
                self._reattached or ranks["rank"] != 0):
            self._run = self._find_shared(transport, exp_id)
            if self._run is not None:
                return
            # A sync creates the shared run that rank 0 never created (a later one finds it).
        elif self._create_tried:
            found = transport.find_run(exp_id, self._token, running_only=self._shared,
                                       since_ms=self._launched_ms)
            if found is not None:
                self._run = found
                return
        tags = transport.run_tags(self._user_tags)
        tags[RUN_TOKEN_TAG] = self._token
        self._create_tried = True
        start = now_ms()
        if self._shared and self._reattached:
            # The run rank 0 never created: it starts when this rank's process did, among
            # its launch's runs (a later launch with the same identity never joins it), and
            # this sync ends it.
            start = self._started_ms if self._started_ms is not None else start
            self._ends_shared = True
        self._run = transport.create_run(exp_id, self.run_name, tags, start)

    def _find_shared(self, transport: Transport, exp_id: str) -> RunRef | None:
        """The shared run of this job, ``None`` for a sync when it does not exist; in a
        training process ``RetryableError`` when rank 0 has not created it yet."""
        if self._reattached:
            # The oldest started since the journal's launch, while its process still logged:
            # also once rank 0 ended it; a later launch with the same identity started later.
            # (A journal of an older steplog names no launch: the newest, as it did.)
            last = max(self._started_ms or 0, self._active_ms or 0)
            return transport.find_run(exp_id, self._token, since_ms=self._launched_ms,
                                      until_ms=latest_start_ms(last) if last else None,
                                      oldest=self._launched_ms is not None)
        deadline = time.monotonic() + _JOIN_WAIT_S
        while True:
            found = transport.find_run(exp_id, self._token, since_ms=self._launched_ms)
            if found is not None and self._this_launch(found):
                return found
            if time.monotonic() >= deadline or self.deadline_passed():
                raise RetryableError(
                    f"the run shared by the ranks (experiment {self.experiment_name!r}) does "
                    "not exist yet: rank 0 creates it when its logger starts; until then this "
                    "rank's records wait in its journal")
            time.sleep(_JOIN_POLL_S)

    def _this_launch(self, run: RunRef) -> bool:
        """Whether ``run``, the newest shared run started since the launch floor, is this
        launch's: still RUNNING, or ended once this process had started (rank 0 logged and
        ended its whole run before this rank looked; a run of an earlier launch ended
        before)."""
        if run.status == "RUNNING":
            return True
        started = self._started_ms
        return started is not None and run.end_ms is not None and run.end_ms >= started

    def close(self, status: RunStatus) -> None:
        """The run is ended with ``status`` and the connections are closed (no-op if never
        opened; safe to call again after a failure). A shared run (rank policy ``"all"``)
        gets this rank's status as the tag ``steplog.rank<R>.status``, and is ended by rank 0
        only."""
        if self._transport is None:
            return
        ranks = self._ranks
        if self._run is not None and ranks is not None and ranks["policy"] == "all":
            tag: dict[str, str] = {f"steplog.rank{ranks['rank']}.status": status}
            self._transport.log_batch(self._run.run_id, Chunk(_scalars(Batch()), tags=tag))
            if ranks["rank"] == 0 or self._ends_shared:
                self._transport.end_run(self._run.run_id, status, now_ms())
        elif self._run is not None:
            self._transport.end_run(self._run.run_id, status, now_ms())
        self._transport.close()
        self._transport = None

    # -- metrics lane ------------------------------------------------------------------------

    def check_name(self, name: str) -> None:
        """Raise ``ValueError`` if MLflow refuses ``name`` as a key (length, characters, path)."""
        problem = key_problem(self._keys[name] if self._keys is not None else name)
        if problem is not None:
            raise ValueError(problem)
        self._good_keys.add(name)

    def write(self, records: Sequence[MetricRecord]) -> None:
        """Store the batch with as few ``log-batch`` requests as MLflow's limits allow.

        The batch is validated before anything of it is stored: a bad key or a param whose
        value differs from one logged earlier in this run raises :class:`PermanentError`
        naming it, and nothing is sent (on the sqlite fast path the sink host checks the keys
        of the points it is sent, and stores none of them). A failure part way leaves only
        what a retry of the same batch writes again identically (metric rows are stored once;
        params with the same value and tags are accepted again). With several requests in
        flight, a retry of the same batch sends only the requests that were not stored.
        """
        if self._run is None or self._transport is None:
            raise RetryableError("the MLflow run is not open yet")
        if not records:
            return
        run_id = self._run.run_id
        if self._fast is None:
            self._probe_fast_path(run_id)
        if self._fast:
            batch = Batch.of(records)
            if all(type(p) is Scalars or type(p) is Scalar for p in batch.parts):
                # The host checks every key it stores by MLflow's rules before it writes a
                # row: not here, where reading every row again costs this process's GIL.
                if self._keys is not None:  # a shared run: stored as rank<R>/<name>
                    batch = batch.renamed(self._keys.__getitem__)
                cast("_FastTransport", self._transport).log_metrics(run_id, batch)
                return
        log_streams = getattr(self._transport, "log_streams", None)
        if self.max_in_flight > 1 and log_streams is not None:
            partial, self._partial = self._partial, None
            if partial is not None and partial[0] is records:
                streams, stored = partial[1], partial[2]
            else:
                batch = self._check_keys(records)
                if not scalars_only(batch):
                    streams, stored = [], set()
                else:
                    if self._keys is not None:  # a shared run: stored as rank<R>/<name>
                        batch = batch.renamed(self._keys.__getitem__)
                    streams = key_streams(batch, self.max_in_flight)
                    stored = set()
            if streams:
                try:
                    log_streams(run_id, streams, stored)
                except BaseException:
                    self._partial = (records, streams, stored)
                    raise
                return
        chunks = self._plan(records)
        for chunk in chunks:
            if self._keys is not None:  # a shared run: stored as rank<R>/<name>
                chunk.rename = self._keys.__getitem__
            self._transport.log_batch(run_id, chunk)
            if chunk.params:
                self._params.update(chunk.params)

    def _check_keys(self, records: Sequence[MetricRecord]) -> Batch:
        """``records`` as a batch; :class:`PermanentError` naming a key MLflow refuses."""
        batch = Batch.of(records)
        unknown = batch.names() - self._good_keys
        for key in unknown:
            problem = key_problem(self._keys[key] if self._keys is not None else key)
            if problem is not None:
                raise PermanentError(problem)
        self._good_keys |= unknown
        return batch

    def _plan(self, records: Sequence[MetricRecord]) -> list[Chunk]:
        """Validate ``records`` and cut them into requests, keeping call order between requests.

        Metrics stay slices of the batch's blocks (no object per scalar): the transport encodes
        each request's metrics from them in one pass."""
        batch = self._check_keys(records)
        n = len(batch)
        if all(type(p) is Scalars or type(p) is Scalar for p in batch.parts):  # the common case
            step = MAX_METRICS_PER_REQUEST
            return [Chunk(_scalars(batch[i : i + step])) for i in range(0, n, step)]

        chunks: list[Chunk] = []
        cur = Chunk(_scalars(Batch()))
        pending: dict[str, str] = {}
        for rec in batch.parts:
            if isinstance(rec, (Scalars, Scalar)):
                run = Batch([rec])
                while run:
                    room = cur.metric_room()
                    if room <= 0:
                        chunks.append(cur)
                        cur = Chunk(_scalars(Batch()))
                        continue
                    cast(Batch, cur.metrics).extend(run[:room])
                    run = run[room:]
                continue
            if type(rec) is Param:
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
                    cur = Chunk(_scalars(Batch()))
                cur.params[rec.name] = value
            elif type(rec) is Tag:
                value = str(rec.value)[:MAX_TAG_VALUE_LENGTH]
                if rec.name not in cur.tags and not cur.settings_room():
                    chunks.append(cur)
                    cur = Chunk(_scalars(Batch()))
                cur.tags[rec.name] = value  # later value of a tag wins, as on the server
            else:
                raise PermanentError(f"the mlflow sink cannot write a {type(rec).__name__}")
        if cur:
            chunks.append(cur)
        return chunks

    def _probe_fast_path(self, run_id: str) -> None:
        """Ask the sink host whether it writes this run's points into the sqlite store
        itself, and why not (for :meth:`info`)."""
        probe = getattr(self._transport, "metrics_path", None)
        if not callable(probe):
            self._fast = False  # REST: MLflow's server stores them
            return
        reason = probe(run_id)
        self._fast = reason is None
        if reason is None:
            self._info = {"metrics_path": "sqlite fast path"}
            return
        self._info = {"metrics_path": "log_batch", "fast_path_off": str(reason)}
        from steplog.sinks.mlflow.sqlite_fast import (
            DISABLE_ENV,
            RUN_NOT_WRITABLE,
            fast_path_disabled,
        )

        if fast_path_disabled() is None and not str(reason).startswith(RUN_NOT_WRITABLE):
            # The store itself is off the fast path (another MLflow version's schema, say):
            # worth knowing, since every point then costs MLflow's own store code.
            warnings.warn(f"steplog: metric points go through MLflow's log_batch (about "
                          f"10,000 points/s), not steplog's sqlite fast path: {reason}. Set "
                          f"{DISABLE_ENV}=0 to choose log_batch without this warning",
                          SteplogWarning, stacklevel=2)

    def info(self) -> dict[str, str]:
        """How metric points are stored: ``metrics_path`` is ``"sqlite fast path"`` or
        ``"log_batch"`` (then ``fast_path_off`` says why) once the first batch was written
        through MLflow's client in a sink host; empty otherwise."""
        return dict(self._info)

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
        if self._keys is not None:  # a shared run: each rank's files in its own folder
            path = f"{self._keys.prefix}{path}" if path else self._keys.prefix.rstrip("/")
        policy = artifact.checkpoint and is_dir
        if policy:
            path = f"{path}/step_{artifact.step or 0}"  # one artifact folder per snapshot
        key = (path, artifact.timestamp)
        if key not in self._uploaded:  # a retry after a failed registration: stored already
            self._transport.upload(self._run, artifact, path)
            self._uploaded.add(key)
        if policy and self.registered_model_name is not None:
            tags = {"step": str(artifact.step or 0), "steplog.name": artifact.name}
            try:
                self._transport.register_version(self.registered_model_name, self._run, path,
                                                 tags)
            except PermanentError as exc:
                raise PermanentError(
                    f"stored as run artifact {path!r}, but registering it as a version of "
                    f"model {self.registered_model_name!r} failed: {exc}"
                ) from exc
        self._uploaded.discard(key)


class _RankKeys(dict[str, str]):
    """Metric name -> the name with this rank's prefix (built once per name)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def __missing__(self, name: str) -> str:
        key = self[name] = self.prefix + name
        return key


def _scalars(batch: Batch) -> Sequence[Scalar]:
    """A batch known to hold scalars only."""
    return cast("Sequence[Scalar]", batch)


def portable_uri(uri: str) -> str:
    """``uri`` usable from another working directory and without secrets: a relative path
    made absolute (:func:`absolute_uri`), user, password and query string removed from a
    server's URL."""
    parts = urllib.parse.urlsplit(redact(absolute_uri(uri)))
    if parts.scheme in ("http", "https"):
        return parts._replace(query="", fragment="").geturl()
    return redact(absolute_uri(uri))


def _param_str(value: Any) -> str:
    return str(value)[:MAX_PARAM_VALUE_LENGTH]


def _in_flight(value: int | None) -> int:
    """``max_in_flight``, else :data:`IN_FLIGHT_ENV`, else the default; checked."""
    what = "max_in_flight"
    if value is None:
        text = os.environ.get(IN_FLIGHT_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_IN_FLIGHT
        what = IN_FLIGHT_ENV
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{IN_FLIGHT_ENV}={text!r} is not a whole number") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_in_flight must be an int, got {type(value).__name__}")
    if not 1 <= value <= _MOST_IN_FLIGHT:
        raise ValueError(f"{what} must be between 1 and {_MOST_IN_FLIGHT}, got {value}")
    return value


def make_transport(tracking_uri: str, timeout_s: float, in_flight: int = 1) -> Transport:
    """REST in this process when MLflow's client is not needed, else MlflowClient in a host."""
    from steplog.sinks.mlflow.rest import RestTransport, needs_mlflow_client

    reason = needs_mlflow_client(tracking_uri)
    if reason is None:
        return RestTransport(tracking_uri, timeout_s, in_flight)
    from steplog.sinks.mlflow.client import HostTransport

    return HostTransport(tracking_uri, timeout_s)
