"""What a pipeline is given: its tuning (:class:`Options`, :data:`FullPolicy`) and its owner.

Guarantee: an :class:`Options` that exists is valid (every count an int >= 1, every duration a
finite number of seconds, every policy one of its names; ``ValueError``/``TypeError`` at
construction otherwise), so nothing downstream checks them again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from steplog.checkpoints import CheckpointPolicy
from steplog.journal import MIN_MAX_BYTES, Durability
from steplog.ranks import RankPolicy, check_policy
from steplog.retry import RetryPolicy, check_seconds

__all__ = ["FullPolicy", "Options", "Owner", "options_given"]

FullPolicy = Literal["block", "drop", "spill"]
"""What happens when records arrive faster than a sink takes them. ``block``: when the queue is
full, a ``log_*`` call waits for room (up to ``block_timeout_s``, then drops and counts).
``drop``: such a call drops its record at once and counts it. ``spill``: a journaled sink's lane
that holds ``lane_capacity`` records in memory takes further chunks as references to their
journal frames, read back when the sink catches up, so the drain thread and the training loop
never wait for that sink; a sink that is not journaled, or a journal that stopped, falls back
to ``block``."""


@dataclass(frozen=True)
class Options:
    """Tuning of one logger's pipeline; the defaults suit a training loop. Every duration is
    a finite number of seconds (``ValueError`` otherwise)."""

    queue_size: int = 1_000_000
    """Most items (a scalar, a metric dict, a record) waiting for the drain thread."""
    full_policy: FullPolicy | None = None
    """See :data:`FullPolicy`; ``None``: ``"spill"`` when the logger journals (a remote sink),
    else ``"block"``."""
    block_timeout_s: float = 30.0
    """With ``block``: longest a ``log_*`` call waits for room before dropping its record."""
    drain_interval_s: float = 0.2
    """How often the drain thread takes the queue while records come; bounds the timestamp
    error of scalars and what a ``kill -9`` can take from memory. After an interval with no
    record it sleeps until the next one. Each drain runs on the training process's GIL, so a
    shorter interval costs the training loop more."""
    lane_capacity: int = 1_000_000
    """Most records held in memory per sink lane; beyond it the drain thread waits for the sink
    (backpressure), or spills to the journal (``full_policy="spill"``)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 120.0
    """Deadline of ``flush()`` and ``close()`` called without a timeout (and of ``with``)."""
    exit_timeout_s: float = 30.0
    """Deadline of the close that runs at interpreter exit when the user did not close."""
    journal: bool | None = None
    """Journal metric records in the run directory for ``steplog sync`` (``None``: when a
    sink is remote, i.e. MLflow or an online ClearML Task)."""
    journal_durability: Durability = "flush"
    """When journal frames reach the disk: ``"none"`` (the OS writes them back: a killed
    process loses nothing, a power cut may), ``"flush"`` (also at every ``flush()`` and at
    close) or ``"always"`` (an fsync per drained chunk)."""
    journal_max_bytes: int | None = None
    """Most bytes of journal on disk (``None``: no bound); past it the logger warns and goes
    on without the journal. Segments every sink acknowledged are removed as the run goes (a
    segment holds at most a quarter of this bound), so it bounds what the sinks still lack."""
    runs_dir: str = field(
        default_factory=lambda: os.environ.get("STEPLOG_RUNS_DIR", "steplog-runs"))
    """The run directories: journals of loggers with a remote sink, and uploads that failed
    after their retries, for ``steplog sync`` (relative to the working directory at
    construction; default ``$STEPLOG_RUNS_DIR``, else ``steplog-runs``)."""
    checkpoint_memory_bytes: int = 4 * 1024**3
    """Most bytes of checkpoint snapshots held in memory while they wait to be written."""
    checkpoint_policy: CheckpointPolicy = "wait"
    """At that bound: ``"wait"`` (up to ``block_timeout_s``, then ``TimeoutError``) or
    ``"supersede"`` (first drop pending snapshots of the same name no sink started on)."""
    ranks: RankPolicy | None = None
    """Which ranks of a distributed job log (see :mod:`steplog.ranks`): ``"zero"``, ``"all"``
    or ``"own"``; ``None``: ``$STEPLOG_RANKS``, else ``"zero"``."""

    def __post_init__(self) -> None:
        for name in ("queue_size", "lane_capacity"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if type(self.checkpoint_memory_bytes) is not int or self.checkpoint_memory_bytes < 1:
            raise ValueError(f"checkpoint_memory_bytes must be an int >= 1, got "
                             f"{self.checkpoint_memory_bytes!r}")
        if self.journal_durability not in ("none", "flush", "always"):
            raise ValueError(f"journal_durability must be 'none', 'flush' or 'always', got "
                             f"{self.journal_durability!r}")
        if self.journal_max_bytes is not None and (
            type(self.journal_max_bytes) is not int or self.journal_max_bytes < MIN_MAX_BYTES
        ):
            raise ValueError(f"journal_max_bytes must be None or an int >= {MIN_MAX_BYTES}, "
                             f"got {self.journal_max_bytes!r}")
        if self.checkpoint_policy not in ("wait", "supersede"):
            raise ValueError(f"checkpoint_policy must be 'wait' or 'supersede', got "
                             f"{self.checkpoint_policy!r}")
        if self.full_policy not in (None, "block", "drop", "spill"):
            raise ValueError(f"full_policy must be None, 'block', 'drop' or 'spill', got "
                             f"{self.full_policy!r}")
        if self.full_policy == "spill" and self.journal is False:
            raise ValueError("full_policy='spill' keeps records in the journal: it needs "
                             "journal=None or True")
        check_seconds(self.block_timeout_s, "block_timeout_s")
        check_seconds(self.drain_interval_s, "drain_interval_s", allow_zero=False)
        check_seconds(self.timeout_s, "timeout_s")
        check_seconds(self.exit_timeout_s, "exit_timeout_s")
        if self.ranks is not None:
            check_policy(self.ranks)
        if not isinstance(self.retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(self.retry).__name__}")


class Owner(Protocol):
    """What the pipeline asks its owner: whether records are still accepted, and the deadline
    (a ``time.monotonic()`` instant, ``None`` while the logger is open) after which no delivery
    attempt starts."""

    @property
    def accepting(self) -> bool: ...

    def deadline(self) -> float | None: ...

    def alarm(self, error: Exception) -> None:
        """Raise ``error`` into the training loop, once, from the next call that can."""

    def rest(self) -> bool:
        """Send every later call through :meth:`~steplog.pipeline.Pipeline.put` (the hot
        path's gate shut) while the drain thread sleeps until a record comes; False (and
        nothing changed) when the logger is not open or an alarm waits."""

    def end_rest(self) -> None:
        """Undo :meth:`rest`, if it is in force, and wake the drain thread."""


def options_given(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Options | None:
    """The :class:`Options` a logger constructor call passes: its ``options=``, else the
    first one among its other arguments (a subclass may take them under another name)."""
    options = kwargs.get("options")
    if isinstance(options, Options):
        return options
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, Options)), None)
