"""CUDA capture: values and weights on a GPU are captured at the call without waiting for the
device, and what is stored is what the tensors held at the call's place in the stream.

``torch.cuda._sleep`` keeps the GPU busy for a known number of cycles, so "the call did not
wait" is a fact to check (the stream is still busy when the call returns), not a timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from steplog import FileLogger, Options, load_policy  # noqa: E402

FAST = Options(drain_interval_s=0.01)
BUSY_CYCLES = 2_000_000_000
"""About a second of a GPU's clock: far longer than any call under test."""


def scalars(path: Path) -> list[tuple[str, float, int]]:
    lines = (path / "scalars.jsonl").read_text().splitlines()
    return [(r["name"], r["value"], r["step"]) for r in map(json.loads, lines)]


def busy_stream() -> None:
    """Queue a kernel that keeps the current stream busy for about a second. A test launches
    each of its own kernels once before this: CUDA loads a kernel's module at its first launch,
    which waits for the device."""
    torch.cuda._sleep(BUSY_CYCLES)


def test_log_scalar_of_a_cuda_tensor_returns_while_the_gpu_is_still_busy(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    t = torch.zeros((), device="cuda")
    t.add_(1.0).zero_()
    busy_stream()
    t.add_(3.0)  # runs after the busy kernel
    logger.log_scalar("x", t, 0)
    assert not torch.cuda.current_stream().query()  # the call did not synchronise
    assert logger.close(60)
    assert scalars(tmp_path) == [("x", 3.0, 0)]


def test_a_cuda_value_is_the_tensor_at_the_call_not_after_later_kernels(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    t = torch.zeros((), device="cuda")
    busy_stream()
    t.add_(3.0)
    logger.log_scalar("x", t, 0)
    t.add_(5.0)  # queued after the call: must not reach the logged value
    logger.log_scalar("x", t, 1)
    t.zero_()
    assert logger.close(60)
    assert scalars(tmp_path) == [("x", 3.0, 0), ("x", 8.0, 1)]


def test_a_value_logged_on_a_side_stream_follows_that_streams_work(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        t = torch.zeros((), device="cuda")
        busy_stream()
        t.fill_(7.0)
        logger.log_scalar("side", t, 0)
        assert not side.query()
    assert logger.close(60)
    assert scalars(tmp_path) == [("side", 7.0, 0)]


def test_log_metrics_of_cuda_tensors_logs_every_value_without_waiting(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    loss = torch.full((), 0.125, device="cuda").mul_(2.0)
    # torch.tensor(data, device="cuda") copies from pageable memory, which waits for the GPU:
    # made before the busy kernel.
    half = torch.tensor(1.5, dtype=torch.bfloat16, device="cuda")
    done = torch.tensor(7, device="cuda")
    busy_stream()
    loss.mul_(2.0)
    logger.log_metrics({"loss": loss, "lr": 1e-3, "grad": torch.ones(1, 1, device="cuda"),
                        "half": half, "done": done}, 4)
    assert not torch.cuda.current_stream().query()
    assert logger.close(60)
    assert scalars(tmp_path) == [("loss", 0.5, 4), ("lr", 1e-3, 4), ("grad", 1.0, 4),
                                 ("half", 1.5, 4), ("done", 7.0, 4)]


def test_many_cuda_scalars_arrive_in_order_with_their_values(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    t = torch.zeros((), device="cuda")
    for i in range(5_000):
        t.add_(1.0)
        logger.log_scalar("count", t, i)
    assert logger.close(60)
    assert scalars(tmp_path) == [("count", float(i + 1), i) for i in range(5_000)]


class Policy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_save_policy_of_a_cuda_policy_returns_while_the_gpu_is_still_busy(tmp_path: Path
                                                                           ) -> None:
    policy = Policy().cuda()
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    logger = FileLogger(tmp_path, options=FAST)
    busy_stream()
    with torch.no_grad():
        policy.head.bias.fill_(2.0)  # queued behind the busy kernel: part of the snapshot
    expected = {k: v.cpu() for k, v in policy.state_dict().items()}  # waits for the GPU
    busy_stream()
    logger.save_policy(policy)
    assert not torch.cuda.current_stream().query()
    policy(torch.ones(8, 64, device="cuda")).sum().backward()
    opt.step()  # the next update, queued after the call
    assert logger.close(60)
    state = load_policy(tmp_path / "policy")
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert torch.equal(state["head.bias"], torch.full((4,), 2.0))
    assert not torch.equal(state["head.weight"], policy.head.weight.cpu())


def test_a_cuda_snapshot_and_its_optimizer_state_are_saved_together(tmp_path: Path) -> None:
    policy = Policy().cuda()
    opt = torch.optim.Adam(policy.parameters())
    policy(torch.ones(8, 64, device="cuda")).sum().backward()
    opt.step()
    # A copy of each (.cpu() of the CPU "step" tensor would return that tensor itself).
    expected = {k: v.to("cpu", copy=True) for k, v in opt.state_dict()["state"][0].items()}
    logger = FileLogger(tmp_path, options=FAST)
    logger.save_agent({"policy": policy, "optimizer": opt})
    opt.step()
    assert logger.close(60)
    state = torch.load(tmp_path / "agent.pth", weights_only=True)
    assert all(torch.equal(state["optimizer"]["state"][0][k], v) for k, v in expected.items())
    assert state["policy"]["head.weight"].device.type == "cpu"


def test_repeated_cuda_snapshots_reuse_their_pinned_host_buffers(tmp_path: Path) -> None:
    policy = Policy().cuda()
    size = sum(v.numel() * v.element_size() for v in policy.state_dict().values())
    logger = FileLogger(tmp_path, options=FAST)
    for _ in range(4):
        logger.save_policy(policy)
        assert logger.flush(60)
    memory = logger._checkpoints
    assert memory.allocated_bytes == size
    assert memory.reused_bytes == 3 * size
    assert logger.close(60)


def test_system_metrics_include_the_gpu(tmp_path: Path) -> None:
    pytest.importorskip("pynvml")
    pytest.importorskip("psutil")
    import psutil

    from steplog.system import _Gpus, sample_system

    gpus = _Gpus()
    try:
        sample = sample_system(psutil, gpus)
    finally:
        gpus.close()
    assert sample["system/gpu_0_memory_usage_megabytes"] > 0
    assert 0 <= sample["system/gpu_0_utilization_percentage"] <= 100


def test_the_pinned_slots_of_values_already_read_are_reused(tmp_path: Path) -> None:
    from steplog.capture import _SLOTS

    t = torch.ones((), device="cuda")
    key = (t.device, t.dtype)
    for run in range(2):
        logger = FileLogger(tmp_path / str(run), options=FAST)
        for i in range(3_000):
            logger.log_scalar("x", t, i)
        assert logger.close(60)
        assert len(_SLOTS._free[key]) == _SLOTS.allocated[key]  # every slot came back
    assert _SLOTS.allocated[key] < 6_000  # and slots were reused


def test_a_value_copied_on_the_device_is_read_without_waiting_for_later_gpu_work(
    tmp_path: Path,
) -> None:
    from steplog.capture import _SLOTS

    t = torch.full((), 4.0, device="cuda").add_(0.0)
    key = (t.device, t.dtype)
    held = _SLOTS._free.pop(key, [])  # no free pinned slot: the capture copies on the device
    try:
        logger = FileLogger(tmp_path, options=FAST)
        logger.log_scalar("x", t, 0)
        busy_stream()  # training work queued after the call
        assert logger.flush(0.5)  # read (on a side stream) long before that work ends
        assert not torch.cuda.current_stream().query()
        assert logger.close(60)
    finally:
        _SLOTS._free.setdefault(key, []).extend(held)
    assert scalars(tmp_path) == [("x", 4.0, 0)]
