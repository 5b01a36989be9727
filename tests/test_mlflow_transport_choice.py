"""Which transport serves a tracking server: steplog's own REST client, unless something only
MLflow's client can do is configured (then MLflow's client runs in a sink host)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from steplog.sinks.mlflow.common import plugins
from steplog.sinks.mlflow.rest import needs_mlflow_client

URL = "http://127.0.0.1:5000"


@pytest.fixture(autouse=True)
def fresh_plugin_scan(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_WORKSPACE",
                 "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    plugins.cache_clear()
    yield
    plugins.cache_clear()


def install_plugin(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real installed distribution (its metadata on ``sys.path``) that registers a request
    header provider with MLflow, as a plugin package does."""
    info = root / "steplog_test_header_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: steplog-test-header-plugin\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[mlflow.request_header_provider]\nteam = steplog_test_header_plugin:Provider\n")
    monkeypatch.syspath_prepend(str(root))


def test_a_plain_server_uri_is_served_by_steplogs_rest_transport() -> None:
    assert needs_mlflow_client(URL) is None


def test_an_auth_plugin_needs_mlflows_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "my_auth")
    assert "auth plugin" in (needs_mlflow_client(URL) or "")


def test_an_installed_request_header_plugin_needs_mlflows_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(tmp_path, monkeypatch)
    assert "request-header plugin" in (needs_mlflow_client(URL) or "")


def test_the_plugin_scan_is_read_once_per_process_as_mlflow_reads_its_registry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert needs_mlflow_client(URL) is None
    install_plugin(tmp_path, monkeypatch)
    assert needs_mlflow_client(URL) is None  # installed after the first look: not seen
    plugins.cache_clear()  # a new process
    assert needs_mlflow_client(URL) is not None


def test_a_proxy_for_the_servers_scheme_needs_mlflows_client_unless_bypassed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    assert "proxy" in (needs_mlflow_client(URL) or "")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert needs_mlflow_client(URL) is None
