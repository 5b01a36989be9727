"""Putting a file or folder in place of another, for sinks that store uploads in a directory.

Guarantees: :func:`put_in_place` leaves ``dest`` holding the old content or the new, whole;
where the system can swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``, on the
local file systems) a reader or a crash never finds ``dest`` missing; elsewhere a folder is
replaced by two renames, and a crash between them leaves the old one beside ``dest`` under
a ``.steplog-`` name. Temporary names are short (a long legal name still fits) and begin with
``.steplog-``, which no upload may use (:data:`TEMP_PREFIX`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["TEMP_PREFIX", "exchange", "put_in_place", "sibling"]

TEMP_PREFIX = ".steplog-"
"""The start of every temporary name these helpers make beside a destination."""

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def _find_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc older than glibc 2.28, or none
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _find_renameat2()


def sibling(path: Path, suffix: str) -> Path:
    """A new temporary name in ``path``'s folder (nothing is created)."""
    return path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}{suffix}")


def exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` (both existing, any kinds) in one atomic step; False, with nothing
    changed, where the system or the file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))


def put_in_place(staged: Path, dest: Path) -> Path | None:
    """Put ``staged`` (a file or folder beside ``dest``) at ``dest`` in place of whatever is
    there, file or folder. When it returns, ``dest`` holds the new content, and the path it
    returns (if any) holds the old, for the caller to discard once it has counted the
    new content as stored; when it raises, ``dest`` is as it was and ``staged`` still holds
    the new content."""
    occupied = dest.exists() or dest.is_symlink()
    if not occupied or not (staged.is_dir() or (dest.is_dir() and not dest.is_symlink())):
        os.replace(staged, dest)  # a file over a file or a link, or anything where nothing is
        return None
    if exchange(staged, dest):
        return staged  # which now holds the old content
    old = sibling(dest, ".old")
    os.replace(dest, old)
    try:
        os.replace(staged, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    return old
