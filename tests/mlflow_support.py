"""A real ``mlflow server`` for tests, started once per session on a free loopback port.

The server uses a sqlite backend (or any ``backend_store_uri``, with ``workers`` worker processes:
see ``postgres_support.py``) and a local artifact root in a temporary directory. It runs in
its own process group (``start_new_session=True``) and is stopped by killing that group, so none
of its workers outlive the session; a small supervisor leading the group also kills it if the
test process dies without tearing down. Nothing here imports mlflow: the server is a subprocess and
tests talk to it over REST.

Fixtures:
    ``mlflow_server``              the session's server (started on first use).
    ``restartable_mlflow_server``  the same server, for a test that stops and restarts it; when the
                                   test ends the server is running again on the same port and db.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

__all__ = [
    "MlflowServer",
    "free_port",
    "group_members",
    "mlflow_server",
    "pin_beside_server",
    "restartable_mlflow_server",
    "wait_group_gone",
]

START_DEADLINE_S = 90.0
"""Longest wait for ``GET /health`` to answer after starting the server (seconds)."""

STOP_GRACE_S = 10.0
"""Time the process group gets to exit after SIGTERM before it is killed (seconds)."""

# The process group's leader: runs the server as its child and kills the whole group when the
# server exits or when the test process is gone (even if it was SIGKILLed and ran no teardown).
_SUPERVISOR = """
import os, signal, subprocess, sys, time
parent = int(sys.argv[1])
if sys.argv[2]:
    os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
server = subprocess.Popen(sys.argv[3:])
while server.poll() is None and os.getppid() == parent:
    time.sleep(0.5)
os.killpg(0, signal.SIGKILL)
"""


def pin_beside_server() -> tuple[set[int] | None, list[int]]:
    """Split this machine's CPUs between a server and this process, for a benchmark: with two
    or more, this process moves to all but the first, and ``({first}, the others)`` is returned
    (the first for ``MlflowServer(..., cpus=...)``); with one, ``(None, [it])`` and nothing
    moves."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, cpus
    os.sched_setaffinity(0, set(cpus[1:]))
    return {cpus[0]}, cpus[1:]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class MlflowServer:
    """One ``mlflow server`` process group on 127.0.0.1; :meth:`start` / :meth:`stop` reuse the
    same port, database and artifact directory, so a restarted server serves the same runs."""

    def __init__(self, root: Path, port: int | None = None, cpus: set[int] | None = None,
                 backend_store_uri: str | None = None, workers: int = 1) -> None:
        self.root = root
        self.cpus = cpus
        self.workers = workers
        """Worker processes of the server (``mlflow server --workers``)."""
        """CPUs the server may run on (``None``: any); benchmarks pin it away from the client."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_path = root / "mlflow.db"
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.db_path}"
        self.artifacts_dir = root / "artifacts"
        self.log_path = root / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pgid(self) -> int:
        """The process group of the server and everything it started (0: not started)."""
        return 0 if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, deadline_s: float = START_DEADLINE_S) -> None:
        """Return once ``GET /health`` answers 200; raise ``RuntimeError`` (server stopped) if it
        does not within ``deadline_s`` seconds or the process exits first."""
        if self.running:
            return
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            sys.executable, "-c", _SUPERVISOR, str(os.getpid()),
            ",".join(str(c) for c in sorted(self.cpus or ())),
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", str(self.workers),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if not self.running:
                break
            if self._healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"mlflow server did not become healthy within {deadline_s:.0f} s; "
            f"log tail:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Return once the server's whole process group is gone (SIGTERM, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid  # the supervisor leads its own session: its pid is the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
        wait_group_gone(pgid, STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
        wait_group_gone(pgid, STOP_GRACE_S)

    def restart(self) -> None:
        """Stop, then start again on the same port and database."""
        self.stop()
        self.start()

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's combined stdout/stderr."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    # REST helpers for assertions: tests check what the server stored, never what we sent.

    def api(self, endpoint: str, body: dict[str, Any] | None = None, **query: Any) -> Any:
        """GET (no ``body``) or POST ``/api/2.0/mlflow/<endpoint>``; the decoded JSON answer."""
        url = f"{self.url}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        data = None if body is None else msgspec.json.encode(body)
        req = urllib.request.Request(
            url, data=data, headers={"Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as resp:
            return msgspec.json.decode(resp.read())

    def metric_history(self, run_id: str, key: str) -> list[dict[str, Any]]:
        """Every stored point of ``key`` in ``run_id``, in the server's order (timestamp, step)."""
        points: list[dict[str, Any]] = []
        token = None
        while True:
            query: dict[str, Any] = {"run_id": run_id, "metric_key": key, "max_results": 25000}
            if token:
                query["page_token"] = token
            page = self.api("metrics/get-history", **query)
            points.extend(page.get("metrics", []))
            token = page.get("next_page_token")
            if not token:
                return points

    def run(self, run_id: str) -> dict[str, Any]:
        """The ``run`` object of ``runs/get``: info, data (params, tags, latest metrics)."""
        run: dict[str, Any] = self.api("runs/get", run_id=run_id)["run"]
        return run

    def artifacts(self, run_id: str, path: str = "") -> list[dict[str, Any]]:
        """Every artifact file under ``path`` of the run, recursively: dicts with path, size."""
        out: list[dict[str, Any]] = []
        query: dict[str, Any] = {"run_id": run_id}
        if path:
            query["path"] = path
        for f in self.api("artifacts/list", **query).get("files", []):
            if f.get("is_dir"):
                out.extend(self.artifacts(run_id, f["path"]))
            else:
                out.append(f)
        return out


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of group ``pgid``, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(entry))
    return members


def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while group_members(pgid):
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running ``mlflow server`` (sqlite + local artifacts) shared by the whole session."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def restartable_mlflow_server(mlflow_server: MlflowServer) -> Iterator[MlflowServer]:
    """The session server, for a test that may :meth:`~MlflowServer.stop` and
    :meth:`~MlflowServer.start` it; it is running again (same port, same db) afterwards."""
    try:
        yield mlflow_server
    finally:
        if not mlflow_server.running:
            mlflow_server.start()
