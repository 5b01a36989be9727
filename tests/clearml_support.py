"""Reading back a ClearML offline session, as ClearML's own importer would."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
