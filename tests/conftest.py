"""Shared fixtures. The MLflow server fixtures live in mlflow_support.py."""

from __future__ import annotations

pytest_plugins = ["mlflow_support", "fs_faults"]
