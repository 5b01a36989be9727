"""System metrics: CPU, memory and (with pynvml and an NVIDIA driver) GPU, sampled on a timer
into the logger's own pipeline, under MLflow's ``system/...`` metric names."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from steplog.errors import LoggerClosedError
from steplog.retry import check_seconds

__all__ = ["SystemSampler", "sample_system"]


def _warn(message: str) -> None:
    """Warn from the sampler thread; with warnings turned into errors, the warning must not end
    the sampling (what it says is that something is not sampled)."""
    with contextlib.suppress(Exception):
        warnings.warn(message, stacklevel=3)


def _load_psutil() -> Any:
    try:
        import psutil
    except ImportError as exc:
        raise ImportError(
            "log_system_metrics=True needs psutil: pip install 'steplog[system]' (or psutil)"
        ) from exc
    return psutil


class _Gpus:
    """NVML handles, or none when pynvml or the driver is missing (reported once, when an
    NVIDIA driver is loaded). A query a device does not support (utilization on a MIG
    instance, say) or that fails is skipped, reported once per device and query."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self.handles: list[Any] = []
        self._failed: set[tuple[int, str]] = set()
        try:
            import pynvml
        except ImportError:
            if os.path.exists("/proc/driver/nvidia/version"):
                _warn("GPU metrics disabled: pynvml is not installed (pip install nvidia-ml-py)")
            return
        try:
            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                            for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception as exc:  # no driver, no device: CPU metrics only
            _warn(f"GPU metrics disabled: NVML is not usable ({exc})")

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        nvml = self._nvml
        if nvml is None:
            return out
        for i, h in enumerate(self.handles):
            util = self._query(i, "utilization", nvml.nvmlDeviceGetUtilizationRates, h)
            if util is not None:
                out[f"system/gpu_{i}_utilization_percentage"] = float(util.gpu)
            mem = self._query(i, "memory", nvml.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                out[f"system/gpu_{i}_memory_usage_megabytes"] = mem.used / 1e6
                out[f"system/gpu_{i}_memory_usage_percentage"] = (
                    100.0 * mem.used / max(1, mem.total))
        return out

    def _query(self, device: int, what: str, query: Callable[[Any], Any], handle: Any) -> Any:
        try:
            return query(handle)
        except Exception as exc:
            if (device, what) not in self._failed:
                self._failed.add((device, what))
                _warn(f"GPU {device} {what} is not sampled: NVML refused it ({exc!r})")
            return None

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None


def sample_system(psutil: Any, gpus: _Gpus | None = None) -> dict[str, float]:
    """One sample of the machine's CPU and memory use (and GPUs when given)."""
    vm = psutil.virtual_memory()
    values = {
        "system/cpu_utilization_percentage": float(psutil.cpu_percent(interval=None)),
        "system/system_memory_usage_megabytes": (vm.total - vm.available) / 1e6,
        "system/system_memory_usage_percentage": float(vm.percent),
    }
    if gpus is not None:
        values.update(gpus.sample())
    return values


class SystemSampler:
    """Calls ``log(metrics)`` with a system sample every ``interval_s`` seconds on a daemon
    thread, until :meth:`stop`; the first sample is taken one interval after :meth:`start`."""

    def __init__(self, log: Callable[[Mapping[str, float]], None], interval_s: float = 10.0
                 ) -> None:
        check_seconds(interval_s, "system_metrics_interval_s", allow_zero=False)
        self._psutil = _load_psutil()
        self._log = log
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steplog-system", daemon=True)
        self._gpus: _Gpus | None = None

    def start(self) -> None:
        self._psutil.cpu_percent(interval=None)  # primes the CPU counter
        self._thread.start()

    def _run(self) -> None:
        try:
            self._gpus = _Gpus()
            while not self._stop.wait(self.interval_s):
                try:
                    self._log(sample_system(self._psutil, self._gpus))
                except LoggerClosedError:  # the logger is closing: sampling ends with it
                    return
                except Exception as exc:  # a sensor error ends sampling
                    _warn(f"system metrics stopped: {exc!r}")
                    return
        finally:
            if self._gpus is not None:
                self._gpus.close()

    def stop(self, timeout_s: float) -> None:
        """Stop sampling; returns once the thread ended or ``timeout_s`` passed."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
