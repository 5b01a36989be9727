"""Artifact names: relative paths that can never leave the run's directory."""

from __future__ import annotations

import posixpath

__all__ = ["safe_relpath"]


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
