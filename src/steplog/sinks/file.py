"""The file sink: a run directory of plain files, written incrementally.

Layout under ``output_dir``::

    scalars.jsonl     one JSON object per point: name, value, step, timestamp (ms since epoch)
    parameters.json   every parameter logged so far (rewritten atomically)
    tags.json         every tag logged so far (rewritten atomically)
    artifacts.jsonl   one line per stored artifact: name, kind, step, metadata, aliases, timestamp
    run.json          written at close: status and end time
    <artifacts>       files under the names they were logged with

``pandas.read_json(path, lines=True)`` reads ``scalars.jsonl``; NaN and infinities are written
as the ``NaN``/``Infinity``/``-Infinity`` tokens that pandas and Python's json module accept.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from steplog.paths import safe_relpath
from steplog.records import Artifact, MetricRecord, Param, Scalar, Tag, now_ms
from steplog.sinks.base import RunStatus, Sink

__all__ = ["FileSink"]

_NONFINITE_MARK = b'"value":null'


def _dump_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=True), encoding="utf-8")
    os.replace(tmp, path)


class FileSink(Sink):
    """Writes a run into ``output_dir``, a batch at a time; a failed write leaves no partial line
    (it is truncated away), so a crash loses only records not yet written."""

    kind: ClassVar[str] = "file"
    max_batch = 50_000
    max_batch_age_s = 0.1

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.output_dir = Path(output_dir).absolute()
        self._encoder = msgspec.json.Encoder()
        self._scalars: Any = None
        self._params: dict[str, Any] = {}
        self._tags: dict[str, str] = {}

    def describe(self) -> str:
        return str(self.output_dir)

    def open(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # Resuming into an existing directory appends scalars and merges params and tags.
        for attr, fname in (("_params", "parameters.json"), ("_tags", "tags.json")):
            path = self.output_dir / fname
            if path.exists():
                setattr(self, attr, json.loads(path.read_text(encoding="utf-8")))
        self._scalars = open(self.output_dir / "scalars.jsonl", "ab")  # noqa: SIM115

    def write(self, records: Sequence[MetricRecord]) -> None:
        scalars = [r for r in records if type(r) is Scalar]
        if scalars:
            self._append_scalars(scalars)
        if len(scalars) != len(records):
            self._store_settings(records)

    def _append_scalars(self, scalars: list[Scalar]) -> None:
        data = self._encoder.encode_lines(scalars)
        if _NONFINITE_MARK in data:
            data = self._encode_with_nonfinite(scalars)
        f = self._scalars
        start = f.tell()
        try:
            f.write(data)
            f.flush()
        except BaseException:
            # Leave no partial batch behind: the retry rewrites it whole, without duplicates.
            f.seek(start)
            f.truncate()
            raise

    def _encode_with_nonfinite(self, scalars: list[Scalar]) -> bytes:
        lines = []
        for r in scalars:
            if math.isfinite(r.value):
                lines.append(self._encoder.encode(r))
            else:
                row = {"name": r.name, "value": r.value, "step": r.step, "timestamp": r.timestamp}
                lines.append(json.dumps(row, allow_nan=True, separators=(",", ":")).encode())
        lines.append(b"")
        return b"\n".join(lines)

    def _store_settings(self, records: Sequence[MetricRecord]) -> None:
        params_changed = tags_changed = False
        for r in records:
            if type(r) is Param:
                self._params[r.name] = r.value
                params_changed = True
            elif type(r) is Tag:
                self._tags[r.name] = r.value
                tags_changed = True
        if params_changed:
            _dump_json_atomic(self.output_dir / "parameters.json", self._params)
        if tags_changed:
            _dump_json_atomic(self.output_dir / "tags.json", self._tags)

    def upload(self, artifact: Artifact) -> None:
        dest = self.output_dir / safe_relpath(artifact.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if artifact.data is not None:
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_bytes(artifact.data)
            os.replace(tmp, dest)
        elif artifact.source is not None:
            src = Path(artifact.source)
            if src.is_dir():
                shutil.copytree(src, dest, dirs_exist_ok=True)
                if artifact.move:
                    shutil.rmtree(src)
            elif artifact.move:
                shutil.move(src, dest)
            else:
                shutil.copy2(src, dest)
        else:
            raise ValueError(f"artifact {artifact.name!r} has neither data nor a source")
        entry = {
            "name": safe_relpath(artifact.name),
            "kind": artifact.kind,
            "step": artifact.step,
            "metadata": artifact.metadata,
            "aliases": artifact.aliases,
            "timestamp": artifact.timestamp,
        }
        with open(self.output_dir / "artifacts.jsonl", "ab") as f:
            f.write(self._encoder.encode(entry) + b"\n")

    def close(self, status: RunStatus) -> None:
        if self._scalars is not None:
            self._scalars.flush()
            os.fsync(self._scalars.fileno())
            self._scalars.close()
            self._scalars = None
        _dump_json_atomic(self.output_dir / "run.json", {"status": status, "end_time": now_ms()})
