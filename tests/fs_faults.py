"""Real file-system faults for tests: a read-only file system and a tiny one that fills up.

Both are tmpfs mounts made for the test and unmounted after it (mounting needs root, as on
the development machines and CI; elsewhere the tests that need them are skipped).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["read_only_dir", "small_fs"]


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` for the block (the test is skipped where mounting fails)."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a file system mounted read-only: every write fails with EROFS."""
    with _tmpfs(tmp_path / "read-only", "ro,size=64k") as where:
        yield where


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB file system (16 pages): writes fail with ENOSPC once it is full."""
    with _tmpfs(tmp_path / "small", "size=64k") as where:
        yield where
