"""The MLflow sink against a real ``mlflow server``: what it stores is read back over REST.

Each test creates its own run on the session's server (see ``mlflow_support.py``) and checks what
the server stored, never what the sink meant to send.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from mlflow_support import MlflowServer
from steplog.errors import PermanentError
from steplog.records import Artifact, Batch, MetricRecord, Param, Scalar, Scalars, Tag, now_ms
from steplog.sinks.mlflow import (
    MAX_ENTITIES_PER_REQUEST,
    MAX_METRICS_PER_REQUEST,
    MAX_PARAMS_TAGS_PER_REQUEST,
    MAX_REQUEST_BYTES,
    RUN_TOKEN_TAG,
    MLflowSink,
)
from steplog.sinks.mlflow.common import Chunk
from steplog.sinks.mlflow.rest import RestTransport

pytestmark = pytest.mark.timeout(120)

SinkFactory = Callable[..., MLflowSink]


@pytest.fixture
def make_sink(mlflow_server: MlflowServer, request: pytest.FixtureRequest) -> Iterator[SinkFactory]:
    """Open sinks on the session server; any still open are closed (FINISHED) afterwards."""
    opened: list[MLflowSink] = []

    def make(experiment: str | None = None, **kwargs: Any) -> MLflowSink:
        name = experiment or f"{request.node.name}-{uuid.uuid4().hex[:8]}"
        kwargs.setdefault("tracking_uri", mlflow_server.url)
        kwargs.setdefault("request_timeout_s", 20.0)
        sink = MLflowSink(name, **kwargs)
        sink.open()
        opened.append(sink)
        return sink

    yield make
    for sink in opened:
        with contextlib.suppress(Exception):
            sink.close("FINISHED")


def history(server: MlflowServer, run_id: str, key: str) -> list[tuple[int, Any, int]]:
    return [(m["step"], m["value"], m["timestamp"]) for m in server.metric_history(run_id, key)]


def params_of(server: MlflowServer, run_id: str) -> dict[str, str]:
    return {p["key"]: p["value"] for p in server.run(run_id)["data"].get("params", [])}


def tags_of(server: MlflowServer, run_id: str) -> dict[str, str]:
    return {t["key"]: t["value"] for t in server.run(run_id)["data"].get("tags", [])}


def download(server: MlflowServer, run: dict[str, Any], path: str) -> bytes:
    root = run["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/")
    url = f"{server.url}/api/2.0/mlflow-artifacts/artifacts/{root}/{path}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        data: bytes = resp.read()
        return data


def test_every_scalar_param_and_tag_arrives_once_in_call_order(
    make_sink: SinkFactory, mlflow_server: MlflowServer
) -> None:
    sink = make_sink()
    assert sink.run_id is not None
    expected: dict[str, list[tuple[int, Any, int]]] = {"loss": [], "reward/mean": [], "lr": []}
    step = 0
    for batch_no in range(5):
        ts = now_ms()
        batch: list[MetricRecord] = []
        for _ in range(300):
            for key in expected:
                value = step * 0.5 if key != "lr" else float(step % 7)
                batch.append(Scalar(key, value, step, ts))
                expected[key].append((step, value, ts))
            step += 1
            if step % 97 == 0:
                batch.append(Param(f"p{step}", step, ts))
                batch.append(Tag("phase", f"batch-{batch_no}-step-{step}", ts))
        sink.write(batch)

    for key, points in expected.items():
        assert history(mlflow_server, sink.run_id, key) == points, key
    params = params_of(mlflow_server, sink.run_id)
    assert {k: v for k, v in params.items() if k.startswith("p")} == {
        f"p{s}": str(s) for s in range(97, step + 1, 97)
    }
    last = max(range(97, step + 1, 97))
    assert tags_of(mlflow_server, sink.run_id)["phase"].endswith(f"step-{last}")


def test_nan_and_infinity_round_trip(make_sink: SinkFactory, mlflow_server: MlflowServer) -> None:
    sink = make_sink()
    ts = now_ms()
    values = [1.5, math.nan, math.inf, -math.inf, 0.0, -2.5e-300, 1.7e308, 1.7e308]
    sink.write([Scalar("odd", v, i, ts) for i, v in enumerate(values)])
    # The same values inside a mixed batch take the settings path: same result.
    sink.write(
        [Param("mixed", "yes", ts)] + [Scalar("odd2", v, i, ts) for i, v in enumerate(values)]
    )
    for key in ("odd", "odd2"):
        stored = [v for _, v, _ in history(mlflow_server, sink.run_id or "", key)]
        # MLflow answers NaN as the JSON string "NaN" and clamps infinities to the largest double.
        assert stored == [1.5, "NaN", sys.float_info.max, -sys.float_info.max, 0.0, *values[5:]]


def test_check_name_accepts_what_mlflow_stores_and_refuses_the_rest(
    make_sink: SinkFactory, mlflow_server: MlflowServer
) -> None:
    sink = make_sink()
    good = ["loss", "a/b c-d.e_f", "x" * 250, "ключ/値", "time:ms", "train/loss 2"]
    bad = ["", "x" * 251, "bad!", "a//b", "/abs", "a/../b", "trailing/", "./a", "..", "q?"]
    for name in good:
        sink.check_name(name)
    for name in bad:
        with pytest.raises(ValueError):
            sink.check_name(name)
    # Every name check_name accepts is accepted by the server.
    ts = now_ms()
    sink.write([Scalar(name, 1.0, 0, ts) for name in good])
    for name in good:
        assert len(mlflow_server.metric_history(sink.run_id or "", name)) == 1


def test_bad_key_in_a_batch_raises_permanent_error_naming_it_and_sends_nothing(
    make_sink: SinkFactory, mlflow_server: MlflowServer
) -> None:
    sink = make_sink()
    ts = now_ms()
    with pytest.raises(PermanentError, match="bad key!"):
        sink.write([Scalar("fine", 1.0, 0, ts), Scalar("bad key!", 2.0, 0, ts)])
    assert mlflow_server.metric_history(sink.run_id or "", "fine") == []
    sink.write([Scalar("fine", 1.0, 0, ts)])  # the good record alone goes through
    assert len(mlflow_server.metric_history(sink.run_id or "", "fine")) == 1


def test_changed_param_raises_permanent_error_naming_it(
    make_sink: SinkFactory, mlflow_server: MlflowServer
) -> None:
    sink = make_sink()
    run_id = sink.run_id or ""
    ts = now_ms()
    sink.write([Param("lr", 0.1, ts), Param("layers", [64, 64], ts)])

    # Refused locally, before any request: the scalar of the same batch is not stored either.
    with pytest.raises(PermanentError, match=r"'lr' changed from '0.1' to '0.2'"):
        sink.write([Scalar("loss", 1.0, 0, ts), Param("lr", 0.2, ts)])
    assert mlflow_server.metric_history(run_id, "loss") == []
    # A change inside one batch is refused the same way.
    with pytest.raises(PermanentError, match="'batch'"):
        sink.write([Param("batch", 32, ts), Param("batch", 64, ts)])

    # The same value again is fine (a retried batch resends its params).
    sink.write([Param("lr", 0.1, ts), Param("layers", [64, 64], ts), Scalar("loss", 1.0, 0, ts)])
    assert params_of(mlflow_server, run_id) == {"lr": "0.1", "layers": "[64, 64]"}

    # A change the sink cannot know about (written by another client) is refused by the server,
    # and MLflow's reason is in the error.
    mlflow_server.api(
        "runs/log-batch", {"run_id": run_id, "params": [{"key": "seed", "value": "1"}]}
    )
    with pytest.raises(PermanentError, match="Changing param values is not allowed"):
        sink.write([Param("seed", 2, ts)])
    assert params_of(mlflow_server, run_id)["seed"] == "1"


def test_batch_of_2500_metrics_and_150_params_is_split_within_mlflow_limits(
    make_sink: SinkFactory, mlflow_server: MlflowServer
) -> None:
    sink = make_sink()
    run_id = sink.run_id or ""
    ts = now_ms()
    records: list[MetricRecord] = []
    for i in range(2500):
        records.append(Scalar(f"m{i % 3}", float(i), i, ts))
        if i % 16 == 0:
            records.append(Param(f"param{i // 16}", i, ts))  # 157 params in all
        if i % 500 == 0:
            records.append(Tag("progress", str(i), ts))
    n_params = sum(isinstance(r, Param) for r in records)
    assert n_params >= 150

    chunks = sink._plan(records)
    for chunk in chunks:
        n_settings = len(chunk.params) + len(chunk.tags)
        assert len(chunk.metrics) <= MAX_METRICS_PER_REQUEST
        assert n_settings <= MAX_PARAMS_TAGS_PER_REQUEST
        assert len(chunk.metrics) + n_settings <= MAX_ENTITIES_PER_REQUEST
    assert [m for c in chunks for m in c.metrics] == [r for r in records if isinstance(r, Scalar)]

    sink.write(records)
    for k in range(3):
        got = history(mlflow_server, run_id, f"m{k}")
        assert got == [(i, float(i), ts) for i in range(k, 2500, 3)]
    assert len(params_of(mlflow_server, run_id)) == n_params
    assert tags_of(mlflow_server, run_id)["progress"] == "2000"


def test_requests_over_one_megabyte_are_split_and_all_arrive(
    make_sink: SinkFactory, mlflow_server: MlflowServer
) -> None:
    sink = make_sink()
    run_id = sink.run_id or ""
    ts = now_ms()
    # 100 params of 6000 two-byte characters: 1.2 MB of JSON in one chunk.
    records: list[MetricRecord] = [Param(f"long{i}", "é" * 6000, ts) for i in range(100)]
    records += [Scalar("m", float(i), i, ts) for i in range(800)]
    (chunk,) = sink._plan(records)
    transport = sink._transport
    assert isinstance(transport, RestTransport)
    bodies = transport.bodies(run_id, chunk)
    assert len(bodies) > 1
    assert all(len(b) <= MAX_REQUEST_BYTES for b in bodies)

    sink.write(records)
    assert len(params_of(mlflow_server, run_id)) == 100
    assert len(mlflow_server.metric_history(run_id, "m")) == 800


def test_upload_stores_a_file_a_directory_and_bytes(
    make_sink: SinkFactory, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    sink = make_sink()
    run_id = sink.run_id or ""
    ts = now_ms()
    notes = tmp_path / "staged-1234.tmp"  # a staged snapshot: stored under the logged name
    notes.write_text("hello")
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a.txt").write_text("a")
    (tree / "sub" / "b.json").write_text('{"b": 1}')
    (tree / "sub" / "deeper" / "c with space.bin").write_bytes(b"\x00\x01")

    sink.upload(Artifact("docs/notes.txt", ts, source=str(notes)))
    sink.upload(Artifact("snap", ts, source=str(tree)))
    sink.upload(Artifact("blobs/policy.pt", ts, data=b"\x89weights" * 1000))
    sink.upload(Artifact("policy.pt", ts, data=b"v2"))
    sink.upload(Artifact("policy.pt", ts, data=b"v3"))  # a retry or new version overwrites

    files = {f["path"]: int(f["file_size"]) for f in mlflow_server.artifacts(run_id)}
    assert files == {
        "docs/notes.txt": 5,
        "snap/a.txt": 1,
        "snap/sub/b.json": 8,
        "snap/sub/deeper/c with space.bin": 2,
        "blobs/policy.pt": 8000,
        "policy.pt": 2,
    }
    run = mlflow_server.run(run_id)
    assert download(mlflow_server, run, "docs/notes.txt") == b"hello"
    assert download(mlflow_server, run, "blobs/policy.pt") == b"\x89weights" * 1000
    assert download(mlflow_server, run, "policy.pt") == b"v3"


def test_upload_refuses_a_missing_source_or_an_escaping_name(
    make_sink: SinkFactory, tmp_path: Path
) -> None:
    sink = make_sink()
    ts = now_ms()
    with pytest.raises(PermanentError, match="does not exist"):
        sink.upload(Artifact("x.txt", ts, source=str(tmp_path / "missing")))
    with pytest.raises(PermanentError, match="escape"):
        sink.upload(Artifact("../x.txt", ts, data=b"x"))


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_close_ends_the_run_with_the_given_status(
    make_sink: SinkFactory, mlflow_server: MlflowServer, status: str
) -> None:
    sink = make_sink()
    run_id = sink.run_id or ""
    assert mlflow_server.run(run_id)["info"]["status"] == "RUNNING"
    before = now_ms()
    sink.close(status)  # type: ignore[arg-type]
    info = mlflow_server.run(run_id)["info"]
    assert info["status"] == status
    assert int(info["end_time"]) >= before
    sink.close(status)  # type: ignore[arg-type]  # a second close is a no-op


def test_open_creates_the_experiment_once_and_names_the_run(
    make_sink: SinkFactory, mlflow_server: MlflowServer
) -> None:
    experiment = f"shared-{uuid.uuid4().hex[:8]}"
    first = make_sink(experiment, run_name="first")
    second = make_sink(experiment, run_name="second", tags={"team": "rl"})
    assert first.experiment_id == second.experiment_id
    assert first.run_id != second.run_id
    info = mlflow_server.run(second.run_id or "")["info"]
    assert info["run_name"] == "second"
    tags = tags_of(mlflow_server, second.run_id or "")
    assert tags["team"] == "rl"
    assert tags["mlflow.user"]
    assert RUN_TOKEN_TAG in tags
    assert str(second.run_id) in second.describe()


def test_writes_to_the_embedded_sqlite_store_without_a_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sink = MLflowSink("embedded")
    assert sink.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    sink.open()
    ts = now_ms()
    sink.write(
        [Scalar("x", v, i, ts) for i, v in enumerate([1.0, math.nan, math.inf])]
        + [Param("lr", 0.1, ts), Tag("t", "v", ts)]
    )
    with pytest.raises(PermanentError, match="'lr' changed"):
        sink.write([Param("lr", 0.3, ts)])
    sink.upload(Artifact("dir/blob.bin", ts, data=b"abc"))
    sink.close("FINISHED")

    from mlflow import MlflowClient

    client = MlflowClient("sqlite:///mlflow.db")
    run = client.get_run(sink.run_id or "")
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1"}
    assert run.data.tags["t"] == "v"
    points = client.get_metric_history(run.info.run_id, "x")
    assert [p.step for p in points] == [0, 1, 2]
    assert math.isnan(points[1].value)
    assert [f.path for f in client.list_artifacts(run.info.run_id, "dir")] == ["dir/blob.bin"]


def test_writing_to_a_deleted_run_is_refused_for_the_whole_batch(
    make_sink: SinkFactory, mlflow_server: MlflowServer
) -> None:
    sink = make_sink()
    mlflow_server.api("runs/delete", {"run_id": sink.run_id})
    ts = now_ms()
    with pytest.raises(PermanentError) as refused:
        sink.write([Scalar("a", 1.0, 0, ts), Scalar("b", 2.0, 0, ts)])
    assert refused.value.whole_batch  # no bisecting: no single entry is to blame


def test_a_request_body_is_encoded_from_blocks_with_non_finite_values_as_strings() -> None:
    transport = RestTransport("http://127.0.0.1:9", 5.0)  # never connects: encoding only
    rows = [("a", 1.5, 0), ("b", math.nan, 1), ("a", -math.inf, 2)]
    metrics = Batch([Scalars(rows, 5, finite=False), Scalar("c", 2.0, 3, 7)])
    chunk = Chunk(cast("Sequence[Scalar]", metrics), {"lr": "0.1"}, {"t": "x"})
    (body,) = transport.bodies("run1", chunk)
    sent = json.loads(body)
    assert sent["run_id"] == "run1"
    assert sent["metrics"] == [
        {"key": "a", "value": 1.5, "step": 0, "timestamp": 5},
        {"key": "b", "value": "NaN", "step": 1, "timestamp": 5},
        {"key": "a", "value": "-Infinity", "step": 2, "timestamp": 5},
        {"key": "c", "value": 2.0, "step": 3, "timestamp": 7},
    ]
    assert sent["params"] == [{"key": "lr", "value": "0.1"}]
    assert sent["tags"] == [{"key": "t", "value": "x"}]


def test_a_batch_of_blocks_is_planned_within_mlflow_limits_in_call_order() -> None:
    sink = MLflowSink("plan-only", tracking_uri="http://127.0.0.1:9")
    ts = now_ms()
    rows = [(f"m{i % 3}", float(i), i) for i in range(2500)]
    parts: list[Any] = []
    for k in range(0, 2500, 400):
        parts.append(Scalars(rows[k : k + 400], ts, finite=True))
        parts.append(Param(f"p{k}", k, ts))
        parts.append(Tag("progress", str(k), ts))
    chunks = sink._plan(Batch(parts))
    for chunk in chunks:
        n_settings = len(chunk.params) + len(chunk.tags)
        assert len(chunk.metrics) <= MAX_METRICS_PER_REQUEST
        assert len(chunk.metrics) + n_settings <= MAX_ENTITIES_PER_REQUEST
    assert [(m.name, m.value, m.step, m.timestamp) for c in chunks for m in c.metrics] == [
        (*row, ts) for row in rows
    ]
    assert {k for c in chunks for k in c.params} == {f"p{k}" for k in range(0, 2500, 400)}


@pytest.mark.parametrize(("uri", "expected"), [
    ("sqlite:///m.db", "sqlite:///{cwd}/m.db"),
    ("sqlite:///m.db?timeout=20", "sqlite:///{cwd}/m.db?timeout=20"),
    ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("sqlite:///file:m.db?mode=ro&uri=true", "sqlite:///file:{cwd}/m.db?mode=ro&uri=true"),
    ("sqlite:///file::memory:?cache=shared", "sqlite:///file::memory:?cache=shared"),
    ("mlruns", "{cwd}/mlruns"),
    ("file:mlruns", "file://{cwd}/mlruns"),
    ("http://user:pw@127.0.0.1:5000", "http://user:pw@127.0.0.1:5000"),
    ("postgresql://u:p@127.0.0.1/db", "postgresql://u:p@127.0.0.1/db"),
    ("databricks", "databricks"),
])
def test_a_relative_store_is_made_absolute_and_every_other_uri_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str, expected: str
) -> None:
    from steplog.sinks.mlflow.common import absolute_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_uri(uri) == expected.format(cwd=tmp_path)
