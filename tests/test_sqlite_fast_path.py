"""The sqlite fast path stores exactly what MLflow's ``log_batch`` stores, only when its gate
holds, survives a kill -9 of the sink host, and never gets in a reader's way.

The stores are real MLflow 3.17 sqlite stores; the host side (:class:`ClientTransport`) runs
in the test process where a test compares the two paths, and in a real sink host process
behind a logger everywhere else.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from journal_support import journaled
from mlflow_support import MlflowServer
from steplog import MLFlowLogger, Options, SteplogWarning
from steplog.cli import main
from steplog.frames import encode_batch
from steplog.records import Batch, Part, Scalar, Scalars
from steplog.sinks.mlflow import sqlite_fast
from steplog.sinks.mlflow.client import ClientTransport
from steplog.sinks.mlflow.new_store import create_sqlite_store

mlflow = pytest.importorskip("mlflow")

INF = float("inf")
NAN = float("nan")


# -- stores and records ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def blank_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow store at the schema's latest revision, built once and copied per test."""
    path = tmp_path_factory.mktemp("blank") / "mlflow.db"
    assert create_sqlite_store(f"sqlite:///{path}")
    return path


def store_copy(blank: Path, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(blank, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def batches(seed: int) -> list[Batch]:
    """Records in several batches: many keys, duplicates within and across batches, NaN,
    +-inf and the largest float (stored alike), -0.0 beside 0.0, NaN beside 0.0 at the same
    step and time, steps out of order, single records and blocks of several thousand rows."""
    rnd = random.Random(seed)
    specials = [NAN, INF, -INF, 1.7976931348623157e308, 0.0, -0.0, 1e-308]

    def value() -> float:
        return rnd.choice(specials) if rnd.random() < 0.2 else rnd.uniform(-5, 5)

    keys = [f"m/{i}" for i in range(120)]
    first = [(k, value(), rnd.randrange(3)) for k in keys for _ in range(2)]
    first += first[:50]  # duplicates within the batch
    second = [(k, value(), rnd.randrange(-2, 2)) for k in rnd.sample(keys, 60)]
    second += first[100:140]  # duplicates of the first batch (same timestamp)
    singles: list[Part] = [
        Scalar("tie", NAN, 5, 3_000), Scalar("tie", 0.0, 5, 3_000),  # equal (step, time, 0)
        Scalar("tie2", 0.0, 5, 3_000), Scalar("tie2", NAN, 5, 3_000),
        Scalar("late", 1.0, 10, 9_000), Scalar("late", 2.0, 10, 8_000),  # older time, same step
        Scalar("late", 3.0, 9, 99_000), Scalar("late", -1.0, 10, 9_000),
        Scalar("m/0", INF, 1_000, 500), Scalar("m/0", 1.7976931348623157e308, 1_000, 500),
    ]
    big = [(f"b/{rnd.randrange(5)}", value(), rnd.randrange(500)) for _ in range(1_500)]
    return [
        Batch([Scalars(first, 2_000)]),
        Batch([Scalars(second, 2_000), *singles[:4], Scalars(second[:10], 2_001)]),
        Batch(singles[4:]),
        Batch([Scalars(big, 4_000), Scalars(big[:600], 4_000)]),
        Batch([Scalars([("late", 7.0, 10)], 9_000), Scalars([(k, 0.5, 2) for k in keys], 1)]),
    ]


def transport(uri: str, fast: bool, monkeypatch: pytest.MonkeyPatch,
              budget_s: float = 0.0) -> ClientTransport:
    """The sink host's object, on the fast path or (``STEPLOG_MLFLOW_FAST_PATH=0``) not; on
    the fast path each piece of 500 rows is a transaction of its own (the budget is 0), or,
    with a budget longer than any batch, each batch is one transaction merging its pieces'
    latest values."""
    monkeypatch.setattr(sqlite_fast, "TRANSACTION_BUDGET_S", budget_s)
    with monkeypatch.context() as env:
        if not fast:
            env.setenv(sqlite_fast.DISABLE_ENV, "0")
        else:
            env.delenv(sqlite_fast.DISABLE_ENV, raising=False)
        client = ClientTransport(uri)
        assert client.metrics_path("0" * 32) is not None  # the gate is read now
    return client


def fill(client: ClientTransport, experiment: str, fast: bool) -> dict[str, str]:
    """Three runs of ``experiment`` with different records; their ids by run name."""
    exp = client.experiment_id(experiment)
    ids = {}
    for n in range(3):
        run = client.create_run(exp, f"r{n}", {}, 1_000)
        assert (client.metrics_path(run.run_id) is None) == fast
        for batch in batches(seed=n):
            client.log_frame(run.run_id, encode_batch(batch), {}, {})
        ids[f"r{n}"] = run.run_id
    return ids


def table_rows(uri: str, run_id: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every row of ``metrics`` and ``latest_metrics`` of the run (values as hex, so -0.0 and
    0.0 differ; with sqlite's type of each value)."""
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as conn:
        metrics = conn.execute(
            "SELECT key, value, typeof(value), timestamp, step, is_nan, typeof(is_nan) "
            "FROM metrics WHERE run_uuid = ? ORDER BY key, timestamp, step, value, is_nan",
            (run_id,)).fetchall()
        latest = conn.execute(
            "SELECT key, value, typeof(value), timestamp, step, is_nan, typeof(is_nan) "
            "FROM latest_metrics WHERE run_uuid = ? ORDER BY key", (run_id,)).fetchall()
    conn.close()
    exact = [(r[0], float(r[1]).hex(), *r[2:]) for r in metrics]
    return exact, [(r[0], float(r[1]).hex(), *r[2:]) for r in latest]


def same(value: Any) -> Any:
    """``value`` with floats as their hex text (NaN equal to NaN, -0.0 unequal to 0.0) and run
    ids left out, for comparing what two runs hold."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else value.hex()
    if isinstance(value, dict):
        return {k: same(v) for k, v in value.items()
                if k not in ("run_id", "run_uuid", "experiment_id", "artifact_uri",
                             "start_time", "end_time", "run_name")}
    if isinstance(value, (list, tuple)):
        return type(value)(same(v) for v in value)
    return value


def in_order(points: list[tuple[str, float, int, int]]) -> list[Any]:
    """A metric history (key, value, timestamp, step) checked to be in MLflow's order
    (timestamp, step, value), as comparable data: the order of points equal in all three
    (NaN and 0.0, stored alike) is not defined by MLflow, so those are sorted here."""
    def order(p: tuple[str, float, int, int]) -> tuple[int, int, float]:
        return p[2], p[3], 0.0 if math.isnan(p[1]) else max(-1.8e308, min(1.8e308, p[1]))

    assert [order(p) for p in points] == sorted(order(p) for p in points)
    return sorted(same(list(points)), key=repr)


# -- equivalence -------------------------------------------------------------------------------


@pytest.mark.parametrize("budget_s", [0.0, 60.0], ids=["a transaction per piece",
                                                       "a transaction per batch"])
def test_the_fast_path_stores_every_row_log_batch_stores(
    blank_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget_s: float
) -> None:
    slow_uri = store_copy(blank_store, tmp_path / "log_batch")
    fast_uri = store_copy(blank_store, tmp_path / "fast")
    slow = fill(transport(slow_uri, False, monkeypatch), "eq", fast=False)
    fast_client = transport(fast_uri, True, monkeypatch, budget_s)
    fast = fill(fast_client, "eq", fast=True)
    assert isinstance(fast_client._fast, sqlite_fast.FastPath)
    frames = sum(len(batches(seed=n)) for n in range(3))
    if budget_s:  # at most one transaction per batch: the pieces' latest values were merged
        assert fast_client._fast.transactions <= frames
    else:  # the big batch took several transactions
        assert fast_client._fast.transactions > frames
    for name in slow:
        slow_metrics, slow_latest = table_rows(slow_uri, slow[name])
        fast_metrics, fast_latest = table_rows(fast_uri, fast[name])
        assert len(slow_metrics) > 1_500
        assert fast_metrics == slow_metrics
        assert fast_latest == slow_latest
    # the rules at work: NaN stored as 0 with its flag, infinity as the largest float, the
    # first of equal points kept as latest
    latest = {r[0]: r for r in table_rows(fast_uri, fast["r0"])[1]}
    assert latest["tie"][1:] == ((0.0).hex(), "real", 3_000, 5, 1, "integer")
    assert latest["tie2"][5] == 0
    assert latest["late"][1] == (7.0).hex()
    assert latest["m/0"][1] == (1.7976931348623157e308).hex()


def test_mlflow_reads_the_same_history_and_search_order_from_both_paths(
    blank_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_uri = store_copy(blank_store, tmp_path / "log_batch")
    fast_uri = store_copy(blank_store, tmp_path / "fast")
    slow = fill(transport(slow_uri, False, monkeypatch), "eq", fast=False)
    fast = fill(transport(fast_uri, True, monkeypatch), "eq", fast=True)
    views = []
    for uri, ids in ((slow_uri, slow), (fast_uri, fast)):
        client = mlflow.MlflowClient(uri)
        names = {v: k for k, v in ids.items()}
        history = {
            (name, key): in_order([(m.key, m.value, m.timestamp, m.step)
                                   for m in client.get_metric_history(run_id, key)])
            for name, run_id in ids.items() for key in ("m/0", "m/7", "tie", "late", "b/3")
        }
        latest = {name: client.get_run(run_id).data.metrics for name, run_id in ids.items()}
        exp = client.get_experiment_by_name("eq").experiment_id
        orders = [
            [names[r.info.run_id]
             for r in client.search_runs([exp], order_by=[order, "attributes.run_name"])]
            for order in ("metrics.`m/1` DESC", "metrics.`b/2` ASC", "metrics.late DESC")
        ]
        found = [names[r.info.run_id]
                 for r in client.search_runs([exp], "metrics.`m/3` > 0", order_by=["run_name"])]
        views.append(same([history, latest, orders, found]))
    assert views[0] == views[1]
    assert len(views[1][0][("r0", "b/3")]) > 200


def test_mlflow_servers_rest_api_answers_the_same_for_both_paths(
    mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both runs go into the store the session's server serves.
    uri = f"sqlite:///{mlflow_server.db_path}"
    tag = uuid.uuid4().hex[:8]
    slow = fill(transport(uri, False, monkeypatch), f"eq-log-batch-{tag}", fast=False)
    fast = fill(transport(uri, True, monkeypatch), f"eq-fast-{tag}", fast=True)
    views = []
    for experiment, ids in ((f"eq-log-batch-{tag}", slow), (f"eq-fast-{tag}", fast)):
        names = {v: k for k, v in ids.items()}
        exp = mlflow_server.api("experiments/get-by-name",
                                experiment_name=experiment)["experiment"]["experiment_id"]
        history = {(name, key): in_order([
            (m["key"], float(m["value"]), int(m["timestamp"]), int(m.get("step", 0)))
            for m in mlflow_server.metric_history(run_id, key)])
            for name, run_id in ids.items() for key in ("m/0", "tie", "late", "b/1")}
        latest = {name: sorted(mlflow_server.run(run_id)["data"]["metrics"],
                               key=lambda m: m["key"])
                  for name, run_id in ids.items()}
        searched = mlflow_server.api("runs/search", {
            "experiment_ids": [exp], "order_by": ["metrics.`m/2` DESC", "attributes.run_name"],
            "filter": "metrics.late >= 0"})["runs"]
        order = [names[r["info"]["run_id"]] for r in searched]
        views.append(same([history, latest, order]))
    assert views[0] == views[1]
    assert len(views[1][0][("r1", "b/1")]) > 200


# -- the gate ----------------------------------------------------------------------------------


def test_a_schema_revision_this_steplog_was_not_tested_against_falls_back_to_log_batch(
    blank_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if MLflow had moved to a newer schema: the store's revision is not a tested one.
    monkeypatch.setattr(sqlite_fast, "TESTED_REVISIONS", frozenset({"0123456789ab"}))
    uri = store_copy(blank_store, tmp_path)
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as conn:
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    client = ClientTransport(uri)
    ids = fill(client, "gate", fast=False)
    reason = client.metrics_path(ids["r0"])
    assert reason is not None
    assert f"schema revision {revision} is not one this steplog was tested against" in reason
    assert client._fast == reason
    history = mlflow.MlflowClient(uri).get_metric_history(ids["r0"], "b/2")
    assert len(history) > 200  # delivered through log_batch


def test_a_changed_metrics_table_falls_back_to_log_batch_with_the_reason_in_stats(
    blank_store: Path, tmp_path: Path
) -> None:
    uri = store_copy(blank_store, tmp_path)
    with sqlite3.connect(tmp_path / "mlflow.db") as conn:
        conn.execute("ALTER TABLE metrics ADD COLUMN note TEXT")
    conn.close()
    logger = MLFlowLogger("gate", tracking_uri=uri)
    with pytest.warns(SteplogWarning, match="log_batch .*: table metrics differs"):
        for i in range(3_000):
            logger.log_scalar("loss", i / 2, i)
        result = logger.close(120)
    assert result, result
    assert logger.stats().sinks["mlflow"].info == {
        "metrics_path": "log_batch",
        "fast_path_off": "table metrics differs from MLflow's at the tested revision "
                         "(columns, types or primary key)",
    }
    assert len(mlflow.MlflowClient(uri).get_metric_history(logger.run_id, "loss")) == 3_000


def test_an_active_model_falls_back_to_log_batch_which_links_every_point_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    model = client.create_logged_model(experiment_id=client.create_experiment("gate"),
                                       name="policy")
    monkeypatch.setenv("MLFLOW_ACTIVE_MODEL_ID", model.model_id)  # the sink host inherits it
    logger = MLFlowLogger("gate", tracking_uri=uri)
    with pytest.warns(SteplogWarning, match="an active model id is set"):
        logger.log_scalar("loss", 1.0, 0)
        logger.log_scalar("loss", 0.5, 1)
        assert logger.close(120)
    assert logger.stats().sinks["mlflow"].info["metrics_path"] == "log_batch"
    linked = client.get_logged_model(model.model_id).metrics
    assert sorted((m.key, m.value, m.step) for m in linked) == [("loss", 0.5, 1),
                                                                ("loss", 1.0, 0)]


def test_the_fast_path_turned_off_by_the_environment_warns_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(sqlite_fast.DISABLE_ENV, "0")
    logger = MLFlowLogger("gate", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log_scalar("loss", 1.0, 0)
        assert logger.close(120)
    assert logger.stats().sinks["mlflow"].info["metrics_path"] == "log_batch"
    assert not [w for w in caught if issubclass(w.category, SteplogWarning)]


def test_a_logger_into_an_unchanged_store_takes_the_fast_path_and_says_so(
    tmp_path: Path,
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger("gate", tracking_uri=uri)
    logger.log_scalar("loss", 1.0, 0)
    logger.log_parameters({"lr": 0.1})
    assert logger.close(120)
    assert logger.stats().sinks["mlflow"].info == {"metrics_path": "sqlite fast path"}
    run = mlflow.MlflowClient(uri).get_run(logger.run_id)
    assert run.data.metrics == {"loss": 1.0}
    assert run.data.params == {"lr": "0.1"}


def test_the_fast_path_can_be_turned_off_by_the_environment(
    blank_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = store_copy(blank_store, tmp_path)
    monkeypatch.setenv(sqlite_fast.DISABLE_ENV, "0")
    client = ClientTransport(uri)
    run = client.create_run(client.experiment_id("off"), None, {}, 0)
    assert client.metrics_path(run.run_id) == f"turned off by {sqlite_fast.DISABLE_ENV}=0"


def test_points_of_a_deleted_run_are_refused_as_mlflow_refuses_them(
    blank_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steplog.errors import PermanentError

    uri = store_copy(blank_store, tmp_path)
    client = transport(uri, True, monkeypatch)
    run = client.create_run(client.experiment_id("deleted"), None, {}, 0)
    assert client.metrics_path(run.run_id) is None
    mlflow.MlflowClient(uri).delete_run(run.run_id)
    with pytest.raises(PermanentError, match="must be in the 'active' state") as caught:
        client.log_frame(run.run_id, encode_batch(Batch([Scalars([("x", 1.0, 0)], 5)])), {}, {})
    assert caught.value.whole_batch
    assert table_rows(uri, run.run_id) == ([], [])


@pytest.mark.parametrize(("key", "reason"), [("../up", "normalised"), (".", "own folder")])
def test_a_key_mlflow_refuses_fails_the_batch_and_stores_nothing_of_it(
    blank_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, reason: str
) -> None:
    from steplog.errors import PermanentError

    uri = store_copy(blank_store, tmp_path)
    client = transport(uri, True, monkeypatch)
    run = client.create_run(client.experiment_id("bad"), None, {}, 0)
    bad = Batch([Scalars([("ok", 1.0, 0), (key, 2.0, 0)], 5)])
    with pytest.raises(PermanentError, match=reason) as caught:
        client.log_frame(run.run_id, encode_batch(bad), {}, {})
    assert not caught.value.whole_batch  # the pipeline isolates the bad record
    assert table_rows(uri, run.run_id) == ([], [])


def test_the_latest_value_update_never_reads_the_runs_stored_points(
    blank_store: Path, tmp_path: Path
) -> None:
    # A run's whole history under a key is never read again: a write of one point into a run
    # with millions of them stays as short as the first write.
    uri = store_copy(blank_store, tmp_path)
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as conn:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sqlite_fast._UPSERT_LATEST,
                                               ("k", 1.0, 0, 0, "0" * 32))]
    conn.close()
    assert not [step for step in plan if " metrics" in step], plan


def test_one_new_point_or_only_repeated_points_after_a_long_history_update_latest_as_mlflow(
    blank_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = Batch([Scalars([("loss", float(i % 7), i) for i in range(5_000)], 1_000)])
    writes = [Batch([Scalars([("loss", 0.5, 5_000)], 2_000)]),  # one new point, highest step
              Batch([Scalars([("loss", 9.0, 10)], 2_500)]),  # one new point, an early step
              history[4_990:],  # only points already stored
              Batch([Scalar("loss", 0.25, 5_000, 2_000)])]  # same step and time, lower value
    stored = []
    for fast in (True, False):
        uri = store_copy(blank_store, tmp_path / str(fast))
        client = transport(uri, fast, monkeypatch)
        run = client.create_run(client.experiment_id("long"), None, {}, 0)
        for batch in [history, *writes]:
            client.log_frame(run.run_id, encode_batch(batch), {}, {})
        stored.append(table_rows(uri, run.run_id))
    assert stored[0] == stored[1]
    assert stored[0][1][0][3:5] == (2_000, 5_000)  # the latest point: step 5000 at 2000 ms


# -- faults and readers ----------------------------------------------------------------------


def count_rows(db: Path, run_id: str) -> tuple[int, int]:
    """(rows, distinct steps) of the run's ``loss``, read by a separate connection."""
    with sqlite3.connect(db, timeout=30) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT step) FROM metrics "
                           "WHERE run_uuid = ? AND key = 'loss'", (run_id,)).fetchone()
    conn.close()
    return int(row[0]), int(row[1])


def test_a_host_killed_mid_transaction_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    n = 200_000
    logger = MLFlowLogger("kill", tracking_uri=f"sqlite:///{db}")
    assert logger.flush(120)
    kills_in_transaction = 0
    kills = 0

    def killer() -> None:
        nonlocal kills, kills_in_transaction
        deadline = time.monotonic() + 60
        while kills < 3 and time.monotonic() < deadline:
            pid = logger.sink.host_pid
            if pid is not None and os.path.exists(f"{db}-journal"):  # a write is under way
                os.kill(pid, signal.SIGKILL)
                kills += 1
                kills_in_transaction += 1
                time.sleep(1.0)  # let a new host start and write again
            time.sleep(0.001)

    thread = threading.Thread(target=killer)
    thread.start()
    for i in range(n):
        logger.log_scalar("loss", float(i), i)
    thread.join(70)
    result = logger.close(300)
    assert result, result
    assert kills_in_transaction >= 1
    assert logger.stats().sinks["mlflow"].retried >= 1
    assert count_rows(db, str(logger.run_id)) == (n, n)
    latest = mlflow.MlflowClient(f"sqlite:///{db}").get_run(logger.run_id).data.metrics
    assert latest == {"loss": float(n - 1)}


def test_sync_of_a_killed_process_journal_into_a_sqlite_store_stores_each_point_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs, db, flushed = tmp_path / "runs", tmp_path / "mlflow.db", tmp_path / "flushed"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time
        from steplog import MLFlowLogger, Options
        lg = MLFlowLogger("sync-kill9", tracking_uri="sqlite:///{db}",
                          options=Options(drain_interval_s=0.01))
        for i in range(10_000):
            lg.log_scalar("loss", float(i), i)
        assert lg.flush(120)
        for i in range(10_000, 150_000):
            lg.log_scalar("loss", float(i), i)
        pathlib.Path({str(flushed)!r}).write_text(str(i))
        time.sleep(60)
    """)], env={**os.environ, "STEPLOG_RUNS_DIR": str(runs)}, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not flushed.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flushed.exists(), child.communicate(timeout=10)[1][-3000:]
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    run_id = mlflow.MlflowClient(f"sqlite:///{db}").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{db}").get_experiment_by_name("sync-kill9")
         .experiment_id])[0].info.run_id
    # The kill may come before the drain thread journaled the last records: what the journal
    # holds is a gap-free prefix, and that prefix is what sync owes the store.
    steps = [r.step for r in journaled(runs)]
    assert steps == list(range(len(steps)))
    assert len(steps) >= 10_000  # everything before the flush, at least
    assert count_rows(db, run_id)[0] < len(steps)  # the kill cut delivery short
    assert main(["sync", str(runs)]) == 0
    assert main(["sync", str(runs)]) == 0  # a second sync finds nothing left to send
    assert "0 stored, 0 still kept" in capsys.readouterr().out
    assert count_rows(db, run_id) == (len(steps), len(steps))  # each journaled point once


def test_an_mlflow_reader_and_writer_polling_during_a_full_rate_run_never_error(
    tmp_path: Path,
) -> None:
    # "loss" comes at full rate; "tick" marks each block of 10,000, so a poll reads a short
    # history and stays quick however many points are stored (MLflow builds an object per
    # point it returns: reading 600,000 takes tens of seconds here).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    n = 150_000
    block = 10_000
    logger = MLFlowLogger("readers", tracking_uri=uri, options=Options())
    assert logger.flush(120)
    run_id = str(logger.run_id)
    reader = mlflow.MlflowClient(uri)
    reader.get_run(run_id)  # the reader's store is built (seconds) before the run begins
    done = threading.Event()
    errors: list[BaseException] = []
    ticks_seen: list[int] = []
    latest_loss_seen: list[float] = []

    def poll() -> None:
        while not done.is_set():
            try:
                run = reader.get_run(run_id)
                ticks = reader.get_metric_history(run_id, "tick")
                reader.search_runs([run.info.experiment_id], order_by=["metrics.loss DESC"])
                reader.set_tag(run_id, "poll", str(len(ticks_seen)))  # a second writer
            except BaseException as exc:
                errors.append(exc)
                return
            ticks_seen.append(len(ticks))
            latest_loss_seen.append(run.data.metrics.get("loss", -1.0))
            time.sleep(0.05)

    thread = threading.Thread(target=poll)
    thread.start()
    i = 0
    deadline = time.monotonic() + 120
    try:
        # At full rate until the reader has polled a few times while points kept coming.
        while (i < n or (len(ticks_seen) < 5 and i < 4 * n)) and not errors \
                and time.monotonic() < deadline:
            for i in range(i, i + block):  # noqa: B020 - i goes on where it stopped
                logger.log_scalar("loss", float(i), i)
            i += 1
            logger.log_scalar("tick", float(i // block), i // block)
        result = logger.close(300)
    finally:
        done.set()
        thread.join(60)
    assert result, result
    assert not errors, errors
    assert len(ticks_seen) >= 2, ticks_seen
    # Each reader sees whole transactions in order: never fewer points, never an older latest.
    assert ticks_seen == sorted(ticks_seen)
    assert latest_loss_seen == sorted(latest_loss_seen)
    assert len(reader.get_metric_history(run_id, "tick")) == i // block
    assert len(reader.get_metric_history(run_id, "loss")) == i


@pytest.fixture(autouse=True)
def _no_fast_path_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(sqlite_fast.DISABLE_ENV, raising=False)
    yield


def test_the_embedded_sink_refuses_a_batch_with_a_key_mlflow_refuses_and_stores_nothing_of_it(
    blank_store: Path, tmp_path: Path
) -> None:
    # Keys are checked where they are stored (the sink host), not by a second pass over the
    # batch in the training process: the call fails naming the key, nothing is stored, the
    # pipeline may isolate the bad record, and the batch without it is stored.
    from steplog.errors import PermanentError
    from steplog.sinks.mlflow import MLflowSink

    uri = store_copy(blank_store, tmp_path)
    sink = MLflowSink("bad-key", tracking_uri=uri)
    sink.open()
    try:
        good = Scalars([("ok", 1.0, 0)], 5)
        with pytest.raises(PermanentError, match="normalised") as caught:
            sink.write(Batch([good, Scalars([("../up", 2.0, 0)], 5)]))
        assert not caught.value.whole_batch  # the pipeline isolates the bad record
        assert sink.info() == {"metrics_path": "sqlite fast path"}
        assert table_rows(uri, sink.run_id or "") == ([], [])
        sink.write(Batch([good]))
        assert len(table_rows(uri, sink.run_id or "")[0]) == 1
    finally:
        sink.close("FINISHED")
        sink.release()
