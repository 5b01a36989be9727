"""``steplog sync --to URI``: what a run directory lacks goes to a new MLflow run at ``URI``.

A run directory names its destinations in two kinds of places: each sink of ``run.json`` (the
journal's consumers) and each kept upload's ``upload.json``. Places that name the same original
MLflow run (the same run token) form a group. Moving a group gives every place of it the same
new target (:meth:`MLflowSink.redirected`: a new run at ``URI``, a run token that every
journal of the same original run shares (a continued run's journals move into one run), and under
``"end_status"`` the status the logger closed with when ``run.json`` knows it, with which a new
run that kept uploads fill is ended) and keeps the original target under ``"moved_from"``. Each
file is replaced atomically, ``run.json`` first, and all of it before anything is sent, so an
interrupted move is continued into the same new run (found by its token) by any later sync. A
sync without ``--to`` first gives a moved group's other places the same target (a crash between
two files leaves nothing split), then follows the targets. Only MLflow runs move; a group is
moved only when it lacks something (a sink with frames after its cursor, or a kept upload). A
second ``--to`` with another URI is refused for a group already moved to a run that exists: part
of what it lacked may be in it already; a move whose new run was never created (its server
never answered, a wrong URI) is replaced by the new one.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steplog.paths import replace_json, sync_command

__all__ = ["END_STATUS", "MOVED_FROM", "follow", "is_moved_to", "move_run", "moved_to", "refusal"]

MOVED_FROM = "moved_from"
"""Key of a sink entry (``run.json``) or kept upload (``upload.json``) holding the target it had
before ``steplog sync --to`` moved it."""

END_STATUS = "end_status"
"""Key of a moved target, and of a kept upload's ``upload.json``, holding the status its logger
closed with (a new run is ended with it)."""


@dataclass
class _Place:
    key: str
    """The consumer name (``run.json``) or the kept upload's folder."""
    entry: dict[str, Any]
    """The sink entry of ``run.json`` or the whole ``upload.json``."""
    kind: str
    lacking: bool
    changed: bool = False

    @property
    def target(self) -> dict[str, Any] | None:
        target: dict[str, Any] | None = self.entry.get("target")
        return target

    @property
    def moved_from(self) -> dict[str, Any] | None:
        moved: dict[str, Any] | None = self.entry.get(MOVED_FROM)
        return moved

    def origin(self) -> str | None:
        """The token of the MLflow run this place was first going to."""
        token = (self.moved_from or self.target or {}).get("run_token")
        return str(token) if token else None

    def move(self, target: dict[str, Any]) -> None:
        self.entry[MOVED_FROM] = self.target
        self.entry["target"] = dict(target)
        self.changed = True


def _portable(uri: str) -> str:
    from steplog.sinks.mlflow.sink import portable_uri

    return portable_uri(uri)


def moved_to(entry: dict[str, Any]) -> str | None:
    """The tracking URI that the place ``entry`` (a ``run.json`` sink or an ``upload.json``)
    was moved to by ``steplog sync --to``; ``None`` when it was not moved."""
    if entry.get(MOVED_FROM) is None:
        return None
    uri = (entry.get("target") or {}).get("tracking_uri")
    return str(uri) if uri else None


def is_moved_to(entry: dict[str, Any], to: str) -> bool:
    """True when the place ``entry`` was moved to a new run at ``to`` (compared without
    credentials)."""
    return moved_to(entry) == _portable(to)


def refusal(kind: str, moved_to: str | None, to: str, run: Path) -> str:
    """Why a place of ``run`` (of sink kind ``kind``, moved earlier to ``moved_to`` or not)
    cannot go to a new run at ``to``."""
    if kind != "mlflow":
        return (f"a {kind} sink cannot be moved to an MLflow run (only MLflow sinks can); it "
                "stays kept for a steplog sync without --to")
    if moved_to is None:
        return (f"not moved with its run: move the whole run directory with: "
                f"{sync_command(run, to)} (unless its journal is in use by a running logger "
                "or cannot be read); it stays kept")
    return (f"already moved to a new run at {moved_to} by an earlier steplog sync --to, which "
            f"may hold part of what it lacked; finish that move with: "
            f"{sync_command(run, moved_to)} (or without --to)")


def follow(entry: dict[str, Any], to: str | None) -> dict[str, Any]:
    """The target to reattach the place ``entry`` to: its own, with the credentials that ``to``
    carries when the place was moved there (a stored target never holds any)."""
    target: dict[str, Any] = entry.get("target") or {}
    if to is not None and is_moved_to(entry, to):
        return {**target, "tracking_uri": to}
    return target


def _created_anything(members: list[_Place]) -> bool:
    """Whether any place of a moved group holds a run id for its new run."""
    return any((p.target or {}).get("run_id") for p in members if p.moved_from is not None)


def move_run(run: Path, to: str | None, lacking: Collection[str] = ()) -> dict[str, str]:
    """Make the places of ``run`` that name one original MLflow run agree on where they go, and
    with ``to`` move each such run that lacks something to a new run at ``to`` (see the module
    docstring). ``lacking``: the ``run.json`` consumers with frames after their cursor (kept
    uploads always lack). Call it while holding the run's journal, if it has one. Returns why a
    place cannot go to ``to``, by consumer name or upload folder; those places are unchanged."""
    manifest_path = run / "run.json"
    manifest: dict[str, Any] | None = None
    places: list[_Place] = []
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        for consumer, info in manifest.get("sinks", {}).items():
            places.append(_Place(consumer, info, str(info.get("kind", "?")),
                                 consumer in lacking))
    uploads: dict[str, Path] = {}
    for path in sorted((run / "uploads").glob("*/upload.json")):
        try:
            data = json.loads(path.read_text())
            kind = str(data["sink"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # steplog sync reports it, unread
        uploads[str(path.parent)] = path
        places.append(_Place(str(path.parent), data, kind, True))

    errors: dict[str, str] = {}
    groups: dict[str, list[_Place]] = {}
    for place in places:
        origin = place.origin() if place.kind == "mlflow" else None
        if origin is None:
            if to is not None and place.lacking:
                errors[place.key] = refusal(place.kind, None, to, run)
            continue
        groups.setdefault(origin, []).append(place)

    status = manifest.get("status") if manifest is not None else None
    if status is None:  # run.json is gone with the journal: the uploads note how it closed
        status = next((p.entry[END_STATUS] for p in places
                       if p.key in uploads and p.entry.get(END_STATUS)), None)
    for members in groups.values():
        moved = next((p.target for p in members if p.moved_from is not None and p.target), None)
        if to is not None and any(p.lacking for p in members):
            if moved is None:
                # The place that knows most about the original run (its id) names it.
                first = max(members, key=lambda p: bool((p.target or {}).get("run_id")))
                from steplog.sinks import redirect

                moved = redirect(first.kind, first.target or {}, to)
                if status in ("FINISHED", "FAILED", "KILLED"):
                    moved[END_STATUS] = status
            elif moved.get("tracking_uri") != _portable(to):
                if moved.get("run_id") is None and not _created_anything(members):
                    # The earlier move never created its run (that server never answered, or
                    # a wrong URI): nothing went there, so this move replaces it.
                    from steplog.sinks import redirect

                    original = next(p.moved_from for p in members if p.moved_from is not None)
                    moved = redirect(members[0].kind, original or {}, to)
                    if status in ("FINISHED", "FAILED", "KILLED"):
                        moved[END_STATUS] = status
                    for p in members:
                        if p.moved_from is not None:
                            p.entry["target"] = dict(moved)
                            p.changed = True
                else:
                    for p in members:
                        if p.lacking:
                            errors[p.key] = refusal(p.kind, moved.get("tracking_uri"), to, run)
                    continue
        if moved is None:
            continue
        for p in members:
            if p.moved_from is None:
                p.move(moved)

    if manifest is not None and any(p.changed for p in places if p.key not in uploads):
        replace_json(manifest_path, manifest)
    for p in places:
        if p.changed and p.key in uploads:
            replace_json(uploads[p.key], p.entry)
    return errors

