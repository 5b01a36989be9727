"""Integrations, each against what its users run today, side by side in one process.

One function per integration (``bench_<name>(args, server)``), each printing its own table;
``SECTIONS`` lists them and ``--only`` picks some. Every contender runs once per round, in the
same order, and each figure is the median over the rounds; a ratio is a contender's median over
the no-logging baseline's, and the baseline is run twice per round so that its ratio to itself
(the spread of the machine) is printed beside the others.

* ``sb3``: Stable-Baselines3 PPO on CartPole-v1 (one env, ``n_steps=128`` unless
  ``--sb3-n-steps`` says otherwise, ``batch_size=64``, ``n_epochs=4``, seeded, one torch
  thread): ``model.learn()`` time with no output format; steplog's writer into an MLflow server
  (``SteplogOutputFormat(MLFlowLogger(...))``), with the default drain interval and with
  ``Options(drain_interval_s=0.5)``; steplog's writer into a local file run
  (``FileLogger``, as SB3's own formats write local files); SB3's own ``stdout`` + ``csv``
  formats (stdout to ``/dev/null``) and its ``tensorboard`` format; and SB3's documented
  MLflow recipe (an ``MLflowOutputFormat`` calling ``mlflow.log_metric`` per key,
  https://stable-baselines3.readthedocs.io/en/master/guide/integrations.html#mlflow) against
  the same server. SB3 dumps about 15 keys per rollout. Besides the ratios, each output's own
  cost is measured directly: the time the training thread spends inside its ``write()`` and,
  for steplog, the CPU its worker threads use during ``learn()`` (a figure a busy machine
  disturbs far less than a wall-clock ratio). Targets: steplog within 2% of no logging, and
  faster than every alternative.
* ``summary_writer``: ``add_scalar`` in a loop, steplog's ``SummaryWriter`` against torch's,
  each writing its own files: the loop's time per call, and the loop plus ``close()``.

The MLflow server (sqlite, one worker) is pinned to the first CPU and this process to the
others when there are two or more.

    python benchmarks/bench_integrations.py [--rounds 5] [--sb3-steps 4096] [--sb3-n-steps 128]
        [--sb3-contenders none steplog sb3 recipe] [--scalars 50000]
        [--only sb3 summary_writer]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from stable_baselines3.common.logger import KVWriter

from mlflow_support import MlflowServer, pin_beside_server

Contender = Callable[[], "tuple[float, float]"]
"""Runs one measured task and returns its (wall-clock, process CPU) seconds; setup and teardown
are not counted. Process CPU includes every thread of this process (steplog's worker, torch's
writer thread), so it is what logging costs the training process, whoever else uses the
machine."""


def rounds_of(contenders: dict[str, Contender], rounds: int) -> dict[str, list[tuple[float,
                                                                                     float]]]:
    """(wall, CPU) seconds of every contender in every round, each round running all of them in
    order."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name, run in contenders.items():
            times[name].append(run())
        line = ", ".join(f"{name} {t[-1][0]:.2f}" for name, t in times.items())
        print(f"  round {r + 1}/{rounds}: {line}", flush=True)
    return times


def print_ratios(times: dict[str, list[tuple[float, float]]], baselines: tuple[str, ...]) -> None:
    """Per contender: median wall and CPU seconds, and the median and range over the rounds of
    its ratio to the mean of the same round's ``baselines`` runs (paired within a round, so a
    machine that slows down for a while moves both sides)."""
    print(f"\n{'contender':50} {'wall s':>7} {'ratio':>6} {'range':>12}   {'CPU s':>7} "
          f"{'ratio':>6} {'range':>12}")
    for name, t in times.items():
        cols = []
        for k in (0, 1):
            base = [statistics.fmean(times[b][r][k] for b in baselines)
                    for r in range(len(t))]
            ratios = [x[k] / y for x, y in zip(t, base, strict=True)]
            cols.append(f"{statistics.median(x[k] for x in t):7.3f} "
                        f"{statistics.median(ratios):6.3f} "
                        f"{min(ratios):5.3f}-{max(ratios):5.3f}")
        print(f"{name:50} {cols[0]}   {cols[1]}")


def timed(run: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def steplog_threads_cpu() -> float:
    """CPU seconds used so far by this process's steplog threads (drain, sink lanes)."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith("steplog") and thread.ident is not None:
            with contextlib.suppress(OSError, ProcessLookupError):
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return total


# -- Stable-Baselines3 ------------------------------------------------------------------------

def _ppo(steps: int, formats: list[Any], costs: dict[str, list[tuple[float, float]]],
         name: str, folder: str | None = None, n_steps: int = 128) -> tuple[float, float]:
    """Seconds of ``learn(steps)`` with an SB3 logger made of ``formats``; appends to
    ``costs[name]`` the (wall, CPU) seconds the training thread spent inside their writes."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import Logger as SB3Logger

    torch.set_num_threads(1)
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=n_steps, batch_size=64, n_epochs=4, seed=1,
                device="cpu", verbose=0)
    timers = [_Timed(f) for f in formats]
    model.set_logger(SB3Logger(folder=folder, output_formats=timers))
    seconds = timed(lambda: model.learn(steps))
    costs.setdefault(name, []).append((sum(t.wall for t in timers), sum(t.cpu for t in timers)))
    return seconds


class _Timed(KVWriter):
    """An SB3 output format timing the one it wraps (on the training thread)."""

    def __init__(self, inner: KVWriter) -> None:
        self.inner = inner
        self.wall = self.cpu = 0.0

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any],
              step: int = 0) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            self.inner.write(key_values, key_excluded, step)
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.thread_time() - cpu

    def close(self) -> None:
        self.inner.close()


def _mlflow_recipe_format() -> Any:
    """SB3's documented MLflow output format, as its docs give it."""
    import mlflow
    import numpy as np
    from stable_baselines3.common.logger import KVWriter

    class MLflowOutputFormat(KVWriter):
        def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any],
                  step: int = 0) -> None:
            for (key, value), (_, excluded) in zip(
                sorted(key_values.items()), sorted(key_excluded.items()), strict=True
            ):
                if excluded is not None and "mlflow" in excluded:
                    continue
                if isinstance(value, np.ScalarType) and not isinstance(value, str):
                    mlflow.log_metric(key, value, step)

        def close(self) -> None:
            pass

    return MLflowOutputFormat()


def bench_sb3(args: argparse.Namespace, server: MlflowServer) -> None:
    import mlflow
    from stable_baselines3.common.logger import HumanOutputFormat, make_output_format

    from steplog import FileLogger, Logger, MLFlowLogger, Options
    from steplog.integrations.sb3 import SteplogOutputFormat

    steps = args.sb3_steps
    ppo = functools.partial(_ppo, n_steps=args.sb3_n_steps)
    costs: dict[str, list[tuple[float, float]]] = {}
    workers: dict[str, list[float]] = {}
    closes: list[float] = []
    folder = Path(tempfile.mkdtemp(prefix="steplog-bench-sb3-"))

    def none(name: str) -> Contender:
        return lambda: ppo(steps, [], costs, name)

    def steplog_mlflow(name: str, options: Options | None) -> Contender:
        def make() -> Logger:
            logger = MLFlowLogger(f"bench-sb3-{uuid.uuid4().hex[:8]}", tracking_uri=server.url,
                                  options=options)
            if not logger.flush(60) or logger.run_id is None:
                raise TimeoutError("the MLflow run was not created in time")
            return logger
        return steplog_writer(name, make)

    def steplog_writer(name: str, make: Callable[[], Logger]) -> Contender:
        def run() -> tuple[float, float]:
            logger = make()
            before = steplog_threads_cpu()
            seconds = ppo(steps, [SteplogOutputFormat(logger)], costs, name)
            workers.setdefault(name, []).append(steplog_threads_cpu() - before)
            start = time.perf_counter()
            result = logger.close(120)
            closes.append(time.perf_counter() - start)
            assert result, result
            return seconds
        return run

    def stdout_csv() -> tuple[float, float]:
        run = str(folder / uuid.uuid4().hex)
        with open(os.devnull, "w") as devnull:
            formats = [HumanOutputFormat(devnull), make_output_format("csv", run)]
            return ppo(steps, formats, costs, "SB3 stdout + csv", run)

    def tensorboard() -> tuple[float, float]:
        run = str(folder / uuid.uuid4().hex)
        return ppo(steps, [make_output_format("tensorboard", run)], costs, "SB3 tensorboard",
                    run)

    def mlflow_recipe() -> tuple[float, float]:
        mlflow.set_tracking_uri(server.url)
        mlflow.set_experiment(f"bench-sb3-recipe-{uuid.uuid4().hex[:8]}")
        with mlflow.start_run():
            return ppo(steps, [_mlflow_recipe_format()], costs, RECIPE)

    STEPLOG = "steplog writer -> MLflow server"
    SLOW_DRAIN = "steplog writer -> MLflow, drain_interval_s=0.5"
    RECIPE = "SB3's MLflow recipe (mlflow.log_metric per key)"
    LOCAL = "steplog writer -> local files"
    print(f"\n## Stable-Baselines3: PPO on CartPole-v1, n_steps={args.sb3_n_steps}, "
          f"learn({steps}), {args.rounds} rounds")
    ppo(1024, [], {}, "warm-up")  # imports, env, torch
    contenders = {
        "no logging": none("no logging"),
        STEPLOG: steplog_mlflow(STEPLOG, None),
        "no logging, again": none("no logging, again"),
        SLOW_DRAIN: steplog_mlflow(SLOW_DRAIN, Options(drain_interval_s=0.5)),
        LOCAL: steplog_writer(LOCAL, lambda: FileLogger(str(folder / uuid.uuid4().hex))),
        "SB3 stdout + csv": stdout_csv,
        "SB3 tensorboard": tensorboard,
        RECIPE: mlflow_recipe,
    }
    keep = {"none": ("no logging", "no logging, again"), "steplog": (STEPLOG, SLOW_DRAIN, LOCAL),
            "sb3": ("SB3 stdout + csv", "SB3 tensorboard"), "recipe": (RECIPE,)}
    chosen = {name for group in {"none", *args.sb3_contenders} for name in keep[group]}
    times = rounds_of({k: v for k, v in contenders.items() if k in chosen}, args.rounds)
    print_ratios(times, ("no logging", "no logging, again"))
    spread = [b[0] / a[0] for a, b in zip(times["no logging"], times["no logging, again"],
                                          strict=True)]
    print(f"\nthe baseline against itself (second / first, wall): median "
          f"{statistics.median(spread):.3f}, range {min(spread):.3f}-{max(spread):.3f}")

    bare_cpu = statistics.median(c for name in ("no logging", "no logging, again")
                                 for _, c in times[name])
    print("\nwhat each output costs the training process, per learn() (medians; a share of the "
          f"no-logging learn()'s {bare_cpu:.3f} s of CPU):")
    print(f"{'output':50} {'in write(), wall ms':>20} {'CPU ms':>8} {'share':>7}")
    for name, c in costs.items():
        if name.startswith("no logging"):
            continue
        wall = statistics.median(w for w, _ in c)
        cpu = statistics.median(u for _, u in c)
        print(f"{name:50} {wall * 1e3:20.1f} {cpu * 1e3:8.1f} {cpu / bare_cpu:7.2%}")
    for name, used in workers.items():
        worker = statistics.median(used)
        own = statistics.median(u for _, u in costs[name]) + worker
        print(f"{name}: worker threads {worker * 1e3:.1f} ms of CPU during learn(); with "
              f"write(): {own * 1e3:.1f} ms = {own / bare_cpu:.2%} of learn()'s CPU")
    print(f"steplog close() after learn(): median {statistics.median(closes) * 1e3:.1f} ms")


# -- TensorBoard's SummaryWriter ------------------------------------------------------------

def bench_summary_writer(args: argparse.Namespace, server: MlflowServer) -> None:
    from torch.utils.tensorboard import SummaryWriter as TorchWriter

    import steplog

    n = args.scalars
    folder = Path(tempfile.mkdtemp(prefix="steplog-bench-writer-"))
    totals: dict[str, list[tuple[float, float]]] = {}

    def loop(make: Callable[[str], Any], name: str) -> Contender:
        def run() -> tuple[float, float]:
            writer = make(str(folder / uuid.uuid4().hex))
            add = writer.add_scalar

            def calls() -> None:
                for i in range(n):
                    add("charts/episodic_return", 0.5 * i, i)

            looped = timed(calls)
            closed = timed(writer.close)
            totals.setdefault(name, []).append((looped[0] + closed[0], looped[1] + closed[1]))
            return looped
        return run

    print(f"\n## SummaryWriter: {n:,} add_scalar calls, then close(), {args.rounds} rounds")
    names = ("torch SummaryWriter", "torch SummaryWriter, again",
             "steplog SummaryWriter (file run)")
    makers = (TorchWriter, TorchWriter, steplog.SummaryWriter)
    times = rounds_of({name: loop(make, name) for name, make in zip(names, makers,
                                                                     strict=True)}, args.rounds)
    baselines = names[:2]
    print("\nthe add_scalar loop alone:")
    print_ratios(times, baselines)
    for name, t in times.items():
        print(f"  {name}: {statistics.median(w for w, _ in t) / n * 1e9:,.0f} ns per add_scalar")
    print("\nthe loop and close() (every value written):")
    print_ratios(totals, baselines)


SECTIONS: dict[str, Callable[[argparse.Namespace, MlflowServer], None]] = {
    "sb3": bench_sb3,
    "summary_writer": bench_summary_writer,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sb3-steps", type=int, default=4096)
    parser.add_argument("--sb3-n-steps", type=int, default=128,
                        help="PPO's rollout length: SB3 dumps once per rollout")
    parser.add_argument("--sb3-contenders", nargs="+", default=["none", "steplog", "sb3", "recipe"],
                        choices=["none", "steplog", "sb3", "recipe"],
                        help="which SB3 contenders run (the no-logging baseline always does)")
    parser.add_argument("--scalars", type=int, default=50_000)
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    os.environ.setdefault("STEPLOG_RUNS_DIR", tempfile.mkdtemp(prefix="steplog-bench-runs-"))

    server_cpus, client_cpus = pin_beside_server()
    server = MlflowServer(Path(tempfile.mkdtemp(prefix="steplog-bench-mlflow-")), cpus=server_cpus)
    server.start()
    try:
        print(f"server {server.url} on CPUs {server_cpus or 'any'}, client on {client_cpus}")
        for name in args.only:
            SECTIONS[name](args, server)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
