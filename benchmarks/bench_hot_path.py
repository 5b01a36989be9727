"""Hot-path cost of a ``log_*`` call, side by side with the floor and TensorBoard.

Everything runs in this one process, in alternating rounds, so machine noise hits every
contender alike. The floor is ``collections.deque.append`` of a tuple in the same loop shape.
Two steplog FileLoggers are timed: one whose worker sleeps through the timed loop (the cost of
the call itself: what the targets are about), and one whose worker drains every 50 ms as usual
(the worker shares the GIL, so its per-record work shows up in the training thread's time too;
the end-to-end figure is in bench_file_sink.py). Each round times ``CALLS`` calls; the figure is
the median over rounds (mean in brackets), in nanoseconds per call.

    python benchmarks/bench_hot_path.py [--rounds 15] [--calls 100000]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from collections.abc import Callable

import steplog


def per_call_ns(loop: Callable[[int], None], calls: int) -> float:
    start = time.perf_counter_ns()
    loop(calls)
    return (time.perf_counter_ns() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="steplog-bench-")
    idle = steplog.FileLogger(f"{tmp}/idle", options=steplog.Options(drain_interval_s=3600))
    live = steplog.FileLogger(f"{tmp}/live")
    # The same, journaling every drained chunk first (as an MLflow logger does by default).
    journaled = steplog.FileLogger(f"{tmp}/journaled", options=steplog.Options(
        journal=True, runs_dir=f"{tmp}/runs"))
    dq: collections.deque[tuple[str, float, int]] = collections.deque()
    metrics10 = {f"m{k}": 0.5 for k in range(10)}

    def floor(n: int) -> None:
        append = dq.append
        for i in range(n):
            append(("loss", 0.5, i))
        dq.clear()

    def scalar(logger: steplog.Logger) -> Callable[[int], None]:
        def loop(n: int) -> None:
            log = logger.log_scalar
            for i in range(n):
                log("loss", 0.5, i)

        return loop

    def scalar_auto(logger: steplog.Logger) -> Callable[[int], None]:
        def loop(n: int) -> None:
            log = logger.log_scalar
            for _ in range(n):
                log("loss", 0.5)

        return loop

    def metrics(logger: steplog.Logger) -> Callable[[int], None]:
        def loop(n: int) -> None:
            log = logger.log_metrics
            for i in range(n):
                log(metrics10, i)

        return loop

    contenders: dict[str, Callable[[int], None]] = {
        "deque.append floor": floor,
        "log_scalar(name, v, i)": scalar(idle),
        "log_scalar(name, v)": scalar_auto(idle),
        "log_metrics(10 keys, i)": metrics(idle),
        "  live: log_scalar(n, v, i)": scalar(live),
        "  live: log_metrics(10, i)": metrics(live),
        "  live+journal: log_scalar": scalar(journaled),
    }
    writer = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(f"{tmp}/tensorboard")

        def tensorboard(n: int) -> None:
            add = writer.add_scalar  # type: ignore[union-attr]
            for i in range(n):
                add("loss", 0.5, i)

        contenders["TensorBoard add_scalar"] = tensorboard
    except ImportError:
        print("TensorBoard not installed: skipped")

    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, loop in contenders.items():
            calls = args.calls if "TensorBoard" not in name else max(1, args.calls // 20)
            results[name].append(per_call_ns(loop, calls))
            idle.flush()  # start every round with empty queues
            live.flush()
            journaled.flush()
    if writer is not None:
        writer.close()
    closed = [idle.close(60), live.close(60), journaled.close(60)]

    floor_ns = statistics.median(results["deque.append floor"])
    print(f"{'contender':28} {'median ns/call':>15} {'(mean)':>10} {'x floor':>9}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:28} {med:15.1f} {statistics.fmean(values):10.1f} {med / floor_ns:9.2f}")
    print(f"steplog close: {all(closed)} ({sum(c.delivered for c in closed):,} records delivered)")
    live = statistics.median(results["  live: log_scalar(n, v, i)"]) / floor_ns
    print(f"headline: log_scalar with the worker draining = {live:.2f}x the floor "
          f"({'meets' if live <= 2.0 else 'MISSES'} <= 2.0x)")
    targets = {
        "log_scalar(name, v, i)": 2.0,
        "log_scalar(name, v)": 2.0,
        "log_metrics(10 keys, i)": 5.0,
    }
    for name, limit in targets.items():
        ratio = statistics.median(results[name]) / floor_ns
        verdict = "meets" if ratio <= limit else "MISSES"
        print(f"target {name}: <= {limit}x floor -> {ratio:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
