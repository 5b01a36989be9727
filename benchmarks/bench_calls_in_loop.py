"""What the logging calls themselves cost inside a training step loop, side by side in one run.

``bench_hot_path.py`` times calls in a tight loop, where the interpreter's code and data stay in
the CPU's caches. In a training loop each step's logging runs right after a torch step has
filled those caches with its own work, so the first call after a step pays for bringing them
back. This benchmark runs the one-thread torch step of ``bench_step_loop.py`` and times, with
``perf_counter_ns`` around the logging of each step (the timer's own cost subtracted), ``K``
scalars logged after every step by:

* ``deque.append``: ``K`` appends of a ``(name, value, step)`` tuple to a deque that the loop
  empties now and then (no worker thread, no checks: the floor of any queue-based logger);
* ``checked function``: ``K`` calls of a plain function doing what a logging call must do at
  the least (a float check, a known-name lookup, a step check, a bounded append);
* ``log_scalar``: ``K`` calls of steplog's ``log_scalar`` on a live logger (its worker threads
  deliver every record: a file run, or the embedded MLflow store with ``--logger mlflow``);
* ``log_metrics``: one ``log_metrics`` of a ``K``-key dict built in the step, on that logger;
* ``SummaryWriter``: ``K`` calls of torch's ``SummaryWriter.add_scalar`` (TensorBoard).

Each contender logs for ``--phase`` seconds in turn, in rotating order, for ``--rounds``
rounds. It prints the median nanoseconds of one step's logging, per scalar, its multiple of
the floor, and its share of the median step time without logging (measured in the same rounds).

    python benchmarks/bench_calls_in_loop.py [--scalars 10] [--rounds 12] [--phase 0.5]
        [--logger file|mlflow]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step_loop import training_step

LogStep = Callable[[float, int], None]


def contenders(names: list[str], logger_kind: str, workdir: str) -> tuple[
        dict[str, LogStep | None], Callable[[], bool]]:
    """Each contender's logging of one step (``None``: no logging) and a function that closes
    the loggers and says whether every steplog record arrived."""
    from torch.utils.tensorboard import SummaryWriter

    import steplog

    floor_q: collections.deque[tuple[str, float, int]] = collections.deque()
    checked_q: collections.deque[tuple[str, float, int | None]] = collections.deque()
    known = set(names)
    cap = 1 << 30

    def floor(value: float, step: int) -> None:
        append = floor_q.append
        for name in names:
            append((name, value, step))
        if len(floor_q) > 100_000:
            floor_q.clear()

    def checked_call(name: str, value: float, step: int | None = None) -> None:
        if type(value) is not float:
            raise TypeError(f"{name}: not a float")
        if name not in known:
            raise ValueError(f"unknown name {name!r}")
        if step is not None and (type(step) is not int or step >> 63):
            raise ValueError(f"bad step {step!r}")
        if len(checked_q) >= cap:
            raise RuntimeError("full")
        checked_q.append((name, value, step))

    def checked(value: float, step: int) -> None:
        for name in names:
            checked_call(name, value, step)
        if len(checked_q) > 100_000:
            checked_q.clear()

    if logger_kind == "mlflow":
        logger: steplog.Logger = steplog.MLFlowLogger(
            "bench-calls", tracking_uri=f"sqlite:///{workdir}/m.db")
    else:
        logger = steplog.FileLogger(f"{workdir}/run")
    log_scalar = logger.log_scalar
    log_metrics = logger.log_metrics
    logged = 0

    def scalars(value: float, step: int) -> None:
        nonlocal logged
        for name in names:
            log_scalar(name, value, step)
        logged += len(names)

    def metrics(value: float, step: int) -> None:
        nonlocal logged
        log_metrics({name: value for name in names}, step)
        logged += len(names)

    writer = SummaryWriter(log_dir=f"{workdir}/tb")
    add_scalar = writer.add_scalar

    def tensorboard(value: float, step: int) -> None:
        for name in names:
            add_scalar(name, value, step)

    def end() -> bool:
        writer.close()
        result = logger.close(300)
        return bool(result) and result.delivered == logged

    return {"none": None, "deque.append": floor, "checked function": checked,
            "log_scalar": scalars, "log_metrics": metrics, "SummaryWriter": tensorboard}, end


def timer_cost() -> int:
    """The median cost of the two ``perf_counter_ns`` calls around a step's logging (ns)."""
    clock = time.perf_counter_ns
    return int(statistics.median(-(clock() - clock()) for _ in range(10_001)))


def run(scalars: int, rounds: int, phase: float, logger_kind: str) -> None:
    train = training_step()
    names = [f"train/m{k}" for k in range(scalars)]
    clock = time.perf_counter_ns
    with tempfile.TemporaryDirectory(prefix="steplog-bench-calls-") as workdir:
        steps, end = contenders(names, logger_kind, workdir)
        logging_ns: dict[str, list[int]] = {c: [] for c in steps}
        step_ns: list[int] = []
        order = list(steps)
        step = 0
        for r in range(rounds):
            for c in order[r % len(order):] + order[:r % len(order)]:
                log_step = steps[c]
                stop = clock() + int(phase * 1e9)
                while True:
                    t0 = clock()
                    if t0 >= stop:
                        break
                    value = train()
                    t1 = clock()
                    if log_step is not None:
                        log_step(value, step)
                        logging_ns[c].append(clock() - t1)
                    else:
                        step_ns.append(t1 - t0)
                    step += 1
        ok = end()
    overhead = timer_cost()
    step_median = statistics.median(step_ns)
    median = {c: max(0.0, statistics.median(v) - overhead) for c, v in logging_ns.items() if v}
    floor = median["deque.append"]
    print(f"\n{scalars} scalars per step after a torch step of {step_median / 1e3:.1f} us "
          f"(median without logging); logger: {logger_kind}; {rounds} rounds of {phase:g} s "
          f"per contender; timer cost {overhead} ns subtracted")
    print(f"{'contender':<20}{'ns per step':>14}{'ns per scalar':>16}{'x floor':>10}"
          f"{'% of the step':>16}")
    for c, ns in median.items():
        print(f"{c:<20}{ns:>14,.0f}{ns / scalars:>16,.0f}{ns / floor:>10.2f}"
              f"{100 * ns / step_median:>15.2f}%")
    print(f"steplog delivered every record: {'yes' if ok else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scalars", type=int, nargs="+", default=[10])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--phase", type=float, default=0.5)
    parser.add_argument("--logger", choices=("file", "mlflow"), default="file")
    args = parser.parse_args()
    for k in args.scalars:
        run(k, args.rounds, args.phase, args.logger)


if __name__ == "__main__":
    main()
