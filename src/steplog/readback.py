"""Read logged runs back for ``steplog show`` and ``steplog plot``: a file run, a journal run
directory, a directory holding such runs (a ``steplog demo`` directory), or an MLflow run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunData", "Series", "find_runs"]


@dataclass
class Series:
    """The points of one metric, in the order they were logged."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


class DamagedFileError(Exception):
    """A file of a run that is there but cannot be read as what it should hold."""


class NoSuchRunError(ValueError):
    """What was named is not a run that can be read (not there, not a run, not a store)."""


def _json(path: Path, data: bytes | None = None) -> Any:
    """The JSON value in ``path`` (or in ``data``, a line of it); :class:`DamagedFileError`
    naming the file when it is not JSON."""
    try:
        return json.loads(path.read_bytes() if data is None else data)
    except ValueError as exc:
        raise DamagedFileError(f"{path}: not JSON ({exc})") from exc


def _json_object(path: Path) -> dict[str, Any]:
    value = _json(path)
    if not isinstance(value, dict):
        raise DamagedFileError(f"{path}: a JSON object was expected, not "
                               f"{type(value).__name__}")
    return value


@dataclass
class RunData:
    """What a run holds: its parameters, every metric's points, its status, and (for a journal
    run directory) what its sinks still lack."""

    label: str
    """A short name for legends and headings."""
    where: str
    kind: str
    status: str
    params: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Series] = field(default_factory=dict)
    sinks: list[str] = field(default_factory=list)
    """For a journal run directory: one line per sink (its destination, its run, how far it
    got through the journal, how many records it lacks)."""
    undelivered: list[str] = field(default_factory=list)
    """One line per sink that lacks records, and per kept upload."""
    sync: str | None = None
    """The command that delivers what is undelivered."""
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, step: int, value: float) -> None:
        s = self.series.get(name)
        if s is None:
            s = self.series[name] = Series()
        s.steps.append(step)
        s.values.append(value)

    def in_step_order(self) -> RunData:
        """This run, every series sorted by step (points of one step keep their order)."""
        for s in self.series.values():
            if any(a > b for a, b in zip(s.steps, s.steps[1:], strict=False)):
                order = sorted(range(len(s.steps)), key=s.steps.__getitem__)
                s.steps = [s.steps[i] for i in order]
                s.values = [s.values[i] for i in order]
        return self


def find_runs(spec: str, tracking_uri: str | None = None) -> list[RunData]:
    """The runs ``spec`` names: a path (a file run, a journal run directory, or a directory of
    such runs: its file runs, then its journal run directories, each in name order), or with
    ``tracking_uri`` (or ``$MLFLOW_TRACKING_URI``, for a spec that is not a path) an MLflow run
    id or ``experiment/run name``. Raises ``ValueError`` with what was looked for when nothing
    matches."""
    path = Path(spec)
    if tracking_uri is None and path.exists():
        return [run.in_step_order() for run in _from_path(path)]
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        from steplog.runlog import delivered_by, delivered_entry, delivered_to

        entry = delivered_entry(path)
        if entry is not None:
            sinks = delivered_to(entry)
            raise NoSuchRunError(f"{spec} was delivered whole by {delivered_by(entry)} at "
                             f"{entry.get('delivered_at', '?')} and removed; its records are "
                             f"in {sinks or 'its sinks'}")
        raise NoSuchRunError(f"{spec} does not exist (for an MLflow run, give --tracking-uri)")
    return [_mlflow_run(spec, uri)]


def _from_path(path: Path) -> list[RunData]:
    if _is_journal_run(path):
        return [_journal_run(path)]
    if _is_file_run(path):
        return [_file_run(path)]
    if _holds_kept_uploads(path):
        return [_kept_only(path)]
    if path.is_dir():
        runs = [_file_run(p) for p in sorted(path.iterdir()) if _is_file_run(p)]
        from steplog.replay import find_runs as journal_runs

        runs += [_journal_run(p) for p in journal_runs(path)]
        runs += [_kept_only(p) for p in sorted(path.iterdir()) if p.is_dir()
                 and not _is_journal_run(p) and not _is_file_run(p) and _holds_kept_uploads(p)]
        if runs:
            return runs
    raise NoSuchRunError(f"{path} is not a steplog run: no scalars.jsonl (a file run), no "
                         "run.json with a journal/ (a journal run directory), and no such run "
                         "in it")


def _holds_kept_uploads(path: Path) -> bool:
    """A run directory whose journal is gone and that still keeps uploads for a sync."""
    return any(path.glob("uploads/*/upload.json"))


def _kept_only(path: Path) -> RunData:
    from steplog.paths import sync_command

    run = RunData(path.name, str(path), "run directory",
                  "ended; only uploads kept for a later sync are left")
    run.undelivered = _kept_lines(path)
    run.sync = sync_command(path)
    return run


def _kept_lines(path: Path) -> list[str]:
    """One line per upload kept under ``path`` for a later sync."""
    from steplog.kept import find_kept

    damaged: list[str] = []
    lines = [f"upload {k.artifact.name} -> {k.sink}: {k.reason}" for k in find_kept(
        path, lambda manifest, why: damaged.append(f"a kept upload that cannot be read: "
                                                   f"{manifest}: {why}"))]
    return lines + damaged


def _is_file_run(path: Path) -> bool:
    return (path / "scalars.jsonl").is_file() or (path / "scalars.json").is_file()


def _is_journal_run(path: Path) -> bool:
    return (path / "run.json").is_file() and (path / "journal").is_dir()


def _file_run(path: Path) -> RunData:
    status = "RUNNING or killed (no run.json)"
    if (path / "run.json").is_file():
        status = str(_json_object(path / "run.json").get("status", "?"))
    run = RunData(path.name, str(path), "file run", status)
    if (path / "parameters.json").is_file():
        run.params = _json_object(path / "parameters.json")
    if (path / "scalars.jsonl").is_file():
        lines = path / "scalars.jsonl"
        with open(lines, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a line cut short by a crash
                row = _json(lines, line)
                try:
                    name, step, value = row["name"], row["step"], row["value"]
                except (KeyError, TypeError) as exc:
                    raise DamagedFileError(f"{lines}: a line that is not a point: "
                                           f"{line[:80]!r}") from exc
                if value is None:  # NaN as pandas and other JSON writers write it
                    value = math.nan
                if type(name) is not str or type(step) is not int \
                        or type(value) not in (int, float):
                    raise DamagedFileError(f"{lines}: a line that is not a point (a text name, "
                                           f"an integer step and a number): {line[:80]!r}")
                run.add(name, step, float(value))
    else:  # the seed FileLogger's format only
        try:
            for name, points in _json_object(path / "scalars.json").items():
                for step, value in points:
                    run.add(name, int(step), float(value))
        except (TypeError, ValueError) as exc:
            raise DamagedFileError(f"{path / 'scalars.json'}: not a map of metric name to "
                                   f"[step, value] points ({exc})") from exc
    return run


def _journal_run(path: Path) -> RunData:
    """What a journal run directory still holds (records every sink acknowledged may be gone
    already), and what each sink lacks. Reads without writing: its logger may be running."""
    from steplog.frames import count_records, decode_batch
    from steplog.journal import JournalView
    from steplog.paths import sync_command
    from steplog.records import Param, Scalar

    manifest = _json_object(path / "run.json")
    status = manifest.get("status")
    run = RunData(path.name, str(path), "journal run directory",
                  f"closed with {status}" if status else "no close (killed?)")
    journal = JournalView(path / "journal")
    held = journal.held
    if held:
        run.status = "RUNNING (its logger holds the journal: what follows is as of now)"
    counts: list[tuple[int, int]] = []  # (seq, records) of each frame
    size = 0
    for seq, payload in journal.read():
        counts.append((seq, count_records(payload)))
        size += len(payload)
        for record in decode_batch(payload):
            if type(record) is Scalar:
                run.add(record.name, record.step, record.value)
            elif type(record) is Param:
                run.params[record.name] = record.value
    run.notes.append(f"journal: {len(counts)} frames, {size:,} payload bytes; the metrics "
                     "below are the records it still holds")
    run.notes += [f"damaged: {problem}" for problem in journal.problems]
    for consumer, info in manifest.get("sinks", {}).items():
        cursor = journal.cursors.get(consumer, 0)
        lacking = sum(n for seq, n in counts if seq > cursor)
        where, run_name = _destination(info.get("target") or {})
        moved = ""
        if info.get("moved_from"):
            origin = info["moved_from"]
            moved = (f" (moved from {origin.get('tracking_uri') or '?'} run "
                     f"{origin.get('run_id') or 'never created'})")
        run.sinks.append(f"{consumer}: {where} {run_name}{moved}: stored up to frame "
                         f"{cursor}; lacks {lacking} records")
        if lacking:
            run.undelivered.append(f"{lacking} records for {consumer}")
        if info.get("end_failed") and status is not None:
            run.undelivered.append(f"{consumer}: its run is not ended {status} "
                                   f"({info['end_failed']})")
    run.undelivered += _kept_lines(path)
    if run.undelivered and not held:
        run.sync = sync_command(path)
    return run


def _destination(target: dict[str, Any]) -> tuple[str, str]:
    """Where a journaled sink writes (a server, a directory) and its run."""
    if "task_id" in target:  # ClearML
        return (target.get("api_host") or "?",
                f"task {target.get('task_id') or 'not created yet'}")
    return (target.get("tracking_uri") or target.get("output_dir") or "?",
            f"run {target.get('run_id') or 'not created yet'}")


_READ_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""MLflow's HTTP settings while a run is read, unless the environment sets them: a server that
does not answer fails the command in about a minute instead of MLflow's retries for minutes."""


@contextlib.contextmanager
def _bounded_requests() -> Iterator[None]:
    unset = [k for k in _READ_REQUESTS if k not in os.environ]
    os.environ.update({k: _READ_REQUESTS[k] for k in unset})
    try:
        yield
    finally:
        for k in unset:
            os.environ.pop(k, None)


def _mlflow_run(spec: str, tracking_uri: str) -> RunData:
    from steplog.sinks.mlflow.common import redact, tracking_uri_problem
    from steplog.sinks.mlflow.new_store import sqlite_path

    problem = tracking_uri_problem(tracking_uri)
    if problem is not None:
        raise NoSuchRunError(problem)
    store = sqlite_path(tracking_uri)
    if store is None and tracking_uri.startswith("sqlite:"):  # options such as ?timeout=20
        from sqlalchemy.engine import make_url

        store = sqlite_path(make_url(tracking_uri).set(query={}).render_as_string(False))
    if tracking_uri.startswith("file:"):  # MLflow would create an empty store there
        folder = urllib.request.url2pathname(urllib.parse.urlsplit(tracking_uri).path)
        if not os.path.isdir(folder):
            raise NoSuchRunError(f"no MLflow store at {tracking_uri}: {folder} does not exist")
    if store is not None and not os.path.isfile(store):
        raise NoSuchRunError(f"no MLflow store at {tracking_uri}: {store} does not exist")
    if store is not None and (problem := _not_a_store(store)) is not None:
        raise NoSuchRunError(f"no MLflow store at {tracking_uri}: {store} {problem}")
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise NoSuchRunError("reading an MLflow run needs mlflow: pip install 'steplog[mlflow]'"
                         ) from None
    with _bounded_requests():
        client = MlflowClient(tracking_uri=tracking_uri)
        info = _mlflow_lookup(client, spec)
        if info is None:
            raise NoSuchRunError(f"no MLflow run {spec!r} at {redact(tracking_uri)} (give a run id "
                             "or experiment/run name)")
        name = info.info.run_name or info.info.run_id
        run = RunData(name, f"{redact(tracking_uri)} run {info.info.run_id}", "MLflow run",
                      info.info.status, params=dict(info.data.params))
        for key in sorted(info.data.metrics):
            for m in client.get_metric_history(info.info.run_id, key):
                run.add(key, m.step, m.value)
    return run.in_step_order()  # MLflow returns a history in no promised order


def _not_a_store(path: str) -> str | None:
    """Why the sqlite file at ``path`` is no MLflow store (read only: MLflow would write its
    tables into any file it is given), None when it is one."""
    import sqlite3

    try:
        conn = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return f"cannot be read ({exc})"
    try:
        tables = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        return f"is not an sqlite database ({exc})"
    finally:
        conn.close()
    missing = sorted({"alembic_version", "experiments", "runs", "metrics"} - tables)
    if missing:
        return f"holds no MLflow tables ({', '.join(missing)} missing)"
    return None


def _mlflow_lookup(client: Any, spec: str) -> Any:
    """The run with id ``spec``, else the latest run named after a ``/`` of ``spec`` in the
    experiment named before it (either name may hold ``/``: every split is tried, and a spec
    that names runs at two splits is refused as ambiguous)."""
    from steplog.sinks.mlflow.common import filter_literal

    if "/" in spec:
        found = []
        parts = spec.split("/")
        for i in range(1, len(parts)):
            experiment, name = "/".join(parts[:i]), "/".join(parts[i:])
            exp = client.get_experiment_by_name(experiment) if experiment and name else None
            if exp is None:
                continue
            quoted = filter_literal(name)
            if quoted is not None:
                runs = client.search_runs(
                    [exp.experiment_id], filter_string=f"attributes.run_name = {quoted}",
                    order_by=["attributes.start_time DESC"], max_results=1)
            else:  # a name holding both quotes, which no filter can name: the newest 1,000
                runs = [r for r in client.search_runs(
                    [exp.experiment_id], order_by=["attributes.start_time DESC"],
                    max_results=1000) if r.info.run_name == name][:1]
            found += [(experiment, name, run) for run in runs]
        if len(found) > 1:
            raise NoSuchRunError(f"{spec!r} is ambiguous: " + "; ".join(
                f"experiment {e!r} has a run {n!r} (id {r.info.run_id})" for e, n, r in found)
                + ": give the run id")
        return found[0][2] if found else None
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(spec)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # no such run id (or not one at all)
        raise
