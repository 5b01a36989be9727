"""A real PostgreSQL server for tests and benchmarks, and an ``mlflow server`` on it.

PostgreSQL comes from the ``pgserver`` wheel (its bundled ``initdb``/``postgres`` binaries; no
system package, no manual step). The cluster is created in a fresh temporary directory, listens on
a free 127.0.0.1 port only, and runs in its own process group led by a small supervisor that
kills the group when the server exits or the test process is gone (even after a SIGKILL of the
test process). PostgreSQL refuses to run as root: under root the cluster is created and served
as the unprivileged ``nobody`` user (``pgserver`` itself would add a system user and widen the
permissions of every folder above its data directory; this module does neither, and runs a copy
of the binaries when a folder above the virtualenv is closed to ``nobody``). :meth:`stop`
shuts the server down (fast shutdown, then SIGKILL of the group) and removes the directory.

Fixtures:
    ``postgres_server``         the session's PostgreSQL server (started on first use).
    ``postgres_mlflow_server``  the session's ``mlflow server --workers 3`` on a database of it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlflow_support import MlflowServer, free_port, group_members, wait_group_gone

__all__ = ["PostgresServer", "postgres_mlflow_server", "postgres_server"]

START_DEADLINE_S = 60.0
STOP_GRACE_S = 10.0
MLFLOW_WORKERS = 3
"""Workers of the session's postgres-backed ``mlflow server``."""

# Leads the process group; runs postgres as `uid` (when given) and kills the whole group when
# postgres exits or the test process is gone.
_SUPERVISOR = """
import os, signal, subprocess, sys, time
parent, uid = int(sys.argv[1]), int(sys.argv[2])
ids = {}
if uid >= 0:
    import pwd
    entry = pwd.getpwuid(uid)
    ids = {"user": uid, "group": entry.pw_gid, "extra_groups": []}
server = subprocess.Popen(sys.argv[3:], **ids)
try:
    while server.poll() is None and os.getppid() == parent:
        time.sleep(0.2)
finally:
    os.killpg(0, signal.SIGKILL)
"""


def _install() -> Path:
    """The ``pgserver`` wheel's PostgreSQL installation (found without importing the package:
    its import writes a lock file into the user's runtime folder)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver package (the dev extra) is not installed")
    return Path(spec.submodule_search_locations[0]) / "pginstall"


def _usable_install(root: Path, ids: dict[str, Any]) -> Path:
    """An installation the service user can run: the wheel's, or when a folder above it is
    closed to that user (a virtualenv under ``/root``), a copy of what a server needs in
    ``root`` (PostgreSQL finds its libraries and data files relative to its binaries)."""
    install = _install()
    if not ids:
        return install
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if subprocess.run([str(install / "bin" / "postgres"), "--version"], cwd=root,
                          capture_output=True, timeout=30, **ids).returncode == 0:
            return install
    # The same layout: the binaries find libpq through the RPATH $ORIGIN/../../../pgserver.libs.
    copy = root / "pg" / "pgserver" / "pginstall"
    (copy / "bin").mkdir(parents=True)
    for name in ("initdb", "postgres"):
        shutil.copy2(install / "bin" / name, copy / "bin" / name)
    shutil.copytree(install / "lib", copy / "lib", symlinks=True)
    shutil.copytree(install / "share", copy / "share", symlinks=True)
    libs = install.parent.parent / "pgserver.libs"
    if libs.is_dir():
        shutil.copytree(libs, root / "pg" / "pgserver.libs", symlinks=True)
    return copy


def _service_user() -> pwd.struct_passwd | None:
    """The user postgres runs as: ``nobody`` under root (postgres refuses root), else us."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam("nobody")


class PostgresServer:
    """One PostgreSQL cluster on ``127.0.0.1:<port>`` with trust authentication for the local
    ``postgres`` superuser; :meth:`database` creates a database and returns its SQLAlchemy URI."""

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        """``False`` (tests): ``fsync=off``, a crash may lose the cluster. ``True``
        (benchmarks): PostgreSQL's defaults, each commit flushed to disk."""
        self.port = free_port()
        self.root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pgid(self) -> int:
        """The process group of the server and everything it started (0: not started)."""
        return 0 if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, deadline_s: float = START_DEADLINE_S) -> None:
        """Create the cluster and return once it accepts connections; ``RuntimeError`` (and
        nothing left running) if it does not within ``deadline_s``."""
        try:
            self._start(deadline_s)
        except BaseException:
            self.stop()  # nothing left running, the folder removed
            raise

    def _start(self, deadline_s: float) -> None:
        user = _service_user()
        root = Path(tempfile.mkdtemp(prefix="steplog-postgres-"))
        self.root = root
        ids: dict[str, Any] = {}
        if user is not None:
            os.chown(root, user.pw_uid, user.pw_gid)
            ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        install = _usable_install(root, ids)
        data = root / "data"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        init = subprocess.run(
            [str(install / "bin" / "initdb"), "-D", str(data), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
            cwd=root, env=env, capture_output=True, text=True, timeout=deadline_s, **ids,
        )  # fmt: skip
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}): {init.stderr[-2000:]}")
        settings = ["-c", "max_connections=200", "-c", "listen_addresses=127.0.0.1"]
        if not self.durable:
            settings += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                         "-c", "full_page_writes=off"]
        cmd = [
            sys.executable, "-c", _SUPERVISOR, str(os.getpid()),
            str(user.pw_uid if user is not None else -1),
            str(install / "bin" / "postgres"), "-D", str(data), "-p", str(self.port), "-k", "",
            *settings,
        ]  # fmt: skip
        with open(root / "postgres.log", "ab") as log:
            self._proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and self.running:
            if self._ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not start within {deadline_s:.0f} s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        import psycopg2

        try:
            psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def database(self, name: str) -> str:
        """Create database ``name``; its SQLAlchemy URI (``postgresql://...``)."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                dbname="postgres", connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.uri(name)

    def uri(self, name: str) -> str:
        # psycopg2 named: SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3.
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def query(self, name: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` run in database ``name`` (for assertions on what MLflow stored)."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=name,
                                connect_timeout=10)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        finally:
            conn.close()

    def log_tail(self, chars: int = 3000) -> str:
        if self.root is None:
            return "(no log)"
        try:
            return (self.root / "postgres.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Fast shutdown, then SIGKILL of the process group; the cluster's directory is
        removed. Returns once no process of the group is left."""
        proc, self._proc = self._proc, None
        if proc is not None:
            pgid = proc.pid
            for pid in group_members(pgid):
                if pid != pgid:  # the postmaster (and its children): a fast shutdown
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGINT)
                    break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_GRACE_S)
            wait_group_gone(pgid, STOP_GRACE_S)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def postgres_mlflow(postgres: PostgresServer, root: Path, database: str, workers: int,
                    cpus: set[int] | None = None) -> MlflowServer:
    """An (unstarted) ``mlflow server --workers N`` storing runs in a new database of
    ``postgres`` and artifacts under ``root``."""
    uri = postgres.database(database)
    return MlflowServer(root, backend_store_uri=uri, workers=workers, cpus=cpus)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (stopped, its directory removed, at the end)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_mlflow_server(postgres_server: PostgresServer,
                           tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server --workers 3`` on a PostgreSQL database, shared by the session."""
    server = postgres_mlflow(postgres_server, tmp_path_factory.mktemp("mlflow-pg"), "mlflow",
                             MLFLOW_WORKERS)
    try:
        server.start()
        yield server
    finally:
        server.stop()
