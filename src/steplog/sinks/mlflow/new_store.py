"""A new embedded MLflow store (``sqlite:///path`` that does not exist yet), created without a
disk flush per schema migration. Runs in the sink host, which has ``mlflow`` imported.

MLflow builds a new store's schema by running every one of its migrations, and sqlite flushes
the disk at every commit (1,084 flushes for a new store of MLflow 3.17.2). On a small machine
those flushes slowed the training loop beside the host by 4-12% for two seconds
(docs/benchmarks.md). Here the schema is built in a file beside the store with
``synchronous=OFF`` and the rollback journal in memory, checked to be at MLflow's latest
revision, flushed to disk once, and linked into place under the store's name: the store appears
whole or not at all, and a store another process created meanwhile is kept. The file of a build
whose process was killed is removed by a later start on that store.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import time
import uuid
from typing import Any

from steplog.paths import fsync_path

__all__ = ["create_sqlite_store", "sqlite_path"]

ABANDONED_AFTER_S = 60.0
"""A build's file untouched for this long, whose process is gone, is removed. (Its process id
alone does not tell: a build in another pid namespace sharing the folder is not visible here.)"""


def sqlite_path(tracking_uri: str) -> str | None:
    """The file of a ``sqlite:///path`` URI, as SQLAlchemy's sqlite driver opens it
    (percent-escapes decoded, made absolute against the working directory); None for other
    URIs, URIs with a host, user, port or query, in-memory databases and ``file:`` names."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    url = make_url(tracking_uri)
    path = url.database
    if url.drivername != "sqlite" or url.query or url.host or url.username or url.password \
            or url.port or not path or path == ":memory:" or path.startswith("file:") \
            or "\0" in path:
        return None
    return os.path.abspath(path)


def create_sqlite_store(tracking_uri: str) -> bool:
    """Create the schema of the sqlite store ``tracking_uri`` names if its file does not exist;
    True when this call created it. False leaves everything to MLflow's own creation: another
    kind of URI, a file that exists (also one another process created meanwhile), a folder
    that does not, a file system without hard links, or any failure here (this call's files
    are removed)."""
    building: str | None = None
    try:
        path = sqlite_path(tracking_uri)
        if path is None:
            return False
        _remove_abandoned(path)
        if os.path.lexists(path) or not os.path.isdir(os.path.dirname(path)):
            return False
        building = f"{path}.steplog-{os.getpid()}-{uuid.uuid4().hex[:8]}.new"
        if not _build(building):
            return False
        fsync_path(building)
        try:
            os.link(building, path)  # never replaces: a store created meanwhile is kept
        except FileExistsError:
            return False
        os.unlink(building)
        building = None
        fsync_path(os.path.dirname(path))
        return True
    except Exception:
        return False
    finally:
        if building is not None:
            for leftover in (building, f"{building}-journal"):
                with contextlib.suppress(OSError, ValueError):
                    os.unlink(leftover)


def _build(file: str) -> bool:
    """MLflow's schema in ``file``, with MLflow's own engine settings and no disk flushes;
    whether it reached MLflow's latest revision."""
    from mlflow.store.db.utils import (
        _get_latest_schema_revision,
        _get_schema_version,
        _initialize_tables,
        create_sqlalchemy_engine,
    )
    from sqlalchemy import event
    from sqlalchemy.engine import URL

    engine = create_sqlalchemy_engine(  # type: ignore[no-untyped-call]
        URL.create("sqlite", database=file).render_as_string(hide_password=False))
    event.listen(engine, "connect", _no_flushes)
    try:
        _initialize_tables(engine)  # type: ignore[no-untyped-call]
        built = _get_schema_version(engine)  # type: ignore[no-untyped-call]
        return bool(built == _get_latest_schema_revision())  # type: ignore[no-untyped-call]
    finally:
        engine.dispose()


def _remove_abandoned(path: str) -> None:
    """Remove the files of builds of ``path`` whose process is gone and that nothing touched
    for :data:`ABANDONED_AFTER_S` (killed while building, or between linking and unlinking)."""
    for leftover in glob.glob(f"{glob.escape(path)}.steplog-*.new*"):
        build = _BUILD_NAME.fullmatch(leftover[len(path):])
        if build is None:
            continue  # not a name a build gives its file
        with contextlib.suppress(OSError, OverflowError):
            if time.time() - os.lstat(leftover).st_mtime > ABANDONED_AFTER_S \
                    and not _alive(int(build[1])):
                os.unlink(leftover)


_BUILD_NAME = re.compile(r"\.steplog-(\d+)-[0-9a-f]{8}\.new(?:-journal)?")
"""What follows the store's name in the name of a build's file (see :func:`create_sqlite_store`)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _no_flushes(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA synchronous=OFF")
    cursor.execute("PRAGMA journal_mode=MEMORY")
    cursor.close()
