"""Artifact names: relative paths that can never leave the run's directory."""

from __future__ import annotations

import os
import posixpath
import shutil

__all__ = ["link_or_copy", "safe_relpath"]


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
