"""What a rank that does not log pays: the inert logger's ``log_*`` call side by side with a bare
no-op method call and with an open logger (rank 0).

The inert logger is what ``MLFlowLogger(...)`` builds on rank 1 of 4 under the default rank
policy (``"zero"``): ``RANK=1 WORLD_SIZE=4`` are set in this process before it is built, and
removed before the open loggers are built. Everything runs in this one process, in alternating
rounds, so machine noise hits every contender alike; the bare no-op is timed twice (its spread
against itself is the noise). Each round times ``CALLS`` calls; the figure is the median over
rounds (mean in brackets), in nanoseconds per call (``log_metrics``: a tenth of the calls, ten
keys each). The open FileLogger's worker sleeps through
the timed loop (the call's own cost, as in bench_hot_path.py), whose floor (``deque.append``
of a tuple) is timed too.

Then the worker's side of ``"all"``: the objects of a ``log-batch`` request built from a block of
1,000 scalars with and without the ``rank<R>/`` prefix (ns per scalar, same alternation).

    python benchmarks/bench_ranks.py [--rounds 15] [--calls 100000]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import steplog


class NoOp:
    """The floor for a logger that does nothing: a method that returns at once."""

    def log_scalar(self, name: str, value: float, iteration: int | None = None) -> None:
        return None

    def log_metrics(self, metrics: Any, iteration: int | None = None) -> None:
        return None


def per_call_ns(loop: Callable[[int], None], calls: int) -> float:
    start = time.perf_counter_ns()
    loop(calls)
    return (time.perf_counter_ns() - start) / calls


def scalar(logger: Any) -> Callable[[int], None]:
    def loop(n: int) -> None:
        log = logger.log_scalar
        for i in range(n):
            log("loss", 0.5, i)

    return loop


def metrics(logger: Any, values: dict[str, float]) -> Callable[[int], None]:
    def loop(n: int) -> None:
        log = logger.log_metrics
        for i in range(n):
            log(values, i)

    return loop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="steplog-bench-")
    for name in ("STEPLOG_RANKS", "LOCAL_RANK"):
        os.environ.pop(name, None)
    os.environ.update(RANK="1", WORLD_SIZE="4")
    built = time.perf_counter_ns()
    inert = steplog.MLFlowLogger("bench", tracking_uri="http://127.0.0.1:9")
    build_us = (time.perf_counter_ns() - built) / 1000
    assert inert.state is steplog.State.INERT
    del os.environ["RANK"], os.environ["WORLD_SIZE"]
    idle = steplog.FileLogger(f"{tmp}/idle", options=steplog.Options(drain_interval_s=3600))
    noop = NoOp()
    metrics10 = {f"m{k}": 0.5 for k in range(10)}

    dq: collections.deque[tuple[str, float, int]] = collections.deque()

    def floor(n: int) -> None:  # bench_hot_path.py's floor: what a queueing call cannot beat
        append = dq.append
        for i in range(n):
            append(("loss", 0.5, i))
        dq.clear()

    contenders: dict[str, Callable[[int], None]] = {
        "deque.append floor": floor,
        "bare no-op method": scalar(noop),
        "bare no-op method (again)": scalar(noop),
        "inert log_scalar (rank 1)": scalar(inert),
        "open log_scalar (rank 0)": scalar(idle),
        "bare no-op log_metrics(10)": metrics(noop, metrics10),
        "inert log_metrics(10)": metrics(inert, metrics10),
        "open log_metrics(10)": metrics(idle, metrics10),
    }
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, loop in contenders.items():
            # log_metrics rows: a tenth of the calls (ten records each)
            calls = args.calls // 10 if "metrics" in name else args.calls
            results[name].append(per_call_ns(loop, calls))
            idle.flush()
    closed = idle.close(300)

    base = statistics.median(results["bare no-op method"])
    print(f"{'contender':28} {'median ns/call':>15} {'(mean)':>10} {'x no-op':>9}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:28} {med:15.1f} {statistics.fmean(values):10.1f} {med / base:9.2f}")
    again = statistics.median(results["bare no-op method (again)"]) / base
    inert_ratio = statistics.median(results["inert log_scalar (rank 1)"]) / base
    open_ratio = statistics.median(results["open log_scalar (rank 0)"]) / statistics.median(
        results["inert log_scalar (rank 1)"])
    print(f"no-op vs itself: {again:.2f}x; inert log_scalar = {inert_ratio:.2f}x the bare "
          f"no-op; the open logger's call = {open_ratio:.2f}x the inert one")
    print(f"building the inert MLFlowLogger: {build_us:.0f} us (no sink, thread or connection)")
    print(f"open logger close: {bool(closed)} ({closed.delivered:,} records delivered)")
    worker_rename(args.rounds)


def worker_rename(rounds: int) -> None:
    """The worker's side under ``"all"``: building the objects of a ``log-batch`` request from
    a block of 1,000 scalars (20 names) with and without the ``rank<R>/`` prefix."""
    from steplog.records import Scalars, scalar_objects
    from steplog.sinks.mlflow.sink import _RankKeys

    block = [Scalars([(f"m{i % 20}", 0.5, i) for i in range(1000)], 1, True)]
    keys = _RankKeys("rank1/")
    contenders: dict[str, Callable[[], Any]] = {
        "names as logged": lambda: scalar_objects(block, key="key"),
        "names as logged (again)": lambda: scalar_objects(block, key="key"),
        "rank1/ prefix": lambda: scalar_objects(block, key="key", rename=keys.__getitem__),
    }
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, build in contenders.items():
            start = time.perf_counter_ns()
            for _ in range(100):
                build()
            results[name].append((time.perf_counter_ns() - start) / 100_000)
    base = statistics.median(results["names as logged"])
    print(f"{'worker: request objects':28} {'median ns/scalar':>15} {'x as logged':>12}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:28} {med:15.1f} {med / base:12.2f}")


if __name__ == "__main__":
    main()
