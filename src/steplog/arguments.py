"""What a ``log_*`` call checks and captures, on the caller's thread, before it queues anything.

Values are captured by :mod:`steplog.capture`; this module checks a call's other arguments
(metric names, mappings, paths) and captures files and figures as
:class:`~steplog.records.Artifact` records.

Guarantees: bad input raises here, at the call, with a clear ``TypeError``, ``ValueError``,
``FileNotFoundError`` or ``NotADirectoryError``, and nothing of that call is queued; what these
functions return no longer depends on the caller's objects (a path is made absolute and checked
now, a figure is rendered to PNG now, metadata is deep-copied now).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from steplog.capture import capture_param, capture_step, capture_value
from steplog.paths import safe_relpath
from steplog.records import Artifact, now_ms
from steplog.sinks.base import Sink

__all__ = [
    "artifact_file_name",
    "artifact_of",
    "capture_metrics",
    "check_name",
    "data_of",
    "directory_of",
    "existing_path",
    "figure_of",
    "file_of",
    "utf8_problem",
]


def check_name(name: object, sinks: Sequence[Sink]) -> str:
    """``name``, when it is a metric name every sink accepts (a non-blank ``str``); raises
    otherwise."""
    if type(name) is not str:
        raise TypeError(f"a metric name must be a str, got {type(name).__name__}")
    if not name or name.isspace():
        raise ValueError("a metric name must not be empty")
    problem = utf8_problem(name)
    if problem is not None:
        raise ValueError(f"the name {name!r} {problem}")
    for sink in sinks:
        sink.check_name(name)
    return name


def utf8_problem(value: object) -> str | None:
    """Why ``value`` (a text, or a captured parameter holding texts) cannot be stored: a text
    with a lone surrogate (what ``os.fsdecode`` makes of a byte that is not UTF-8), which no
    backend's UTF-8 takes; None when it can be."""
    try:
        msgspec.msgpack.encode(value)
    except UnicodeEncodeError as exc:
        return (f"holds {exc.object[exc.start:exc.end]!r}, which UTF-8 cannot encode (a lone "
                "surrogate, as a file name that is not UTF-8 decodes to)")
    except (TypeError, OverflowError):
        return None  # not a text problem: handled where the value is stored
    return None


def capture_metrics(metrics: object) -> dict[str, Any]:
    """A private copy of a ``log_metrics`` mapping, each value captured (``TypeError`` for a
    value that is not a number, ``ValueError`` for an int too large for a float; the message
    names the key)."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name to number, got "
                        f"{type(metrics).__name__}")
    values: dict[str, Any] = {}
    for k, v in metrics.items():
        try:
            values[k] = capture_value(v)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"metric {k!r}: {exc}") from None
    return values


def existing_path(path: str | os.PathLike[str]) -> Path:
    """``path``, absolute; ``FileNotFoundError`` when nothing is there."""
    p = Path(os.fspath(path)).absolute()
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {p}")
    return p


def _storable(value: Any, what: str) -> Any:
    """``value``, or ``ValueError`` naming ``what`` when UTF-8 cannot encode it (see
    :func:`utf8_problem`): refused at the call, not by the worker after it."""
    problem = utf8_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {problem}")
    return value


def _stored_name(name: str) -> str:
    """``name`` normalised by :func:`safe_relpath`, UTF-8 encodable."""
    stored = safe_relpath(name)
    _storable(stored, f"the stored name {name!r}")
    return stored


def artifact_of(
    path: str | os.PathLike[str],
    name: str | None,
    kind: str,
    step: int | None,
    metadata: dict[str, Any] | None,
    aliases: list[str] | None,
) -> Artifact:
    """The record of ``log_artifact``: ``path`` stored as ``name`` (default: its base name).
    ``TypeError`` for a ``type`` that is not a str, ``metadata`` that is not a mapping, or
    ``aliases`` that are not a list of str; ``ValueError`` for a name, type, alias or
    metadata text UTF-8 cannot encode (a file name that is not UTF-8: pass ``name``)."""
    src = existing_path(path)
    dest = _stored_name(name if name is not None else src.name)
    if not isinstance(kind, str):
        raise TypeError(f"type must be a str, got {type(kind).__name__}")
    _storable(kind, "type")
    if step is not None:
        step = capture_step(step)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    if aliases is not None:
        if isinstance(aliases, (str, bytes, Mapping)) or not isinstance(aliases, Iterable):
            raise TypeError(f"aliases must be a list of str, got {type(aliases).__name__}")
        aliases = list(aliases)
        if not all(isinstance(a, str) for a in aliases):
            raise TypeError("aliases must be a list of str, got "
                            f"{[type(a).__name__ for a in aliases]}")
        _storable(aliases, "aliases")
    captured = None
    if metadata is not None:
        captured = _storable(capture_param(dict(metadata)), "metadata")
    return Artifact(
        name=dest,
        timestamp=now_ms(),
        source=str(src),
        kind=kind,
        step=step,
        metadata=captured,
        aliases=aliases,
    )


def file_of(path: str | os.PathLike[str], name: str, move: bool) -> Artifact:
    """The record of ``log_file``: ``path`` stored as ``<name>/<base name of path>``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    src = existing_path(path)
    dest = _stored_name(f"{name}/{src.name}")
    return Artifact(name=dest, timestamp=now_ms(), source=str(src), kind="file", move=bool(move))


def directory_of(dir: str | os.PathLike[str], path: str | None) -> Artifact:
    """The record of ``log_directory``: the tree ``dir`` stored under ``path`` (default: its
    name)."""
    src = existing_path(dir)
    if not src.is_dir():
        raise NotADirectoryError(f"not a directory: {src}")
    dest = _stored_name(path if path is not None else src.name)
    return Artifact(name=dest, timestamp=now_ms(), source=str(src), kind="directory")


def data_of(data: bytes, name: str, default_ext: str, iteration: int | None,
            kind: str) -> Artifact:
    """The record of bytes captured at the call (``log_text``, ``log_image``), named by
    :func:`artifact_file_name`."""
    if iteration is not None:
        iteration = capture_step(iteration)
    return Artifact(name=artifact_file_name(name, default_ext, iteration), timestamp=now_ms(),
                    data=data, kind=kind, step=iteration)


_EXTENSION = re.compile(r"(?<=[^/])\.[A-Za-z][A-Za-z0-9]{0,7}$")
"""A file name's extension: a dot, a letter, then at most 7 letters or digits (``.txt``,
``.json``, ``.mp4``); ``run.5`` or ``temp0.001`` has none."""

_NOT_PNG = frozenset({".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".svg",
                      ".pdf", ".eps"})


def artifact_file_name(name: str, default_ext: str, iteration: int | None) -> str:
    """The file a named upload is stored as: ``name`` normalised (:func:`safe_relpath`),
    ``default_ext`` added when it has no extension, ``_<iteration>`` before the extension.
    With ``default_ext`` ``.png`` (an image or a figure, always PNG) only ``.png`` counts as
    one, and another image format's extension raises ``ValueError``."""
    path = _stored_name(name)
    found = _EXTENSION.search(path.rpartition("/")[2])
    ext = found.group() if found else ""
    if default_ext == ".png" and ext.lower() != ".png":
        if ext.lower() in _NOT_PNG:
            raise ValueError(f"{name!r}: images and figures are stored as PNG; name it with "
                             f".png or without an extension, not {ext}")
        ext = ""  # a dot inside the name ("lr0.001"): .png is added after it
    base = path[:len(path) - len(ext)]
    if iteration is not None:
        base = f"{base}_{iteration}"
    return base + (ext or default_ext)


def figure_of(fig: Any, name: str, iteration: int | None) -> Artifact:
    """The record of ``log_figure``: the matplotlib figure rendered to PNG now, named ``name``
    (``.png`` added if missing; ``_<iteration>`` before it)."""
    if not hasattr(fig, "savefig"):
        raise TypeError(f"expected a matplotlib figure, got {type(fig).__name__}")
    if iteration is not None:
        iteration = capture_step(iteration)
    file_name = artifact_file_name(name, ".png", iteration)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Artifact(name=file_name, timestamp=now_ms(), data=buf.getvalue(), kind="figure",
                    step=iteration)
