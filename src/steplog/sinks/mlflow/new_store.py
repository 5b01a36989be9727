"""A new embedded MLflow store (``sqlite:///path`` that does not exist yet), created without a
disk flush per schema migration. Runs in the sink host, which has ``mlflow`` imported.

MLflow builds a new store's schema by running every one of its migrations, each committed on its
own, and sqlite flushes the disk at every commit. On a small machine those flushes slowed the
training loop beside the host by 4-12% for two seconds (docs/benchmarks.md). Here the schema is
built in a file beside the store with ``synchronous=OFF`` and the rollback journal in memory,
flushed to disk once, and linked into place under the store's name: the store appears whole or
not at all, and a store another process created meanwhile is kept. The file of a build whose
process was killed is removed by the next build of that store.
"""

from __future__ import annotations

import contextlib
import glob
import os
import uuid
from typing import Any

__all__ = ["create_sqlite_store", "sqlite_path"]


def sqlite_path(tracking_uri: str) -> str | None:
    """The file of a ``sqlite:///path`` URI (relative to the working directory, or absolute
    with four slashes); None for other URIs, in-memory databases and URIs with a query."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or "?" in tracking_uri:
        return None
    path = tracking_uri[len(prefix):]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return os.path.abspath(path)


def create_sqlite_store(tracking_uri: str) -> bool:
    """Create the schema of the sqlite store ``tracking_uri`` names if its file does not exist;
    True when this call created it. False leaves everything to MLflow's own creation: another
    kind of URI, a file that exists (also one another process created meanwhile), a folder
    that does not, or any failure here (the temporary file is removed)."""
    path = sqlite_path(tracking_uri)
    if path is None or os.path.lexists(path) or not os.path.isdir(os.path.dirname(path)):
        return False
    _remove_abandoned(path)
    building = f"{path}.steplog-{os.getpid()}-{uuid.uuid4().hex[:8]}.new"
    try:
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables

        engine = sqlalchemy.create_engine(f"sqlite:///{building}")
        sqlalchemy.event.listen(engine, "connect", _no_flushes)
        try:
            _initialize_tables(engine)  # type: ignore[no-untyped-call]
        finally:
            engine.dispose()
        _flush(building)
        try:
            os.link(building, path)  # never replaces: a store created meanwhile is kept
        except FileExistsError:
            return False
        _flush(os.path.dirname(path))
        return True
    except Exception:
        return False
    finally:
        for leftover in (building, f"{building}-journal"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


def _remove_abandoned(path: str) -> None:
    """Remove the files of builds whose process is gone (killed while building this store)."""
    for leftover in glob.glob(f"{glob.escape(path)}.steplog-*.new*"):
        pid = leftover[len(path) + len(".steplog-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user
    return True


def _no_flushes(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA synchronous=OFF")
    cursor.execute("PRAGMA journal_mode=MEMORY")
    cursor.close()


def _flush(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
