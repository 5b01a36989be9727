"""Metric points written straight into an MLflow sqlite store's tables, as MLflow writes them.

MLflow's SQLAlchemy store spends about 90 us of CPU per metric (an ORM object each, validation
twice, the unit-of-work flush, the latest-metrics compare in Python). For a ``sqlite:`` store
whose schema is one this code was tested against, the sink host writes metric points itself:
``INSERT OR IGNORE`` statements of 100 rows each into ``metrics`` (a block's rows go to sqlite as
they were decoded, flattened; NaN, infinity and the flag are computed in SQL), then one upsert
per key into ``latest_metrics`` with MLflow's rule, in transactions of bounded length.
Experiments, runs, params, tags and run status still go through ``MlflowClient``.

What is stored is what MLflow 3.17's ``log_batch`` stores (``SqlAlchemyStore._log_metrics``):

* a row ``(key, value, timestamp, step, is_nan, run_uuid)`` per point, identical rows once;
  NaN is stored as ``0`` with ``is_nan`` = 1; +-infinity as +-1.7976931348623157e308;
* ``latest_metrics`` of a key is replaced only by a point whose ``(step, timestamp, value)``
  (the stored value) is strictly greater; of equal points the first logged is kept;
* refused like MLflow: a key MLflow's rules refuse, a negative timestamp (the batch is refused
  and the pipeline isolates the bad record), a run that is not active or does not exist (the
  whole request, with MLflow's message).

The gate (:func:`open_fast_path`), checked when the store is opened: the ``alembic_version`` is
one of :data:`TESTED_REVISIONS`; ``metrics`` and ``latest_metrics`` have exactly the columns,
types, NOT NULL flags and primary keys of those revisions; the run is active; no model is
active (``MLFLOW_ACTIVE_MODEL_ID``: ``log_batch`` would give every point its id and also write
it to ``logged_model_metrics``). Anything else, or ``STEPLOG_MLFLOW_FAST_PATH=0``, leaves every
metric to ``log_batch``; the reason is reported in the sink's ``stats()`` info.

The store's journal mode and ``synchronous`` setting are left as they are (see
docs/mlflow-fast-path.md): a transaction holds sqlite's write lock for at most about
:data:`TRANSACTION_BUDGET_S` plus its commit, so readers (``mlflow ui``, ``MlflowClient``) see
new points within a fraction of a second and other writers wait far less than MLflow's 20 s busy
timeout.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from itertools import chain
from typing import Any, NamedTuple

from steplog.errors import PermanentError, RetryableError
from steplog.records import Batch, Row, Scalar, Scalars
from steplog.sinks.mlflow.common import key_problem
from steplog.sinks.mlflow.new_store import sqlite_path

__all__ = [
    "DISABLE_ENV",
    "RUN_NOT_WRITABLE",
    "TESTED_REVISIONS",
    "TRANSACTION_BUDGET_S",
    "FastPath",
    "open_fast_path",
]

TESTED_REVISIONS = frozenset({"dc11669786a5", "f4a9b2c7d1e6"})
"""MLflow schema revisions (``alembic_version``) whose metric tables this module writes: the
heads of MLflow 3.17 and 3.18 (3.18's three migrations leave ``runs``, ``metrics`` and
``latest_metrics`` as 3.17 has them)."""

RUN_NOT_WRITABLE = "the run is not writable"
"""How the reason begins when the store passed the gate but the run cannot take points."""

DISABLE_ENV = "STEPLOG_MLFLOW_FAST_PATH"
"""Set to ``0`` to send every metric through MLflow's ``log_batch``."""

TRANSACTION_BUDGET_S = 0.04
"""A transaction is committed once its inserts took this long (then its commit follows)."""

_PIECE = 500
"""Rows per ``executemany`` call: the unit in which a transaction's length is measured."""

BUSY_TIMEOUT_MS = 20_000
"""How long a write waits for another writer's lock (MLflow's own setting)."""

# (name, declared type, NOT NULL, position in the primary key) of each column, as MLflow 3.17's
# migrations create them.
_METRICS_COLUMNS = frozenset({
    ("key", "VARCHAR(250)", 1, 1),
    ("value", "FLOAT", 1, 5),
    ("timestamp", "BIGINT", 1, 2),
    ("run_uuid", "VARCHAR(32)", 1, 4),
    ("step", "BIGINT", 1, 3),
    ("is_nan", "BOOLEAN", 1, 6),
})  # fmt: skip
_LATEST_COLUMNS = frozenset({
    ("key", "VARCHAR(250)", 1, 1),
    ("value", "FLOAT", 1, 0),
    ("timestamp", "BIGINT", 0, 0),
    ("step", "BIGINT", 1, 0),
    ("is_nan", "BOOLEAN", 1, 0),
    ("run_uuid", "VARCHAR(32)", 1, 2),
})  # fmt: skip

_STEP_INDEX = "index_metrics_run_uuid_key_step"

_MAX = "1.7976931348623157e308"


def _value(param: str) -> str:
    """MLflow's stored value of the bound value ``param``: a NaN bound by sqlite3 arrives as
    NULL (sqlite has no NaN) and is stored as 0; +-inf arrive as +-inf and are clamped."""
    return (f"CASE WHEN {param} IS NULL THEN 0 WHEN {param} > {_MAX} THEN {_MAX} "
            f"WHEN {param} < -{_MAX} THEN -{_MAX} ELSE {param} END")


_ROWS_PER_STATEMENT = 100
"""Rows of one block inserted by one statement (a multi-row ``VALUES``): sqlite's per-statement
work and the module's per-call binding are paid once per 100 rows, about 30% of the host's CPU
per point against one statement per row."""
_COLUMNS = "INSERT OR IGNORE INTO metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES "
_INSERT_MANY = _COLUMNS + ", ".join(
    f"(?{a}, {_value(f'?{a + 1}')}, ?1, ?{a + 2}, ?{a + 1} IS NULL, ?2)"
    for a in range(3, 3 + 3 * _ROWS_PER_STATEMENT, 3))
"""``_ROWS_PER_STATEMENT`` rows of a block: ``(timestamp, run, key, value, step, key, ...)``.
The text never changes, so the statement stays compiled in the connection's cache."""
_INSERT_ONE = _COLUMNS + f"(?1, {_value('?2')}, ?4, ?3, ?2 IS NULL, ?5)"
"""One row ``(key, value, step, timestamp, run)``: single scalars, and a block's last rows."""
# One row per key: the newest point of the key that this transaction wrote, found in Python
# from the rows themselves (see _newest_of_block), so the cost follows the rows written, never
# the run's history. It replaces the stored latest point only when strictly newer, as MLflow
# does; a row ignored as already stored is never newer than the stored latest point, so it
# changes nothing.
_UPSERT_LATEST = f"""
INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid)
VALUES (?1, {_value('?2')}, ?3, ?4, ?2 IS NULL, ?5)
ON CONFLICT (key, run_uuid) DO UPDATE SET
  value = excluded.value, timestamp = excluded.timestamp, step = excluded.step,
  is_nan = excluded.is_nan
WHERE (excluded.step, excluded.timestamp, excluded.value)
    > (latest_metrics.step, latest_metrics.timestamp, latest_metrics.value)
"""
_LARGEST = float(_MAX)

Newest = dict[str, tuple[int, int, float, float]]
"""Per key, its newest point: ``(step, timestamp, value as stored, value as logged)``."""


def _as_stored(value: float) -> float:
    """The value MLflow stores: 0 for NaN, +-inf clamped to the largest float."""
    if value != value:
        return 0.0
    return min(max(value, -_LARGEST), _LARGEST)


def _newest_of_block(rows: Sequence[Row], timestamp: int) -> Newest:
    """Each key's newest point among ``rows`` (one timestamp): the highest step, then the
    highest stored value; of equal points the first, as MLflow keeps the first in call order."""
    newest: Newest = {}
    get = newest.get
    for key, value, step in rows:
        cur = get(key)
        if cur is None or step > cur[0]:
            newest[key] = (step, timestamp, _as_stored(value), value)
        elif step == cur[0]:
            stored = _as_stored(value)
            if stored > cur[2]:
                newest[key] = (step, timestamp, stored, value)
    return newest


def _keep_newer(newest: Newest, key: str, point: tuple[int, int, float, float]) -> None:
    """Make ``point`` (logged after those in ``newest``) the key's newest if strictly newer."""
    cur = newest.get(key)
    if cur is None or point[:3] > cur[:3]:
        newest[key] = point


def _merge_newest(into: Newest, later: Newest) -> None:
    """Fold ``later`` (points logged after those of ``into``) into ``into``."""
    for key, point in later.items():
        _keep_newer(into, key, point)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def fast_path_disabled() -> str | None:
    """Why the environment turns the fast path off, if it does."""
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return f"turned off by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    return None


def _active_model_id() -> str | None:
    """The model id ``log_batch`` would give every point (``mlflow.set_active_model``, or
    ``MLFLOW_ACTIVE_MODEL_ID`` in the environment), if any."""
    try:
        from mlflow.tracking.fluent import get_active_model_id
    except ImportError:  # an MLflow without logged models
        return None
    return get_active_model_id()


def open_fast_path(tracking_uri: str) -> FastPath | str:
    """A :class:`FastPath` into the store ``tracking_uri`` names when the gate's store checks
    pass (the run is checked by :meth:`FastPath.run_problem`), else why not."""
    off = fast_path_disabled()
    if off is not None:
        return off
    model = _active_model_id()
    if model is not None:
        return (f"an active model id is set ({model}): MLflow links every metric point to "
                "it, in logged_model_metrics")
    if not tracking_uri.startswith("sqlite:"):
        return "not a sqlite store"
    path = sqlite_path(tracking_uri)
    if path is None:
        return "a sqlite URI with options, a host or an in-memory database"
    if not os.path.isfile(path):
        return f"no store file at {path}"
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        return f"the store could not be opened: {exc}"
    try:
        problem = schema_problem(conn)
    except sqlite3.Error as exc:
        problem = f"the store's schema could not be read: {exc}"
    if problem is not None:
        conn.close()
        return problem
    # This connection's page cache only (not stored in the file): with many keys, inserts land
    # at many places of the primary-key index.
    conn.execute("PRAGMA cache_size = -65536")
    return FastPath(conn)


def schema_problem(conn: sqlite3.Connection) -> str | None:
    """Why the store behind ``conn`` is not one whose metric tables this module writes."""
    try:
        revisions = [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.OperationalError:
        return "the store has no alembic_version table"
    if len(revisions) != 1 or revisions[0] not in TESTED_REVISIONS:
        return (f"schema revision {', '.join(map(str, revisions)) or 'none'} is not one this "
                f"steplog was tested against ({', '.join(sorted(TESTED_REVISIONS))})")
    for table, expected in (("metrics", _METRICS_COLUMNS), ("latest_metrics", _LATEST_COLUMNS)):
        found = frozenset((name, str(kind).upper(), int(notnull), int(pk))
                          for _cid, name, kind, notnull, _default, pk
                          in conn.execute(f"PRAGMA table_info({table})"))
        if found != expected:
            return (f"table {table} differs from MLflow's at the tested revision (columns, "
                    "types or primary key)")
    try:
        conn.execute("SELECT rowid FROM metrics LIMIT 0")
    except sqlite3.OperationalError:
        return "table metrics has no rowid"
    index = [r[2] for r in conn.execute(f"PRAGMA index_info({_quote(_STEP_INDEX)})")]
    if index != ["run_uuid", "key", "step"]:
        return f"index {_STEP_INDEX} of table metrics is missing or differs from MLflow's"
    return None


class FastPath:
    """Writes scalars into one store's ``metrics`` and ``latest_metrics`` (see the module).
    One writer at a time: the sink host calls it from its metrics channel only."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._good_keys: set[str] = set()
        self.rows = 0
        """Points written (new rows and identical ones ignored)."""
        self.transactions = 0
        self.longest_transaction_s = 0.0
        """The longest time one transaction held the store's write lock (s)."""

    def close(self) -> None:
        self._conn.close()

    def run_problem(self, run_id: str) -> str | None:
        """Why points of ``run_id`` cannot be written now (MLflow's refusal), or None."""
        row = self._conn.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?",
                                 (run_id,)).fetchone()
        if row is None:
            return f"Run with id={run_id} not found"
        if row[0] != "active":
            return (f"The run {run_id} must be in the 'active' state. "
                    f"Current state is {row[0]}.")
        return None

    def write(self, run_id: str, batch: Batch) -> None:
        """Store the scalars of ``batch`` (params and tags are skipped: the caller sends them)
        for ``run_id``, as MLflow's ``log_batch`` would. Raises :class:`PermanentError` for what
        MLflow refuses (nothing of the batch is stored then), :class:`RetryableError` when the
        store stays locked or fails; a failed transaction is rolled back, and earlier ones of
        the batch are stored, so a retry of the whole batch stores nothing twice."""
        pieces = self._pieces(run_id, batch)
        if not pieces:
            return
        try:
            self._store(run_id, pieces)
        except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk I/O
            raise RetryableError(f"sqlite store: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise PermanentError(f"sqlite store: {exc}") from exc

    def _pieces(self, run_id: str, batch: Batch) -> list[_Piece]:
        """The batch's scalars, checked, as pieces of at most :data:`_PIECE` rows in call
        order."""
        keys: set[str] = set()
        pieces: list[_Piece] = []
        singles: list[tuple[str, float, int, int, str]] = []
        for part in batch.parts:
            if type(part) is Scalar:
                if part.timestamp < 0:
                    raise PermanentError(_bad_timestamp(part.timestamp))
                keys.add(part.name)
                singles.append((part.name, part.value, part.step, part.timestamp, run_id))
                continue
            if singles:
                pieces.append(_singles_piece(singles))
                singles = []
            if type(part) is not Scalars or not part.rows:
                continue
            if part.timestamp < 0:
                raise PermanentError(_bad_timestamp(part.timestamp))
            for i in range(0, len(part.rows), _PIECE):
                piece = _block_piece(part.rows[i:i + _PIECE], part.timestamp, run_id)
                keys.update(piece.newest)
                pieces.append(piece)
        if singles:
            pieces.append(_singles_piece(singles))
        for key in keys - self._good_keys:
            problem = key_problem(key)
            if problem is not None:
                raise PermanentError(problem)
            self._good_keys.add(key)
        return pieces

    def _store(self, run_id: str, pieces: list[_Piece]) -> None:
        conn = self._conn
        i = 0
        while i < len(pieces):
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            try:
                problem = self.run_problem(run_id)
                if problem is not None:
                    raise PermanentError(problem, whole_batch=True)
                written = 0
                newest: Newest = {}
                while i < len(pieces):
                    piece = pieces[i]
                    _merge_newest(newest, piece.newest)
                    conn.executemany(piece.sql, piece.params)
                    if piece.tail:
                        conn.executemany(_INSERT_ONE, piece.tail)
                    written += piece.rows
                    i += 1
                    if time.perf_counter() - started >= TRANSACTION_BUDGET_S:
                        break
                conn.executemany(_UPSERT_LATEST, [
                    (key, point[3], point[1], point[0], run_id)
                    for key, point in sorted(newest.items())])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.rows += written
            self.transactions += 1
            self.longest_transaction_s = max(self.longest_transaction_s,
                                             time.perf_counter() - started)


class _Piece(NamedTuple):
    """Rows of one ``executemany`` (and its ``tail`` of single rows), in call order."""

    sql: str
    params: Sequence[Sequence[Any]]
    newest: Newest
    rows: int
    tail: Sequence[Sequence[Any]] = ()


def _block_piece(rows: list[Row], timestamp: int, run_id: str) -> _Piece:
    """Rows ``(key, value, step)`` of one block: whole statements of
    :data:`_ROWS_PER_STATEMENT` rows, the rest one statement each."""
    whole = len(rows) - len(rows) % _ROWS_PER_STATEMENT
    flat = list(chain.from_iterable(rows[:whole]))
    width = 3 * _ROWS_PER_STATEMENT
    head = [timestamp, run_id]
    params = [head + flat[i:i + width] for i in range(0, len(flat), width)]
    tail = [(key, value, step, timestamp, run_id) for key, value, step in rows[whole:]]
    return _Piece(_INSERT_MANY, params, _newest_of_block(rows, timestamp), len(rows), tail)


def _singles_piece(singles: list[tuple[str, float, int, int, str]]) -> _Piece:
    """Single scalars ``(key, value, step, timestamp, run)``, one statement each."""
    newest: Newest = {}
    for key, value, step, timestamp, _ in singles:
        _keep_newer(newest, key, (step, timestamp, _as_stored(value), value))
    return _Piece(_INSERT_ONE, singles, newest, len(singles))


def _bad_timestamp(timestamp: int) -> str:
    return (f"Invalid value {timestamp} for parameter 'timestamp': Timestamp must be a "
            "nonnegative long (64-bit integer)")
