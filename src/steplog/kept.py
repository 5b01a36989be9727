"""Uploads that failed after their retries, kept on disk until ``steplog sync`` delivers them.

When a sink could not store a file, figure or checkpoint before its retries ran out (a server
down, a full disk), the payload is kept under ``<runs_dir>/<run>/uploads/<n>-<sink>/``:
``payload/<name>`` (a hard link to the staged file or directory when the file system allows,
else a copy) and ``upload.json``: which sink and destination (from :meth:`Sink.target`, never
with credentials), the artifact's name, kind, step, metadata and aliases, and why it failed.
:func:`sync_kept` rebuilds that sink for the same destination (:meth:`Sink.reattach`), or for
the new run that ``steplog sync --to`` moved its run to (:mod:`steplog.moves`), stores the
payload, and removes the kept folder once it is stored.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from steplog.moves import MOVED_FROM, follow, is_moved_to, move_run, moved_to, refusal
from steplog.paths import link_or_copy
from steplog.records import Artifact
from steplog.sinks.base import Sink

__all__ = ["Keeper", "KeptUpload", "find_kept", "sync_kept"]

FORMAT = "steplog.upload/1"


class Keeper:
    """Keeps one logger's failed uploads under ``<runs_dir>/<run>/uploads/`` (created on the
    first failure only, owner-only)."""

    def __init__(self, runs_dir: str | os.PathLike[str]) -> None:
        self.runs_dir = Path(runs_dir).absolute()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.run = f"{stamp}-{os.getpid()}-{secrets.token_hex(3)}"
        self._count = itertools.count(1)

    @property
    def run_dir(self) -> Path:
        """This logger's run directory (created when something is first kept or journaled)."""
        return self.runs_dir / self.run

    def keep(self, sink: Sink, artifact: Artifact, reason: str) -> Path:
        """Keep ``artifact``'s payload and what it takes to upload it again; the kept folder."""
        folder = self.runs_dir / self.run / "uploads" / f"{next(self._count)}-{sink.kind}"
        folder.mkdir(parents=True, mode=0o700)
        for parent in (self.runs_dir, self.runs_dir / self.run, folder.parent):
            os.chmod(parent, 0o700)
        payload = folder / "payload" / Path(artifact.name).name
        payload.parent.mkdir(mode=0o700)
        if artifact.data is not None:
            payload.write_bytes(artifact.data)
        elif artifact.source is not None:
            src = Path(artifact.source)
            if src.is_dir():
                shutil.copytree(src, payload, copy_function=link_or_copy)
            else:
                link_or_copy(src, payload)
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
        tmp = folder / "upload.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, folder / "upload.json")
        return folder


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
    """Every kept upload at or under ``path`` (``<run>/uploads/<n>-<sink>/upload.json``), run by
    run in the order they were kept. A manifest that cannot be read is passed to ``on_error``
    and skipped."""
    root = Path(path)
    if (root / "upload.json").is_file():
        manifests = [root / "upload.json"]
    else:
        manifests = [m for m in root.rglob("upload.json") if m.parent.parent.name == "uploads"]
        manifests.sort(key=_kept_order)
    for manifest in manifests:
        try:
            data = json.loads(manifest.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"not a kept upload (format {data.get('format')!r})")
            fields = data["artifact"]
            if isinstance(fields, dict) and "checkpoint" not in fields:  # kept by an older steplog
                fields = {**fields, "checkpoint": Artifact.is_checkpoint(fields)}
            artifact = msgspec.convert(fields, Artifact)
            kept = KeptUpload(manifest.parent, data["sink"], data.get("target"), artifact,
                              data.get("reason", ""), data.get(MOVED_FROM))
        except (OSError, ValueError, KeyError, msgspec.ValidationError) as exc:
            if on_error is not None:
                on_error(manifest, str(exc))
            continue
        yield kept


def _kept_order(manifest: Path) -> tuple[str, int]:
    number = manifest.parent.name.partition("-")[0]
    return str(manifest.parent.parent.parent), int(number) if number.isdigit() else 0


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
    Returns (stored, still kept)."""
    from steplog.sinks import reattach

    for run_dir in sorted({k.run_dir for k in find_kept(path)}):
        if (run_dir / "uploads").is_dir() and not (run_dir / "journal").exists():
            # What cannot move (an unwritable folder, say) is reported below, upload by upload.
            with contextlib.suppress(Exception):
                move_run(run_dir, to)
    stored = failed = 0
    unreadable: list[tuple[Path, str]] = []
    for kept in find_kept(path, lambda m, why: unreadable.append((m, why))):
        try:
            if kept.target is None:
                raise ValueError(f"the {kept.sink} sink cannot be reached again from here")
            entry = kept.entry()
            if to is not None and not is_moved_to(entry, to):
                raise ValueError(refusal(kept.sink, moved_to(entry), to, kept.run_dir))
            sink = reattach(kept.sink, follow(entry, to))
            try:
                sink.open()
                artifact = msgspec.structs.replace(kept.artifact, source=str(kept.payload))
                sink.upload(artifact)
                status = kept.target.get("end_status")
                if kept.moved_from is not None and status in ("FINISHED", "FAILED", "KILLED"):
                    sink.close(status)  # a new run ends as the logger did, uploads or not
            finally:
                sink.release()
        except Exception as exc:
            failed += 1
            report(kept, str(exc) or repr(exc))
        else:
            stored += 1
            shutil.rmtree(kept.folder, ignore_errors=True)
            report(kept, None)
    for manifest, why in unreadable:
        failed += 1
        report_unreadable(manifest, why)
    return stored, failed
