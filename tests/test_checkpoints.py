"""Checkpoints: weights captured at the call, safe files, versions, bounded memory, loading."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from mlflow_support import MlflowServer  # noqa: E402
from steplog import (  # noqa: E402
    Artifact,
    FileLogger,
    FileSink,
    Logger,
    LoggerClosedError,
    MLFlowLogger,
    Options,
    load_policy,
)

FAST = Options(drain_interval_s=0.01)


class Policy(torch.nn.Module):
    """A policy with the prt_rl-style ``save_to_dict`` hook."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))

    def save_to_dict(self) -> dict[str, object]:
        return {"obs_dim": 4, "act_dim": 2}


class Opaque:
    """Not weights: a plain object with an attribute."""

    def __init__(self) -> None:
        self.epsilon = 0.1


def stepped(policy: torch.nn.Module) -> torch.optim.Optimizer:
    """An Adam optimizer after one step (so it has state tensors)."""
    opt = torch.optim.Adam(policy.parameters(), lr=0.1)
    policy(torch.ones(1, 4)).sum().backward()
    opt.step()
    return opt


def test_an_optimizer_step_right_after_save_policy_does_not_reach_the_stored_weights(
    tmp_path: Path,
) -> None:
    policy = Policy()
    opt = stepped(policy)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    logger = FileLogger(tmp_path, options=FAST)
    logger.save_policy({"policy": policy, "optimizer": opt})
    policy(torch.ones(1, 4)).sum().backward()
    opt.step()  # the very next update, while the snapshot may not be written yet
    assert logger.close(30)
    state = torch.load(tmp_path / "policy" / "model.pth", weights_only=True)
    for k, v in before.items():
        assert torch.equal(state["policy"][k], v)
    assert not torch.equal(state["policy"]["head.weight"], policy.head.weight)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert set(state["optimizer"]["state"]) == {0, 1, 2, 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_policy_is_captured_without_waiting_and_stores_the_pre_step_weights(
    tmp_path: Path,
) -> None:
    policy = Policy().cuda()
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    before = {k: v.cpu() for k, v in policy.state_dict().items()}
    logger = FileLogger(tmp_path, options=FAST)
    logger.save_policy(policy)
    policy(torch.ones(1, 4, device="cuda")).sum().backward()
    opt.step()
    assert logger.close(60)
    state = load_policy(tmp_path / "policy")
    for k, v in before.items():
        assert torch.equal(state[k], v)


def test_meta_json_records_class_step_save_to_dict_metadata_sizes_and_sha256(
    tmp_path: Path,
) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    logger.save_policy(Policy(), step=40, metadata={"reward": 9.5})
    assert logger.close(30)
    folder = tmp_path / "policy" / "step_40"
    meta = json.loads((folder / "meta.json").read_text())
    weights = (folder / "model.pth").read_bytes()
    assert meta["class"] == f"{Policy.__module__}.Policy"
    assert meta["step"] == 40 and meta["name"] == "policy"
    assert meta["save_to_dict"] == {"obs_dim": 4, "act_dim": 2}
    assert meta["metadata"] == {"reward": 9.5}
    assert meta["tensors"] == 4 and meta["bytes"] == (4 * 8 + 8 + 8 * 2 + 2) * 4
    assert meta["file_bytes"] == len(weights)
    assert meta["sha256"] == hashlib.sha256(weights).hexdigest()


def test_every_snapshot_is_kept_and_latest_names_the_newest(tmp_path: Path) -> None:
    policy = torch.nn.Linear(1, 1)
    logger = FileLogger(tmp_path, options=FAST)
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            policy.weight.fill_(value)
        logger.save_policy(policy)  # steps 0, 1, 2: the number of earlier saves
    assert logger.close(30)
    root = tmp_path / "policy"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0", "step_1", "step_2"]
    assert (root / "latest").read_text().strip() == "step_2"
    assert load_policy(root)["weight"].item() == 3.0
    assert load_policy(root / "step_0")["weight"].item() == 1.0
    assert load_policy(root / "step_1" / "model.pth")["weight"].item() == 2.0
    fresh = torch.nn.Linear(1, 1)
    load_policy(root, fresh)
    assert fresh.weight.item() == 3.0


def test_repeated_saves_of_the_same_shapes_reuse_their_host_buffers(tmp_path: Path) -> None:
    policy = Policy()
    logger = FileLogger(tmp_path, options=FAST)
    size = sum(v.numel() * v.element_size() for v in policy.state_dict().values())
    for _ in range(5):
        logger.save_policy(policy)
        assert logger.flush(30)  # written, so its buffers are back in the pool
    memory = logger._checkpoints
    assert memory.allocated_bytes == size
    assert memory.reused_bytes == 4 * size
    assert logger.close(30)


def test_a_closed_logger_keeps_no_host_buffers_for_reuse(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    logger.save_policy(Policy())
    logger.save_policy(Policy(), name="other")
    assert logger.close(30)
    memory = logger._checkpoints
    assert memory.take_buffers("policy") == [] and memory.take_buffers("other") == []


def test_a_module_on_the_meta_device_is_refused_at_the_call_with_why(tmp_path: Path) -> None:
    with torch.device("meta"):
        policy = torch.nn.Linear(2, 2)
    logger = FileLogger(tmp_path, options=FAST)
    with pytest.raises(TypeError, match="'policy' cannot be taken: it holds a tensor on the meta"):
        logger.save_policy(policy)
    assert logger.close(30)


def test_a_lazy_module_before_its_first_forward_is_refused_at_the_call_with_why(
    tmp_path: Path,
) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    with pytest.raises(TypeError, match="an uninitialized parameter or buffer"):
        logger.save_policy(torch.nn.LazyLinear(3))
    assert logger.close(30)


def test_tied_weights_are_copied_once_and_load_tied_as_torch_save_keeps_them(
    tmp_path: Path,
) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 100, bias=False))
    model[1].weight = model[0].weight  # an output layer tied to the embedding
    logger = FileLogger(tmp_path, options=FAST)
    logger.save_policy(model)
    assert logger.close(30)
    assert logger._checkpoints.allocated_bytes == 100 * 8 * 4  # one copy, not two
    meta = json.loads((tmp_path / "policy" / "step_0" / "meta.json").read_text())
    assert meta["bytes"] == 100 * 8 * 4
    state = load_policy(tmp_path / "policy" / "step_0")
    assert torch.equal(state["0.weight"], model[0].weight)
    assert state["0.weight"].untyped_storage().data_ptr() == \
        state["1.weight"].untyped_storage().data_ptr()


def test_a_changed_shape_allocates_only_the_changed_tensor(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    logger.save_policy({"a": torch.zeros(100), "b": torch.zeros(10)})
    assert logger.flush(30)
    logger.save_policy({"a": torch.zeros(100), "b": torch.zeros(20)})
    assert logger.close(30)
    memory = logger._checkpoints
    assert memory.reused_bytes == 400
    assert memory.allocated_bytes == 400 + 40 + 80


def test_an_object_that_is_not_weights_is_pickled_and_loads_only_unsafely(
    tmp_path: Path,
) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    logger.save_policy(Opaque(), name="explorer")
    assert logger.close(30)
    meta = json.loads((tmp_path / "explorer" / "meta.json").read_text())
    assert meta["pickled"] is True
    with pytest.raises(Exception, match="Weights only load failed"):
        load_policy(tmp_path / "explorer")
    assert load_policy(tmp_path / "explorer", weights_only=False).epsilon == 0.1


def test_load_policy_names_the_snapshots_when_no_latest_exists(tmp_path: Path) -> None:
    (tmp_path / "step_3").mkdir()
    torch.save({"w": torch.ones(1)}, tmp_path / "step_3" / "model.pth")
    with pytest.raises(FileNotFoundError, match="step_3"):
        load_policy(tmp_path)


class GatedFileSink(FileSink):
    """A file sink whose uploads wait until the test opens the gate."""

    def __init__(self, path: Path, gate: threading.Event) -> None:
        super().__init__(path)
        self.gate = gate

    def upload(self, artifact: Artifact) -> None:
        self.gate.wait(30)
        super().upload(artifact)


def full_checkpoint_memory(tmp_path: Path, gate: threading.Event, block_timeout_s: float
                           ) -> tuple[Logger, dict[str, torch.Tensor]]:
    """A logger with a 5,000-byte checkpoint memory bound, full: one 4,000-byte snapshot of
    the weights returned is written and its upload waits at ``gate``, a second one is pending
    behind it."""
    weights = {"w": torch.zeros(1000)}  # 4,000 bytes
    opts = Options(drain_interval_s=0.01, checkpoint_memory_bytes=5000,
                   block_timeout_s=block_timeout_s)
    logger = Logger(sinks=[GatedFileSink(tmp_path, gate)], options=opts)
    logger.save_policy(weights)
    deadline = time.monotonic() + 10
    while logger._checkpoints.pending_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    logger.save_policy(weights)
    return logger, weights


def test_at_the_memory_bound_save_policy_waits_then_raises_a_clear_timeout(
    tmp_path: Path,
) -> None:
    gate = threading.Event()
    logger, weights = full_checkpoint_memory(tmp_path, gate, block_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="checkpoint_memory_bytes"):
        logger.save_policy(weights)
    assert 0.4 < time.monotonic() - start < 2.0
    gate.set()
    assert logger.flush(30)
    logger.save_policy(weights)  # room again; the refused call used no step
    assert logger.close(30)
    assert sorted(p.name for p in (tmp_path / "policy").glob("step_*")) == [
        "step_0", "step_1", "step_2"]


def test_saves_from_two_threads_at_the_memory_bound_each_wait_at_most_block_timeout_s(
    tmp_path: Path,
) -> None:
    gate = threading.Event()
    logger, weights = full_checkpoint_memory(tmp_path, gate, block_timeout_s=2.0)
    ended: list[tuple[float, type]] = []

    def save(name: str) -> None:
        try:
            logger.save_policy(weights, name=name)
        except BaseException as exc:
            ended.append((time.monotonic() - start, type(exc)))

    start = time.monotonic()
    savers = [threading.Thread(target=save, args=(n,)) for n in ("a", "b")]
    try:
        for t in savers:
            t.start()
        for t in savers:
            t.join(10)
    finally:
        gate.set()
    assert [kind for _, kind in ended] == [TimeoutError, TimeoutError]
    assert max(elapsed for elapsed, _ in ended) < 3.0  # not 2 x block_timeout_s
    assert logger.close(30)


def test_a_save_waiting_at_the_memory_bound_raises_logger_closed_once_a_close_starts(
    tmp_path: Path,
) -> None:
    gate = threading.Event()
    logger, weights = full_checkpoint_memory(tmp_path, gate, block_timeout_s=30)
    raised: list[BaseException] = []

    def save() -> None:
        try:
            logger.save_policy(weights)
        except BaseException as exc:
            raised.append(exc)

    saver = threading.Thread(target=save)
    saver.start()
    time.sleep(0.3)  # the save waits for room
    closer = threading.Thread(target=logger.close, args=(30,))
    closer.start()
    try:
        saver.join(5)
        assert not saver.is_alive()  # while the uploads still hold the memory
    finally:
        gate.set()
        closer.join(30)
    assert [type(e) for e in raised] == [LoggerClosedError]


def test_the_supersede_policy_replaces_a_pending_snapshot_of_the_same_name(
    tmp_path: Path,
) -> None:
    gate = threading.Event()
    weights = torch.nn.Linear(10, 10)
    opts = Options(drain_interval_s=0.01, checkpoint_memory_bytes=1, checkpoint_policy="supersede")
    logger = Logger(sinks=[GatedFileSink(tmp_path, gate)], options=opts)
    logger.save_policy(weights)  # written, its upload held at the gate
    deadline = time.monotonic() + 10
    while logger._checkpoints.pending_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    logger.save_policy(weights)  # step 1: pending
    logger.save_policy(weights)  # step 2 supersedes step 1 at once
    assert logger.stats().superseded == 1
    gate.set()
    result = logger.close(30)
    assert not result and result.rejected == 1
    assert any("superseded" in loss.reason for loss in result.losses)
    assert sorted(p.name for p in (tmp_path / "policy").glob("step_*")) == ["step_0", "step_2"]


def test_save_policy_on_a_closed_logger_raises_and_holds_no_memory(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    logger.close(10)
    with pytest.raises(LoggerClosedError):
        logger.save_policy(torch.nn.Linear(2, 2))
    assert logger._checkpoints.pending_bytes == 0


def test_an_mlflow_run_keeps_each_snapshot_and_load_policy_reads_it_back(
    mlflow_server: MlflowServer,
) -> None:
    policy = torch.nn.Linear(3, 1)
    logger = MLFlowLogger("checkpoints", tracking_uri=mlflow_server.url, options=FAST)
    logger.save_policy(policy, step=7)
    assert logger.close(60)
    run_id = logger.run_id
    paths = {a["path"] for a in mlflow_server.artifacts(run_id or "", "policy/step_7")}
    assert paths == {"policy/step_7/model.pth", "policy/step_7/meta.json"}
    state = load_policy(f"runs:/{run_id}/policy/step_7", tracking_uri=mlflow_server.url)
    assert torch.equal(state["weight"], policy.weight)


@pytest.mark.parametrize("transport", ["http", "embedded"])
def test_registered_model_name_makes_each_snapshot_a_model_version_with_its_step(
    mlflow_server: MlflowServer, tmp_path: Path, transport: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a new sqlite store's artifact root is ./mlruns
    uri = mlflow_server.url if transport == "http" else f"sqlite:///{tmp_path / 'm.db'}"
    model = f"policy-{transport}-{time.monotonic_ns()}"
    policy = torch.nn.Linear(2, 1)
    before = policy.weight.detach().clone()
    logger = MLFlowLogger("registry", tracking_uri=uri, registered_model_name=model,
                          options=FAST)
    logger.save_policy(policy, step=10)
    with torch.no_grad():
        policy.weight.add_(1.0)
    logger.save_policy(policy, step=20)
    assert logger.close(120)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    versions = sorted(client.search_model_versions(f"name='{model}'"), key=lambda v: v.version)
    assert [v.tags["step"] for v in versions] == ["10", "20"]
    assert [v.run_id for v in versions] == [logger.run_id] * 2
    assert versions[1].source.endswith("/policy/step_20")
    state = load_policy(f"models:/{model}/2", tracking_uri=uri)
    assert torch.equal(state["weight"], policy.weight)
    first = load_policy(f"models:/{model}/1", tracking_uri=uri)
    assert torch.equal(first["weight"], before)


@pytest.mark.parametrize("transport", ["http", "embedded"])
def test_registering_a_snapshot_again_reuses_its_version_whatever_quotes_the_name_holds(
    mlflow_server: MlflowServer, tmp_path: Path, transport: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from steplog.sinks.mlflow.client import ClientTransport
    from steplog.sinks.mlflow.common import RunRef
    from steplog.sinks.mlflow.rest import RestTransport

    monkeypatch.chdir(tmp_path)
    uri = mlflow_server.url if transport == "http" else f"sqlite:///{tmp_path / 'm.db'}"
    model = f"it's the \"{transport}\" policy {time.monotonic_ns()}"
    logger = MLFlowLogger("registry", tracking_uri=uri, registered_model_name=model,
                          options=FAST)
    logger.save_policy(torch.nn.Linear(2, 1), step=10)
    assert logger.close(120)
    run = MlflowClient(uri).get_run(logger.run_id or "")
    ref = RunRef(run.info.run_id, run.info.experiment_id, run.info.artifact_uri)
    again = RestTransport(uri, 30.0) if transport == "http" else ClientTransport(uri)
    assert again.register_version(model, ref, "policy/step_10", {"step": "10"}) == "1"
    client = MlflowClient(uri)
    assert [str(v.version) for v in client.search_model_versions(f"run_id='{ref.run_id}'")] == ["1"]


def test_scalars_keep_flowing_while_a_200_mb_checkpoint_uploads(
    mlflow_server: MlflowServer,
) -> None:
    big = {"w": torch.randn(50_000_000)}  # 200 MB
    logger = MLFlowLogger("checkpoints-big", tracking_uri=mlflow_server.url, options=FAST)
    assert logger.flush(60)
    run_id = logger.run_id or ""
    logger.save_policy(big, name="big")
    # A scalar every ~20 ms until the checkpoint is stored (even a fast disk takes a few
    # tenths of a second for 200 MB), each one's arrival seen by polling the server.
    sent: dict[int, float] = {}
    arrived: dict[int, float] = {}
    stored = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (stored and len(arrived) >= len(sent)):
        if not stored:
            sent[len(sent)] = time.monotonic()
            logger.log_scalar("tick", float(len(sent) - 1), len(sent) - 1)
        for point in mlflow_server.metric_history(run_id, "tick"):
            arrived.setdefault(point["step"], time.monotonic())
        stored = stored or bool(mlflow_server.artifacts(run_id, "big/step_0"))
        time.sleep(0.02)
    assert logger.close(300)
    assert stored and len(sent) >= 2, "the upload finished before a scalar could be timed"
    assert sorted(arrived) == sorted(sent)
    lags = [arrived[k] - sent[k] for k in sent]
    assert max(lags) < 1.0, lags


def test_a_reused_buffer_holds_the_new_weights_not_the_previous_ones(tmp_path: Path) -> None:
    policy = torch.nn.Linear(1, 1)
    logger = FileLogger(tmp_path, options=FAST)
    for value in (1.0, 2.0):
        with torch.no_grad():
            policy.weight.fill_(value)
        logger.save_policy(policy)
        assert logger.flush(30)  # written: the next save reuses its buffers
    assert logger._checkpoints.reused_bytes > 0
    assert logger.close(30)
    assert load_policy(tmp_path / "policy" / "step_0")["weight"].item() == 1.0
    assert load_policy(tmp_path / "policy" / "step_1")["weight"].item() == 2.0


def test_supersede_drops_nothing_while_there_is_room(tmp_path: Path) -> None:
    gate = threading.Event()
    opts = Options(drain_interval_s=0.01, checkpoint_policy="supersede")  # 4 GiB bound
    logger = Logger(sinks=[GatedFileSink(tmp_path, gate)], options=opts)
    for _ in range(3):
        logger.save_policy(torch.nn.Linear(2, 2))
    gate.set()
    assert logger.close(30)
    assert logger.stats().superseded == 0
    assert sorted(p.name for p in (tmp_path / "policy").glob("step_*")) == [
        "step_0", "step_1", "step_2"]


def test_a_capture_that_fails_holds_no_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steplog import checkpoints

    copy = checkpoints._Copier.copy

    def out_of_memory_at_the_second_tensor(self: Any, t: Any) -> Any:
        if self.used:
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return copy(self, t)

    monkeypatch.setattr(checkpoints._Copier, "copy", out_of_memory_at_the_second_tensor)
    logger = FileLogger(tmp_path, options=FAST)
    with pytest.raises(RuntimeError, match="not enough memory"):
        logger.save_policy({"w": torch.ones(10), "m": torch.ones(10)})
    assert logger._checkpoints.pending_bytes == 0
    assert logger.close(30)


def test_a_snapshot_that_cannot_be_written_holds_no_memory(tmp_path: Path) -> None:
    import shutil

    logger = FileLogger(tmp_path, options=FAST)
    pipeline = logger._life.pipeline
    assert pipeline is not None
    shutil.rmtree(pipeline._staging)  # a tmp cleaner removed the staging directory
    logger.save_policy(torch.nn.Linear(2, 2))
    result = logger.flush(30)
    assert not result and result.rejected == 1
    assert logger._checkpoints.pending_bytes == 0
    logger.close(10)


def test_values_weights_only_cannot_load_make_the_snapshot_a_pickled_one(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    logger = FileLogger(tmp_path, options=FAST)
    logger.save_policy({"w": torch.ones(2), "best": np.float64(1.5)}, name="np")
    logger.save_policy({1.5: torch.ones(2)}, name="float-key")
    assert logger.close(30)
    for name in ("np", "float-key"):
        assert json.loads((tmp_path / name / "meta.json").read_text())["pickled"] is True
        load_policy(tmp_path / name, weights_only=False)


def test_a_snapshot_stored_late_does_not_move_latest_backwards(tmp_path: Path) -> None:
    policy = torch.nn.Linear(1, 1)
    logger = FileLogger(tmp_path, options=FAST)
    logger.save_policy(policy, step=5)
    logger.save_policy(policy, step=3)  # an older step arriving last (as steplog sync does)
    assert logger.close(30)
    assert (tmp_path / "policy" / "latest").read_text().strip() == "step_5"


def test_the_same_step_saved_twice_keeps_the_second_snapshot_whole(tmp_path: Path) -> None:
    policy = torch.nn.Linear(1, 1)
    logger = FileLogger(tmp_path, options=FAST)
    for value in (1.0, 2.0):
        with torch.no_grad():
            policy.weight.fill_(value)
        logger.save_policy(policy, step=7)
    assert logger.close(30)
    assert load_policy(tmp_path / "policy")["weight"].item() == 2.0
    assert load_policy(tmp_path / "policy" / "step_7")["weight"].item() == 2.0
    assert not list((tmp_path / "policy").glob(".*"))  # no temporary left behind


class Unpicklable:
    """Deep-copied at the call, but the worker cannot pickle it."""

    def __init__(self) -> None:
        self.f = lambda x: x


def test_a_snapshot_that_cannot_be_written_leaves_nothing_in_staging(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path / "run", options=FAST)
    pipeline = logger._life.pipeline
    assert pipeline is not None
    logger.save_agent(Unpicklable(), name="bad.pth")
    logger.save_policy({"w": torch.zeros(3), "f": Unpicklable()}, name="bad-policy")
    result = logger.flush(30)
    assert not result and result.rejected == 2
    assert list(Path(pipeline._staging).iterdir()) == []  # not only at close
    logger.close(10)


def test_every_sink_reports_why_a_snapshot_could_not_be_written(tmp_path: Path) -> None:
    logger = Logger(sinks=[FileSink(str(tmp_path / "a")), FileSink(str(tmp_path / "b"))],
                    options=FAST)
    logger.save_agent(Unpicklable(), name="bad.pth")
    result = logger.close(30)
    assert not result and len(result.losses) == 2
    assert all("pickle" in loss.reason for loss in result.losses), result.losses


def test_log_artifact_with_type_policy_stores_the_folder_as_given(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "weights.pt").write_bytes(b"w")
    logger = FileLogger(tmp_path / "run", options=FAST)
    logger.log_artifact(folder, name="my_policy", type="policy")
    assert logger.close(30)
    stored = tmp_path / "run" / "my_policy"
    assert sorted(p.name for p in stored.iterdir()) == ["weights.pt"]
    manifest = [json.loads(line) for line in (tmp_path / "run" / "artifacts.jsonl").open()]
    assert [(m["name"], m["kind"]) for m in manifest] == [("my_policy", "policy")]
