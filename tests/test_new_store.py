"""A new embedded MLflow store is built beside its name and linked into place whole.

The sink host creates a ``sqlite:///`` store that does not exist yet without a disk flush per
schema migration; MLflow must then open it as one of its own, and anything else (another URI,
an existing file, a store another process created meanwhile) is left to MLflow.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from steplog.sinks.mlflow.new_store import create_sqlite_store, sqlite_path

mlflow = pytest.importorskip("mlflow")
sqlalchemy = pytest.importorskip("sqlalchemy")


def schema(db: Path) -> tuple[str | None, list[tuple[str, str]]]:
    """The store's alembic revision and its tables and indexes (type, name)."""
    from mlflow.store.db.utils import _get_schema_version

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            objects = conn.exec_driver_sql(
                "SELECT type, name FROM sqlite_master ORDER BY type, name").all()
        return _get_schema_version(engine), [tuple(o) for o in objects]
    finally:
        engine.dispose()


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """A line of ``proc``'s output, or AssertionError after ``timeout_s``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout_s), "no line in time"
    return proc.stdout.readline()


def test_a_new_store_has_the_schema_mlflow_builds_and_nothing_is_left_beside_it(
    tmp_path: Path,
) -> None:
    ours, theirs = tmp_path / "ours" / "mlflow.db", tmp_path / "theirs" / "mlflow.db"
    ours.parent.mkdir()
    theirs.parent.mkdir()
    assert create_sqlite_store(f"sqlite:///{ours}")
    mlflow.MlflowClient(f"sqlite:///{theirs}").search_experiments()
    assert schema(ours) == schema(theirs)
    assert [p.name for p in ours.parent.iterdir()] == ["mlflow.db"]


def test_mlflow_opens_a_new_store_as_its_own_and_logs_to_it(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    assert create_sqlite_store(f"sqlite:///{db}")
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    run = client.create_run("0")
    client.log_metric(run.info.run_id, "loss", 0.5, step=3)
    assert [(m.value, m.step) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (0.5, 3)]


def test_an_existing_store_is_left_as_it_is(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    db.write_bytes(b"not touched")
    assert not create_sqlite_store(f"sqlite:///{db}")
    assert db.read_bytes() == b"not touched"
    assert [p.name for p in tmp_path.iterdir()] == ["m.db"]


def test_a_store_in_a_folder_that_does_not_exist_is_left_to_mlflow(tmp_path: Path) -> None:
    assert not create_sqlite_store(f"sqlite:///{tmp_path / 'missing' / 'm.db'}")
    assert list(tmp_path.iterdir()) == []


def test_a_sqlite_uri_names_the_file_sqlites_driver_opens(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///mlflow.db") == str(tmp_path / "mlflow.db")
    assert sqlite_path("sqlite:////abs/m.db") == "/abs/m.db"
    assert sqlite_path("sqlite:///runs/../m.db") == str(tmp_path / "m.db")
    assert sqlite_path("sqlite:///a%2520b.db") == str(tmp_path / "a%20b.db")


def test_other_uris_are_left_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for uri in ("sqlite://", "sqlite:///:memory:", "sqlite:///m.db?mode=ro",
                "sqlite:///file:m.db", "sqlite://localhost/h.db", "sqlite://u:p@/m.db",
                "sqlite://:5/m.db", "sqlite:///x\0.db", "postgresql://u@localhost/db",
                "http://127.0.0.1:5000"):
        assert sqlite_path(uri) is None, uri
        assert not create_sqlite_store(uri)
    assert list(tmp_path.iterdir()) == []


def test_a_path_through_a_linked_folder_and_dotdot_builds_the_store_mlflow_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    work, elsewhere = tmp_path / "work", tmp_path / "other" / "sub"
    work.mkdir()
    elsewhere.mkdir(parents=True)
    (work / "link").symlink_to(elsewhere)
    monkeypatch.chdir(work)
    assert create_sqlite_store("sqlite:///link/../m.db")
    assert sorted(p.name for p in work.iterdir()) == ["link", "m.db"]
    assert [e.name for e in mlflow.MlflowClient("sqlite:///link/../m.db").search_experiments()
            ] == ["Default"]
    assert sorted(p.name for p in work.iterdir()) == ["link", "m.db"]
    assert list(elsewhere.iterdir()) == []


def test_a_build_that_fails_leaves_nothing_and_the_store_to_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NoSuchPool")  # MLflow's engine raises
    assert not create_sqlite_store(f"sqlite:///{tmp_path / 'm.db'}")
    assert list(tmp_path.iterdir()) == []


def test_of_two_processes_creating_the_same_store_one_links_it_and_the_other_keeps_it(
    tmp_path: Path,
) -> None:
    db, go = tmp_path / "m.db", tmp_path / "go"
    code = textwrap.dedent(f"""
        import os, time, mlflow
        from steplog.sinks.mlflow.new_store import create_sqlite_store
        print("ready", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        print(create_sqlite_store("sqlite:///{db}"))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for p in procs:
            assert read_line(p, 120) == "ready\n"
        go.touch()  # both look for the store at once, and both build one
        outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert outs == ["False", "True"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "m.db"]
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    assert [e.name for e in client.search_experiments()] == ["Default"]


def test_the_file_of_a_build_killed_midway_is_removed_by_a_later_start(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    code = textwrap.dedent(f"""
        from steplog.sinks.mlflow.new_store import create_sqlite_store
        create_sqlite_store("sqlite:///{db}")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".new") for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "no build seen"
            time.sleep(0.001)
    finally:
        proc.kill()  # SIGKILL: no clean-up runs
        proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name != "m.db"]
    assert left  # the build's file
    for p in left:
        age(p, 120)
    create_sqlite_store(f"sqlite:///{db}")
    assert [p.name for p in tmp_path.iterdir()] == ["m.db"]
    assert [e.name for e in mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()] == [
        "Default"]


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_builds_file_is_removed_only_once_its_process_is_gone_and_it_is_a_minute_old(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.db"
    db.write_bytes(b"a store")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    live_old = tmp_path / f"m.db.steplog-{os.getpid()}-0123abcd.new"
    gone_fresh = tmp_path / f"m.db.steplog-{gone}-0123abce.new"
    gone_old = tmp_path / f"m.db.steplog-{gone}-0123abcd.new"
    not_a_build = tmp_path / f"m.db.steplog-{gone}-notes.new.bak"
    for p in (live_old, gone_fresh, gone_old, not_a_build):
        p.write_bytes(b"a build")
    for p in (live_old, gone_old, not_a_build):
        age(p, 120)
    assert not create_sqlite_store(f"sqlite:///{db}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.db", live_old.name, gone_fresh.name, not_a_build.name])


def test_a_percent_escaped_uri_builds_the_file_sqlite_opens(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert create_sqlite_store("sqlite:///a%2520b.db")
    assert [p.name for p in tmp_path.iterdir()] == ["a%20b.db"]
    client = mlflow.MlflowClient("sqlite:///a%2520b.db")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert [p.name for p in tmp_path.iterdir()] == ["a%20b.db"]
