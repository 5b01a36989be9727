"""Shared fixtures. The MLflow server fixtures live in mlflow_support.py."""

from __future__ import annotations

pytest_plugins = ["mlflow_support", "postgres_support", "fs_faults"]


def pytest_configure(config: object) -> None:
    """Journals and kept uploads of the suite's loggers go to a temporary runs directory, not
    into the working tree."""
    import os
    import tempfile

    os.environ.setdefault("STEPLOG_RUNS_DIR", tempfile.mkdtemp(prefix="steplog-test-runs-"))
