"""The rank policy: which ranks of a distributed job log, and into which runs.

A process started by ``torchrun`` (or any launcher that sets the same variables) knows its place
from ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. Without ``RANK`` the process is not one of
several ranks, and every policy logs as a single process does. With it, the policy chosen by
``Options(ranks=...)``, else ``$STEPLOG_RANKS``, else ``"zero"``, decides:

* ``"zero"``: rank 0 logs; every other rank gets an inert logger (:class:`InertLogger`) whose
  ``log_*`` calls return at once and which opens no sink, journal, host or connection.
* ``"all"``: every rank logs into one shared run, its metrics named ``rank<R>/<name>``; rank 0
  creates the run, the others find it by a token derived from the job's identity
  (:func:`job_identity`) and the run's names, among the runs started since this launch began
  (:func:`launch_floor_ms`) that are still running or ended after this process started (a
  rank slower than rank 0's whole run still joins it). Parameters and tags are the run's,
  unprefixed.
* ``"own"``: every rank logs its own run, tagged with the job's group id so they are found
  together.

Under ``"all"`` and ``"own"`` each rank journals in ``<runs_dir>/rank<R>/``, so the journals
of two ranks never share a directory, and only ``LOCAL_RANK`` 0 samples system metrics (one
sampler per node). No rank waits for another: a rank whose shared run does not exist yet keeps
its records in its journal and delivers them once rank 0 created it (or ``steplog sync`` does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from steplog.results import CloseResult, FlushResult, Stats

if TYPE_CHECKING:
    from steplog.lifecycle import State
    from steplog.sinks.base import Sink

__all__ = [
    "ENV",
    "GROUP_ENV",
    "POLICIES",
    "InertLogger",
    "RankPlan",
    "RankPolicy",
    "check_policy",
    "inert_class",
    "job_identity",
    "latest_start_ms",
    "launch_floor_ms",
    "plan",
]

RankPolicy = Literal["zero", "all", "own"]
"""Which ranks log: rank 0 only, all into one run, or each into its own run."""

POLICIES: tuple[RankPolicy, ...] = ("zero", "all", "own")
ENV = "STEPLOG_RANKS"
"""The environment variable naming the policy when ``Options.ranks`` is ``None``."""
GROUP_ENV = "STEPLOG_GROUP"
"""An explicit job identity shared by the ranks (overrides the launcher's variables)."""

_IDENTITY_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "MASTER_ADDR",
                  "MASTER_PORT")
"""What tells one launch of a job from another, as every rank of it sees it (not
``TORCHELASTIC_RESTART_COUNT``: each node's agent counts its own restarts)."""
_SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
"""The rank variables ``srun`` sets, read when ``RANK`` is not set."""
LAUNCH_SKEW_S = 300.0
"""How much earlier than this process another rank of its launch may have started (launchers
that start nodes one after the other, clocks of different nodes)."""


def check_policy(value: object, where: str = "ranks") -> RankPolicy:
    """``value`` as a policy, or ``ValueError`` naming ``where`` it came from."""
    if value == "zero" or value == "all" or value == "own":
        return value
    raise ValueError(f"{where} must be one of 'zero', 'all', 'own', got {value!r}")


def _int_env(environ: Mapping[str, str], name: str, lowest: int) -> int | None:
    text = environ.get(name)
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {text!r}") from None
    if value < lowest:
        raise ValueError(f"${name} must be >= {lowest}, got {value}")
    return value


def job_identity(environ: Mapping[str, str]) -> str | None:
    """A 16-hex-digit id that every rank of one launch computes alike: from ``$STEPLOG_GROUP``
    when set, else from the launcher's variables (torchrun's run id, SLURM's
    job and step, ``MASTER_ADDR``/``MASTER_PORT``) and ``WORLD_SIZE``. ``None`` when none of
    them is set."""
    explicit = environ.get(GROUP_ENV, "").strip()
    if explicit:
        parts = [GROUP_ENV, explicit]
    else:
        parts = [f"{name}={environ[name]}" for name in _IDENTITY_VARS if environ.get(name)]
        if not parts:
            return None
        parts.append(f"WORLD_SIZE={environ.get('WORLD_SIZE', '')}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def process_start_s() -> float | None:
    """When this process started, in seconds since the epoch (``/proc`` on Linux, else psutil
    when installed); ``None`` when neither tells."""
    try:
        with open("/proc/self/stat", "rb") as f:
            ticks = int(f.read().rpartition(b")")[2].split()[19])  # field 22, starttime
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return float(psutil.Process().create_time())


def launch_floor_ms() -> int | None:
    """The earliest start time (ms since the epoch) of a run that this launch's rank 0 can have
    created: this process's start less :data:`LAUNCH_SKEW_S`. A RUNNING run with the same token
    that started before it belongs to an earlier launch with the same identity that crashed."""
    started = _process_start_ms()
    return None if started is None else _floor_ms(started)


def _process_start_ms() -> int | None:
    started = process_start_s()
    return None if started is None else int(started * 1000)


def _floor_ms(started_ms: int) -> int:
    return started_ms - int(LAUNCH_SKEW_S * 1000)


def latest_start_ms(started_ms: int) -> int:
    """The latest start time (ms since the epoch) of a run that the rank 0 of the launch of a
    process started at ``started_ms`` can have created (a later one is a later launch's)."""
    return started_ms + int(LAUNCH_SKEW_S * 1000)


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """What the rank policy means for this process."""

    policy: RankPolicy
    distributed: bool
    """Whether ``RANK`` is set (else every policy logs as a single process)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    group: str | None = None
    """The job's identity (:func:`job_identity`) under ``"all"`` and ``"own"``."""
    started_ms: int | None = None
    """Under ``"all"``: when this process started (ms since the epoch). A shared run that
    rank 0 already ended is this launch's only when it ended then or later."""

    @property
    def launched_ms(self) -> int | None:
        """Under ``"all"``: the earliest start of this launch's shared run
        (:func:`launch_floor_ms`)."""
        return None if self.started_ms is None else _floor_ms(self.started_ms)

    @property
    def logs(self) -> bool:
        """Whether this process's loggers record anything."""
        return not self.distributed or self.policy != "zero" or self.rank == 0

    @property
    def splits(self) -> bool:
        """Whether ranks log side by side (``"all"``/``"own"`` in a distributed job)."""
        return self.distributed and self.policy != "zero"

    @property
    def samples_system(self) -> bool:
        """Whether this process samples system metrics: one rank per node (``LOCAL_RANK`` 0)."""
        return not self.distributed or self.local_rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size} (ranks={self.policy!r})"

    def runs_dir(self, runs_dir: str) -> str:
        """Where this rank's run directories go: ``<runs_dir>/rank<R>`` when ranks log side by
        side, so that two ranks' journals never share a directory."""
        return os.path.join(runs_dir, f"rank{self.rank}") if self.splits else runs_dir

    def adapt(self, sink: Sink) -> None:
        """Point ``sink`` at this rank's share of the job (before its ``prepare``): the shared
        or own MLflow run, ``<output_dir>/rank<R>`` for files, a ClearML Task per rank. A sink
        of another kind is left as it is. ``ValueError`` for ``"all"`` with ClearML, which
        has no shared Task."""
        if not self.splits:
            return
        assert self.group is not None
        kind = sink.kind
        if kind == "mlflow":
            join: Callable[..., None] = sink.join_ranks  # type: ignore[attr-defined]
            join(self.policy, self.rank, self.world_size, self.group,
                 launched_ms=self.launched_ms, started_ms=self.started_ms)
        elif kind == "file":
            out: Path = sink.output_dir  # type: ignore[attr-defined]
            sink.output_dir = out / f"rank{self.rank}"  # type: ignore[attr-defined]
        elif kind == "clearml":
            if self.policy == "all":
                raise ValueError("ranks='all' logs every rank into one shared run, which "
                                 "ClearML Tasks do not support; use ranks='own' (a Task per "
                                 "rank, tagged with the job's group) or 'zero'")
            tags = list(sink.tags or [])  # type: ignore[attr-defined]
            sink.tags = [*tags, f"steplog.group:{self.group}",  # type: ignore[attr-defined]
                         f"rank{self.rank}"]
            sink.task_name = f"{sink.task_name} rank{self.rank}"  # type: ignore[attr-defined]


def plan(option: str | None, environ: Mapping[str, str] | None = None) -> RankPlan:
    """This process's plan: the policy ``option`` (``Options.ranks``), else ``$STEPLOG_RANKS``,
    else ``"zero"``, applied to ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``, else (without ``RANK``)
    to ``srun``'s ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS`` (several tasks), else
    to ``LOCAL_RANK``/``NODE_RANK``/``WORLD_SIZE`` (above 1) as Lightning's launcher sets them
    (see :func:`_launched_rank`). ``ValueError`` for an unknown policy, malformed variables,
    or ``"all"``/``"own"`` in a job without an identity the ranks share (see
    :func:`job_identity`)."""
    env = os.environ if environ is None else environ
    if option is not None:
        policy = check_policy(option)
    else:
        text = env.get(ENV, "").strip()
        policy = check_policy(text, f"${ENV}") if text else "zero"
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    rank = _int_env(env, "RANK", 0)
    if (rank is None and env.get("SLURM_PROCID", "").strip()
            and (_int_env(env, "SLURM_NTASKS", 1) or 1) > 1):  # one task: a process of its own
        names = _SLURM_VARS  # started by srun alone, without torchrun
        rank = _int_env(env, names[0], 0)
    if rank is None and env.get("LOCAL_RANK", "").strip() and _several(env):
        # Lightning's own launcher (also inside a one-task srun, whose variables its
        # processes inherit) sets no RANK
        names = ("LOCAL_RANK", "LOCAL_RANK", "WORLD_SIZE")
        rank = _launched_rank(env, policy)
    if rank is None:
        return RankPlan(policy, distributed=False)
    world_size = _int_env(env, names[2], 1)
    if world_size is None:
        raise ValueError("$RANK is set but $WORLD_SIZE is not; a launcher such as torchrun "
                         "sets both")
    if rank >= world_size:
        what = (f"${names[0]} ({rank})" if names[0] != "LOCAL_RANK" else
                f"the rank $NODE_RANK * $LOCAL_WORLD_SIZE + $LOCAL_RANK ({rank})")
        raise ValueError(f"{what} must be below ${names[2]} ({world_size})")
    local_rank = _int_env(env, names[1], 0)
    group = None
    if policy != "zero":
        group = job_identity(env)
        if group is None:
            raise ValueError(
                f"ranks={policy!r} needs an identity every rank of the job shares, and none of "
                f"${GROUP_ENV}, {', '.join('$' + v for v in _IDENTITY_VARS)} is set; set "
                f"{GROUP_ENV} to a name unique to this launch")
    return RankPlan(policy, True, rank, rank if local_rank is None else local_rank,
                    world_size, group, _process_start_ms() if policy == "all" else None)


def _several(env: Mapping[str, str]) -> bool:
    """Whether ``$WORLD_SIZE`` says a job of several ranks (``ValueError`` naming it when it
    is set but not a positive integer)."""
    world_size = _int_env(env, "WORLD_SIZE", 1)
    return world_size is not None and world_size > 1


def _launched_rank(env: Mapping[str, str], policy: str) -> int:
    """The global rank of a process that a launcher started with ``LOCAL_RANK``,
    ``WORLD_SIZE`` and (several nodes) ``NODE_RANK`` but no ``RANK``, as Lightning's default
    DDP launcher does: ``NODE_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK``. Without
    ``LOCAL_WORLD_SIZE`` on a node other than 0, only the ``"zero"`` policy can go on (the
    process is not rank 0, whatever its number); ``"all"``/``"own"`` raise ``ValueError``."""
    local = _int_env(env, "LOCAL_RANK", 0) or 0
    node = _int_env(env, "NODE_RANK", 0) or 0
    if node == 0:
        return local
    per_node = _int_env(env, "LOCAL_WORLD_SIZE", 1)
    if per_node is not None:
        return node * per_node + local
    if policy == "zero":
        return node + local  # at least 1, below WORLD_SIZE: a rank that does not log
    raise ValueError(f"ranks={policy!r}: $LOCAL_RANK and $NODE_RANK ({node}) are set but "
                     "neither $RANK nor $LOCAL_WORLD_SIZE, so this process's global rank is "
                     "unknown; set $RANK (torchrun does)")


# -- the inert logger ---------------------------------------------------------------------------

_KEPT_ARGUMENTS = ("logging_freq", "experiment_name", "run_name", "output_dir", "project_name",
                   "task_name")
"""Constructor arguments an inert logger keeps as attributes, as the real one does."""


class InertLogger:
    """Mixed before a logger class for a rank that does not log: every ``log_*``/``save_*``
    call returns at once (no validation, no capture), ``flush``/``close`` return truthy results
    whose ``inactive`` says why nothing was logged, and no sink, journal, thread, host or
    connection is ever made. ``should_log`` (the logger class's own) answers as on rank 0, so
    code that runs collective operations under it stays in step across ranks."""

    _inert_reason = ""
    logging_freq = 1
    last_logging_iteration = 0
    run_id = None
    run_dir = None
    task = None
    offline_session = None
    sink = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A wrong call raises TypeError, as the real constructor would.
        real: Any = type(self).__mro__[2]  # the logger class this one stands in for
        bound = inspect.signature(real.__init__).bind(self, *args, **kwargs)
        given = dict(bound.arguments)
        bound.apply_defaults()
        if "logging_freq" in bound.arguments:  # a subclass's own default too, as on rank 0
            given["logging_freq"] = bound.arguments["logging_freq"]
        for name in _KEPT_ARGUMENTS:
            if name in given:
                setattr(self, name, given[name])
        if given.get("output_dir") is not None:
            self.output_dir = os.fspath(given["output_dir"])
        from steplog.pipeline.options import Options, options_given

        self.options = options_given(args, kwargs) or Options()  # as the real logger's
        self.exit_timeout_s = self.options.exit_timeout_s

    def log_scalar(self, name: str, value: Any, iteration: int | None = None) -> None:
        return None

    def log_metrics(self, metrics: Any, iteration: int | None = None) -> None:
        return None

    def log_parameters(self, params: Any) -> None:
        return None

    def log_tags(self, tags: Any) -> None:
        return None

    def log_artifact(self, path: Any, **kwargs: Any) -> None:
        return None

    def log_file(self, path: Any, name: str, move: bool = False) -> None:
        return None

    def log_directory(self, dir: Any, path: str | None = None) -> None:
        return None

    def log_figure(self, fig: Any, name: str, iteration: int | None = None) -> None:
        return None

    def log_text(self, text: str, name: str, iteration: int | None = None) -> None:
        return None

    def log_image(self, image: Any, name: str, iteration: int | None = None, *,
                  dataformats: str = "HWC") -> None:
        return None

    def save_policy(self, policy: Any, name: str = "policy", **kwargs: Any) -> None:
        return None

    def save_agent(self, agent: Any, name: str = "agent.pth") -> None:
        return None

    def flush(self, timeout: float | None = None) -> FlushResult:
        return FlushResult(ok=True, pending=0, elapsed_s=0.0, inactive=self._inert_reason)

    def close(self, timeout: float | None = None, status: str = "FINISHED") -> CloseResult:
        return CloseResult(ok=True, delivered=0, undelivered=0, dropped=0, rejected=0,
                           elapsed_s=0.0, timed_out=False, inactive=self._inert_reason)

    def continued(self) -> InertLogger:
        return self  # this rank logs nothing, in any stage

    @property
    def state(self) -> State:
        from steplog.lifecycle import State

        return State.INERT

    def stats(self) -> Stats:
        return Stats(enqueued=0, delivered=0, dropped=0, rejected=0, failed=0, retried=0,
                     queue_depth=0, lag_s=0.0, sinks={})

    async def aflush(self, timeout: float | None = None) -> FlushResult:
        return self.flush(timeout)

    async def aclose(self, timeout: float | None = None, status: str = "FINISHED") -> CloseResult:
        return self.close(timeout, status)

    def __enter__(self) -> InertLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    async def __aenter__(self) -> InertLogger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


T = TypeVar("T")
_inert_classes: dict[tuple[type[Any], str], type[Any]] = {}


def inert_class(cls: type[T], rank_plan: RankPlan) -> type[T]:
    """``cls`` with :class:`InertLogger` before it (one class per logger class and plan); an
    inert class given is replaced by the class it stands in for."""
    if issubclass(cls, InertLogger):  # e.g. type(inert_logger)(...), copy.copy(inert_logger)
        cls = cls.__mro__[2]
    reason = (f"nothing is logged on {rank_plan.describe()}: only rank 0 logs; set "
              f"Options(ranks='all'|'own') or {ENV} to log from every rank")
    key = (cls, reason)
    inert = _inert_classes.get(key)
    if inert is None:
        inert = type(f"Inert{cls.__name__}", (InertLogger, cls),
                     {"_inert_reason": reason, "__module__": cls.__module__})
        _inert_classes[key] = inert
    return cast("type[T]", inert)
