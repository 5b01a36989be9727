"""System metrics: a sampler that keeps sampling what it can, and never takes what is meant for
the training loop."""

from __future__ import annotations

import time
import types
import warnings
from pathlib import Path

import pytest

from steplog import MLFlowLogger, Options
from steplog.errors import JournalStoppedError
from steplog.system import SystemSampler

pytest.importorskip("psutil")


def nvml_of_a_mig_instance() -> types.ModuleType:
    """pynvml as it answers for one MIG instance (there is no NVIDIA GPU on the test machine):
    memory is reported, utilization is not supported."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class Memory:
        used, total = 1e9, 8e9

    def not_supported(handle: object) -> object:
        raise NVMLError("Not Supported")

    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 1  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = not_supported  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: Memory()  # type: ignore[attr-defined]
    return nvml


def sample_three_times(sampler: SystemSampler, samples: list[dict[str, float]]) -> None:
    """Run ``sampler`` until ``samples`` holds three of its samples (at most 10 s), then stop
    it."""
    sampler.start()
    deadline = time.monotonic() + 10
    while len(samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    sampler.stop(5)


def test_a_gpu_query_nvml_refuses_is_skipped_once_warned_and_the_rest_is_still_sampled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "pynvml", nvml_of_a_mig_instance())
    samples: list[dict[str, float]] = []
    sampler = SystemSampler(lambda values: samples.append(dict(values)), interval_s=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample_three_times(sampler, samples)
    assert len(samples) >= 3
    assert all(set(s) == {"system/cpu_utilization_percentage",
                          "system/system_memory_usage_megabytes",
                          "system/system_memory_usage_percentage",
                          "system/gpu_0_memory_usage_megabytes",
                          "system/gpu_0_memory_usage_percentage"} for s in samples)
    assert [str(w.message) for w in caught] == [
        "GPU 0 utilization is not sampled: NVML refused it (NVMLError('Not Supported'))"]


def test_with_warnings_turned_into_errors_a_refused_gpu_query_still_ends_no_sampling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "pynvml", nvml_of_a_mig_instance())
    samples: list[dict[str, float]] = []
    sampler = SystemSampler(lambda values: samples.append(dict(values)), interval_s=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_three_times(sampler, samples)
    assert len(samples) >= 3
    assert all("system/gpu_0_memory_usage_megabytes" in s for s in samples)


def test_the_sampler_leaves_a_journal_alarm_to_the_training_loop_and_goes_on(
    tmp_path: Path,
) -> None:
    logger = MLFlowLogger("sampler-alarm", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          log_system_metrics=True, system_metrics_interval_s=0.02,
                          options=Options(journal_max_bytes=64, runs_dir=str(tmp_path / "runs"),
                                          drain_interval_s=0.02))
    (sampler,) = [h for h in logger._life.helpers if isinstance(h, SystemSampler)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.log_scalar("loss", 1.0, 0)  # more than the journal's 64 bytes: it stops
        time.sleep(1.0)  # the sampler logs meanwhile
        with pytest.raises(JournalStoppedError):
            for i in range(1, 1000):
                logger.log_scalar("loss", 1.0, i)
                time.sleep(0.005)
        assert sampler._thread.is_alive()
        assert logger.close(60)
