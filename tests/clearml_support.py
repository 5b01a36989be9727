"""Reading back a ClearML offline session, as ClearML's own importer would; a gateway that
answers every request with 502 (a fault, never a ClearML backend)."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class _BadGateway(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(502)
        self.end_headers()

    def do_POST(self) -> None:
        self.do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def bad_gateway() -> Iterator[str]:
    """The URL of an HTTP server on loopback that answers every request with 502."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class OfflineSession:
    """What an offline session folder holds for its task."""

    folder: Path
    task: dict[str, Any]
    scalars: list[tuple[str, str, int, float]] = field(default_factory=list)

    @classmethod
    def read(cls, folder: str | Path) -> OfflineSession:
        """Parse ``task.json`` and every event line of ``metrics.jsonl`` that belongs to the
        task (ClearML's importer drops events of other ids, so these are what it would send)."""
        folder = Path(folder)
        task = json.loads((folder / "task.json").read_text())
        session = cls(folder, task)
        metrics = folder / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                for ev in json.loads(line):
                    if ev.get("task") == task["id"] and ev["type"] == "training_stats_scalar":
                        session.scalars.append(
                            (ev["metric"], ev["variant"], ev["iter"], ev["value"])
                        )
        return session

    def series(self, title: str, series: str) -> list[tuple[int, float]]:
        return [(i, v) for t, s, i, v in self.scalars if (t, s) == (title, series)]

    @property
    def params(self) -> dict[str, str]:
        """``General`` hyperparameters as ClearML stores them (values are strings)."""
        section = self.task.get("hyperparams", {}).get("General", {})
        return {k: v["value"] for k, v in section.items()}

    @property
    def properties(self) -> dict[str, str]:
        section = self.task.get("hyperparams", {}).get("properties", {})
        return {k: v["value"] for k, v in section.items()}

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return {a["key"]: a for a in self.task.get("execution", {}).get("artifacts", [])}

    @property
    def models(self) -> list[dict[str, Any]]:
        return list(self.task.get("offline_output_models", []))
