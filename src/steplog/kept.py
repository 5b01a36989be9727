"""Uploads that failed after their retries, kept on disk until ``steplog sync`` delivers them.

When a sink could not store a file, figure or checkpoint before its retries ran out (a server
down, a full disk), the payload is kept under ``<runs_dir>/<run>/uploads/<n>-<sink>/``:
``payload/<name>`` (a hard link to the staged file or directory when the file system allows,
else a copy) and ``upload.json``: which sink and destination (from :meth:`Sink.target`, never
with credentials), the artifact's name, kind, step, metadata and aliases, and why it failed.
:func:`sync_kept` rebuilds that sink for the same destination (:meth:`Sink.reattach`), or for
the new run that ``steplog sync --to`` moved its run to (:mod:`steplog.moves`), stores the
payload, and removes the kept folder once it is stored (its ``upload.json`` first, so a sync
cut short never meets a kept folder with part of its payload). One sync at a time delivers a
run's kept uploads (a lock file in its ``uploads/``). A kept upload that is not a checkpoint
is dropped when a file logged later under the same name is stored by the same sink of the
same logger: the later one replaced it there. ``uploads/.removed`` lists the kept folders
removed, so that a ``steplog sync`` of one of them finds nothing left.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from steplog.moves import END_STATUS, MOVED_FROM, follow, is_moved_to, move_run, moved_to, refusal
from steplog.paths import fsync_path, link_or_copy, replace_json
from steplog.records import Artifact
from steplog.sinks.base import Sink

__all__ = ["Keeper", "KeptUpload", "find_kept", "sync_kept"]

FORMAT = "steplog.upload/1"


class Keeper:
    """Keeps one logger's failed uploads under ``<runs_dir>/<run>/uploads/`` (created on the
    first failure only, owner-only; ``runs_dir`` itself is created if missing and never
    changed)."""

    def __init__(self, runs_dir: str | os.PathLike[str]) -> None:
        self.runs_dir = Path(runs_dir).absolute()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.run = f"{stamp}-{os.getpid()}-{secrets.token_hex(3)}"
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        self._kept: dict[tuple[int, str], list[tuple[int, Path]]] = {}
        """The uploads kept that a file logged later under the same name replaces (those that
        are not checkpoints), by (sink, name): (the upload's place in logging order, its
        folder)."""
        self._folders: list[Path] = []
        self._status: str | None = None

    @property
    def run_dir(self) -> Path:
        """This logger's run directory (created when something is first kept or journaled)."""
        return self.runs_dir / self.run

    def keep(self, sink: Sink, artifact: Artifact, reason: str, order: int = 0) -> Path:
        """Keep ``artifact``'s payload and what it takes to upload it again; the kept folder.
        ``order``: the upload's place in logging order (see :meth:`stored`).
        A payload that is the caller's own file is copied (a later change to that file does not
        reach it); a snapshot steplog staged or a file logged with ``move=True`` is linked
        where the file system allows. Nothing is left behind when keeping fails."""
        uploads = self.run_dir / "uploads"
        with self._lock:  # another sink's keep never meets folders a failed keep removes
            self.runs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for own in (self.run_dir, uploads):  # this logger's: owner-only
                own.mkdir(mode=0o700, exist_ok=True)
                os.chmod(own, 0o700)
            folder = uploads / f"{next(self._count)}-{sink.kind}"
            folder.mkdir(mode=0o700)
        try:
            os.chmod(folder, 0o700)
            payload = folder / "payload" / Path(artifact.name).name
            payload.parent.mkdir(mode=0o700)
            copy = link_or_copy if artifact.cleanup or artifact.move else shutil.copy2
            if artifact.data is not None:
                payload.write_bytes(artifact.data)
            elif artifact.source is not None:
                src = Path(artifact.source)
                if src.is_dir():
                    shutil.copytree(src, payload, copy_function=copy)
                else:
                    copy(src, payload)
            _fsync_tree(payload)  # on disk before the manifest that names it
            manifest = {
                "format": FORMAT,
                "sink": sink.kind,
                "target": sink.target(),
                "artifact": msgspec.to_builtins(
                    msgspec.structs.replace(artifact, source=None, data=None, cleanup=False,
                                            move=False)),
                "payload": str(payload.relative_to(folder)),
                "reason": reason,
                "kept_at_ms": time.time_ns() // 1_000_000,
            }
            with self._lock:
                if self._status is not None:
                    manifest[END_STATUS] = self._status
                replace_json(folder / "upload.json", manifest)
                fsync_path(folder)
                self._folders.append(folder)
                if not artifact.checkpoint:
                    self._kept.setdefault((id(sink), artifact.name), []).append((order, folder))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            with self._lock:
                for empty in (uploads, self.run_dir):  # what only this keep created
                    with contextlib.suppress(OSError):
                        empty.rmdir()
            raise
        return folder

    def stored(self, sink: Sink, artifact: Artifact, order: int = 0) -> None:
        """``artifact`` (logged ``order``-th) was stored by ``sink``: when it is a file that is
        not a checkpoint, the kept uploads of the same name to it that are not checkpoints and
        were logged no later (this one itself, kept by a close while it was on its way) are
        dropped, as a sync would only put them back over it. A directory replaces nothing
        (MLflow merges directories); checkpoints are stored by step."""
        if not self._kept or not _replaces(artifact):
            return
        with self._lock:
            kept = self._kept.get((id(sink), artifact.name), [])
            gone = [folder for logged, folder in kept if logged <= order]
            kept[:] = [(logged, folder) for logged, folder in kept if logged > order]
            for folder in gone:
                self._folders.remove(folder)
                with contextlib.suppress(OSError):
                    _remove_kept(folder)

    def ended(self, status: str) -> None:
        """The logger closed with ``status``: every kept upload notes it, so that a sync that
        moves them to a new run (``steplog sync --to``) ends that run with it."""
        with self._lock:
            self._status = status
            for folder in self._folders:
                with contextlib.suppress(OSError, ValueError):
                    manifest = json.loads((folder / "upload.json").read_text())
                    manifest[END_STATUS] = status
                    replace_json(folder / "upload.json", manifest)


def _fsync_tree(path: Path) -> None:
    """Flush the file ``path``, or every file and folder under the folder ``path``, to disk."""
    if not path.is_dir():
        fsync_path(path)
        return
    for folder, _, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def _replaces(artifact: Artifact) -> bool:
    """Whether storing ``artifact`` replaces what an upload of the same name stored: a file
    that is not a checkpoint."""
    if artifact.checkpoint:
        return False
    return artifact.data is not None or (artifact.source is not None
                                         and not os.path.isdir(artifact.source))


REMOVED = ".removed"
"""The file in a run's ``uploads/`` naming, a line each, the kept folders removed."""


def was_removed(folder: Path) -> bool:
    """Whether the kept folder ``folder`` was stored (or dropped) and removed."""
    try:
        return folder.name in (folder.parent / REMOVED).read_text().split("\n")
    except OSError:
        return False


def _remove_kept(folder: Path) -> None:
    """Remove a kept folder, its ``upload.json`` first: a removal cut short leaves no kept
    upload with part of its payload (``OSError`` when the manifest cannot be removed). Its name
    is noted in :data:`REMOVED` first."""
    with open(folder.parent / REMOVED, "a") as ledger:
        ledger.write(folder.name + "\n")
    with contextlib.suppress(FileNotFoundError):
        (folder / "upload.json").unlink()
    shutil.rmtree(folder, ignore_errors=True)


class KeptUpload(msgspec.Struct):
    """One kept upload, read back from its ``upload.json``."""

    folder: Path
    sink: str
    target: dict[str, Any] | None
    artifact: Artifact
    reason: str
    moved_from: dict[str, Any] | None = None
    """The target it had before ``steplog sync --to`` moved it to a new run."""

    @property
    def run_dir(self) -> Path:
        return self.folder.parent.parent

    def entry(self) -> dict[str, Any]:
        """Its destination as :mod:`steplog.moves` reads it."""
        return {"target": self.target, MOVED_FROM: self.moved_from}

    @property
    def payload(self) -> Path:
        return self.folder / "payload" / Path(self.artifact.name).name


def find_kept(path: str | os.PathLike[str],
              on_error: Callable[[Path, str], None] | None = None) -> Iterator[KeptUpload]:
    """Every kept upload at or under ``path`` (``<run>/uploads/<n>-<sink>/upload.json``, never
    a file inside a kept payload), run by run in the order they were kept. A manifest that
    cannot be read is passed to ``on_error`` and skipped."""
    root = Path(path)
    if (root / "upload.json").is_file():
        manifests = [root / "upload.json"]
    else:
        manifests = []
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            if "upload.json" in files and here.parent.name == "uploads":
                manifests.append(here / "upload.json")
                dirs[:] = []  # its payload is the user's: not searched
        manifests.sort(key=_kept_order)
    for manifest in manifests:
        kept = _read_kept(manifest, on_error)
        if kept is not None:
            yield kept


def _read_kept(manifest: Path,
               on_error: Callable[[Path, str], None] | None) -> KeptUpload | None:
    try:
        data = json.loads(manifest.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a kept upload (format {found!r})")
        fields = data["artifact"]
        if isinstance(fields, dict) and "checkpoint" not in fields:  # kept by an older steplog
            fields = {**fields, "checkpoint": Artifact.is_checkpoint(fields)}
        artifact = msgspec.convert(fields, Artifact)
        target = data.get("target")
        if target is not None and not isinstance(target, dict):
            raise ValueError(f"its target is not an object: {target!r}")
        return KeptUpload(manifest.parent, str(data["sink"]), target, artifact,
                          str(data.get("reason", "")), data.get(MOVED_FROM))
    except (OSError, ValueError, KeyError, TypeError, msgspec.ValidationError) as exc:
        if on_error is not None:
            on_error(manifest, str(exc))
        return None


def _kept_order(manifest: Path) -> tuple[str, int]:
    number = manifest.parent.name.partition("-")[0]
    return str(manifest.parent.parent.parent), int(number) if number.isdigit() else 0


SYNC_LOCK = ".sync.lock"
"""The lock file in a run's ``uploads/`` that a sync holds while it delivers them."""

ANOTHER_SYNC = "another steplog sync is delivering this run's kept uploads now"


@contextlib.contextmanager
def _sync_lock(run_dir: Path) -> Iterator[bool]:
    """Hold the lock on ``run_dir``'s kept uploads: True when this process has it, False when
    another sync holds it (never waits)."""
    try:
        fd = os.open(run_dir / "uploads" / SYNC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
    except FileNotFoundError:  # delivered and removed by another sync meanwhile
        yield True
        return
    except OSError:  # a read-only folder: no other sync can remove anything from it either
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:  # a file system without locks (some NFS mounts): unguarded, as before
            pass
        yield True
    finally:
        os.close(fd)


def sync_kept(path: str | os.PathLike[str],
              report: Callable[[KeptUpload, str | None], None],
              report_unreadable: Callable[[Path, str], None],
              to: str | None = None) -> tuple[int, int]:
    """Upload every kept upload under ``path`` again, to the same destination, or with ``to``
    to the new MLflow run at that tracking URI that its run was moved to
    (:mod:`steplog.moves`; uploads of a run directory with a journal are moved by
    :func:`steplog.replay.replay_run`, the others here); remove each one stored.
    ``report(kept, error)`` is called for each (``error`` is ``None`` on success), and
    ``report_unreadable`` for a manifest that cannot be read (it counts as still kept).
    A run whose kept uploads another sync is delivering is left to it (counted as still
    kept). Returns (stored, still kept)."""
    stored = failed = 0
    unreadable: list[tuple[Path, str]] = []
    runs: dict[Path, list[KeptUpload]] = {}
    for found in find_kept(path, lambda m, why: unreadable.append((m, why))):
        runs.setdefault(found.run_dir, []).append(found)
    for run_dir, kept in sorted(runs.items()):
        with _sync_lock(run_dir) as mine:
            if not mine:
                for old in kept:
                    failed += 1
                    report(old, ANOTHER_SYNC)
                continue
            moving = None
            if not (run_dir / "journal").exists():
                try:
                    move_run(run_dir, to)
                except Exception as exc:
                    moving = f"its run directory could not be moved: {exc!r}"
            for old in kept:
                # Read again under the lock: another sync may have stored or moved it.
                now = _read_kept(old.folder / "upload.json", None)
                if now is None:
                    if (old.folder / "upload.json").exists():
                        unreadable.append((old.folder / "upload.json", "cannot be read now"))
                    continue
                error = _store(now, to, moving)
                if error is None:
                    try:
                        _remove_kept(now.folder)
                    except OSError as exc:
                        error = (f"stored, but its kept folder could not be removed, so a "
                                 f"later sync stores it again: {exc}")
                if error is None:
                    stored += 1
                else:
                    failed += 1
                report(now, error)
    for manifest, why in unreadable:
        failed += 1
        report_unreadable(manifest, why)
    return stored, failed


def _store(kept: KeptUpload, to: str | None, moving: str | None) -> str | None:
    """Upload ``kept`` to where it goes; None when stored, else why not."""
    from steplog.sinks import reattach

    try:
        if kept.target is None:
            raise ValueError(f"the {kept.sink} sink cannot be reached again from here")
        entry = kept.entry()
        if to is not None and not is_moved_to(entry, to):
            raise ValueError(moving or refusal(kept.sink, moved_to(entry), to, kept.run_dir))
        sink = reattach(kept.sink, follow(entry, to))
        try:
            sink.open()
            artifact = msgspec.structs.replace(kept.artifact, source=str(kept.payload))
            sink.upload(artifact)
            if kept.moved_from is not None:
                _note_new_run(kept, sink.target() or {})
            status = kept.target.get(END_STATUS)
            if kept.moved_from is not None and status in ("FINISHED", "FAILED", "KILLED"):
                sink.close(status)  # a new run ends as the logger did, uploads or not
        finally:
            sink.release()
    except Exception as exc:
        return str(exc) or repr(exc)
    return None


_NEW_RUN = ("run_id", "experiment_id", "artifact_uri")


def _note_new_run(kept: KeptUpload, target: dict[str, Any]) -> None:
    """Write the new run that a moved upload's sink opened into every kept upload of its run
    directory moved to the same run, so that a later ``--to`` elsewhere is refused for them
    (part of what the run lacked is in that run now)."""
    known = kept.target or {}
    if not target.get("run_id") or known.get("run_id"):
        return
    token = known.get("run_token")
    for manifest in sorted((kept.run_dir / "uploads").glob("*/upload.json")):
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            data = json.loads(manifest.read_text())
            other = data.get("target") or {}
            if data.get(MOVED_FROM) is None or other.get("run_token") != token:
                continue
            if other.get("tracking_uri") != known.get("tracking_uri") or other.get("run_id"):
                continue
            data["target"] = {**other, **{k: target.get(k) for k in _NEW_RUN}}
            replace_json(manifest, data)
