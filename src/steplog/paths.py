"""Files steplog writes for itself: artifact names that can never leave the run's directory,
hard links instead of copies, JSON files replaced atomically, whole writes and flushes to disk,
and the ``steplog sync`` command that delivers what a directory keeps."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import shlex
import shutil
import threading
from pathlib import Path
from typing import Any

__all__ = ["fsync_path", "link_or_copy", "replace_json", "safe_relpath", "sync_command",
           "write_all"]


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` at ``fd``'s position (its end, for a file opened to append);
    ``OSError(ENOSPC)`` when the system takes none of it."""
    view = memoryview(data)
    while view:
        k = os.write(fd, view)
        if k <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[k:]


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush the file or directory ``path`` to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_command(path: str | os.PathLike[str], to: str | None = None) -> str:
    """The ``steplog sync`` command line for ``path`` (and ``--to``), quoted for a shell."""
    command = f"steplog sync {shlex.quote(str(path))}"
    return command if to is None else f"{command} --to {shlex.quote(to)}"


def replace_json(path: Path, data: Any) -> None:
    """``path`` holds ``data`` as JSON (0600), replaced atomically: a reader (or a crash) sees
    the old file or the new one, never a part. The file is on disk when this returns."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def discard(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` (a file, a link, or a folder and what it holds) as far as possible,
    never raising: for what is no longer needed. A link is removed, never what it names."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> str:
    """``dst`` as a hard link to ``src`` (no bytes copied), or a copy (``shutil.copy2``) where
    the file system cannot link them; returns ``dst`` (usable as ``copytree``'s copy function)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return os.fspath(dst)


def safe_relpath(name: str) -> str:
    """Return ``name`` as a normalised relative POSIX path, or raise ``ValueError``.

    Rejected: empty names, absolute paths (``/x``, ``C:\\x``, ``\\\\host``), any ``..``
    component, and NUL characters. Backslashes count as separators.
    """
    if not isinstance(name, str):
        raise TypeError(f"artifact name must be a str, got {type(name).__name__}")
    if not name or "\x00" in name:
        raise ValueError(f"invalid artifact name {name!r}")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise ValueError(f"artifact name must be relative, got {name!r}")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"artifact name {name!r} would escape the run directory")
    return posixpath.join(*parts)
