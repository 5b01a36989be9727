"""CPU of steplog's threads per Lightning fit into a real MLflow server, from building the logger
to ``finalize``: what the logger costs the training process beside its calls, including the
run's opening (which ``bench_lightning.py``'s in-loop figure leaves out).

Fits alternate in one process between two settings, so the machine's drift falls on both:

* ``plugins read once``: the installed MLflow plugins are looked up once per process (steplog's
  behaviour);
* ``plugins read per run``: the lookup is forgotten before each fit, so every run's opening
  scans every installed package's metadata again (steplog's behaviour before 2026-12-07).

It prints, per setting, the median over its fits of steplog's threads' CPU (ms), of the part
spent during the training loop, and of the fit's wall time. The server (sqlite, one worker) is
pinned to CPU 0 and this process to the others when there are two or more.

    python benchmarks/profile_lightning.py [--fits 12] [--epochs 2] [--steps 150]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch

import bench_lightning
import steplog.integrations.lightning as steplog_lightning
from bench_step_loop import thread_counters
from mlflow_support import MlflowServer, pin_beside_server
from steplog.sinks.mlflow.common import plugins

CONTENDER = "steplog -> MLflow"
SETTINGS = ("plugins read once", "plugins read per run")


def steplog_threads_cpu_ms() -> float:
    """CPU so far of this process's live threads named ``steplog-*`` (ms)."""
    return sum(cpu for name, (cpu, _) in thread_counters().items()
               if name.startswith("steplog-")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_lightning.quiet()
    seen: list[float] = []
    finalize = steplog_lightning.SteplogLogger.finalize

    def measured_finalize(self: Any, status: str) -> None:
        seen.append(steplog_threads_cpu_ms())  # before the close ends the threads
        finalize(self, status)

    steplog_lightning.SteplogLogger.finalize = measured_finalize  # type: ignore[method-assign]
    server_cpus, _ = pin_beside_server()
    server = MlflowServer(Path(tempfile.mkdtemp(prefix="steplog-profile-pl-")), cpus=server_cpus)
    server.start()
    root = Path(tempfile.mkdtemp(prefix="steplog-profile-pl-runs-"))
    figures: dict[str, list[tuple[float, float, float]]] = {s: [] for s in SETTINGS}
    try:
        bench_lightning.fit_once(CONTENDER, server.url, root, 1, args.steps // 4, 1)  # warm up
        for i in range(args.fits):
            setting = SETTINGS[i % 2]
            if setting == "plugins read per run":
                plugins.cache_clear()
            seen.clear()
            fit = bench_lightning.fit_once(CONTENDER, server.url, root, args.epochs, args.steps,
                                           1)
            figures[setting].append((seen[0], 1000 * fit.others, fit.wall))
    finally:
        server.stop()
    print(f"{CONTENDER}, {args.epochs} epochs x {args.steps} steps, {args.fits} fits "
          "alternating; medians over each setting's fits")
    print(f"{'setting':<24}{'steplog threads, ms/fit':>25}{'of it in the loop':>20}"
          f"{'fit, s':>9}")
    for setting, values in figures.items():
        cpu, loop, wall = (statistics.median(v[k] for v in values) for k in range(3))
        print(f"{setting:<24}{cpu:>25.1f}{loop:>20.1f}{wall:>9.2f}")


if __name__ == "__main__":
    main()
