"""Where the worker threads' CPU goes in a 10-scalar step loop: each thread's CPU per second
and per record, and the CPU spent inside each pipeline function, per call and per record.

The loop is ``bench_step_loop``'s torch step logging ``--scalars`` scalars per step through
``--logger`` (``mlflow``: the embedded store, ``file``: ``FileLogger``). After a warm-up, the
loop runs ``--seconds`` with every function below wrapped to add up its ``thread_time`` (the
calling thread's CPU, user and system), keyed by thread. Figures are inclusive (a function's
figure contains the functions it calls), and each wrapped call adds two clock reads, about a
microsecond, to its caller's figure. The training thread's voluntary context switches per
second are printed too (each is a wait, for the GIL or a lock).

    python benchmarks/profile_workers.py [--logger mlflow|file] [--seconds 20] [--scalars 10]
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

CPU: collections.defaultdict[tuple[int, str], list[float]] = collections.defaultdict(
    lambda: [0.0, 0])
"""(thread id, function) -> [CPU seconds, calls]."""


def timed(owner: Any, name: str) -> None:
    """Replace ``owner.name`` with a wrapper adding up its CPU per calling thread."""
    fn = getattr(owner, name, None)
    if fn is None:  # not in this version of steplog
        return
    label = f"{getattr(owner, '__name__', owner)}.{name}"

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            entry = CPU[(threading.get_ident(), label)]
            entry[0] += time.thread_time() - start
            entry[1] += 1

    setattr(owner, name, wrapper)


def instrument() -> None:
    from steplog import frames, host, journal, runlog
    from steplog.pipeline import drain, lane, runner
    from steplog.sinks import file
    from steplog.sinks.mlflow import sink

    for name in ("_process", "take_all", "_plain", "_dispatch"):
        timed(drain.Drain, name)
    for module, name in ((drain, "count_names"), (drain, "with_encoding"),
                         (runner, "call_with_retry"), (frames, "encode_batch")):
        timed(module, name)
    for cls, names in ((runlog.RunJournal, ("append", "progress")),
                       (journal.Journal, ("append", "ack")),
                       (lane.Lane, ("put", "_next_batch", "_acknowledge")),
                       (runner.SinkRunner, ("_deliver_metrics", "_write")),
                       (host.Host, ("call", "_running")),
                       (sink.MLflowSink, ("write",)), (file.FileSink, ("write",))):
        for name in names:
            timed(cls, name)
    starts: dict[int, float] = {}

    def collections_cpu(phase: str, info: dict[str, int]) -> None:
        ident = threading.get_ident()
        if phase == "start":
            starts[ident] = time.thread_time()
            return
        entry = CPU[(ident, f"gc generation {info['generation']}")]
        entry[0] += time.thread_time() - starts.pop(ident, time.thread_time())
        entry[1] += 1

    gc.callbacks.append(collections_cpu)


def thread_cpu() -> dict[str, float]:
    out = {}
    for t in threading.enumerate():
        if t.ident is not None:
            out[t.name] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
    return out


def voluntary_switches() -> int:
    status = Path(f"/proc/self/task/{threading.main_thread().native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("voluntary_ctxt_switches")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logger", choices=("mlflow", "file"), default="mlflow")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--scalars", type=int, default=10)
    args = parser.parse_args()

    import steplog
    from bench_step_loop import training_step

    instrument()
    train = training_step()
    workdir = tempfile.mkdtemp(prefix="steplog-profile-")
    logger: steplog.Logger
    if args.logger == "mlflow":
        logger = steplog.MLFlowLogger("profile", tracking_uri=f"sqlite:///{workdir}/m.db")
    else:
        logger = steplog.FileLogger(os.path.join(workdir, "run"))
    assert logger.flush(120), "the logger did not open"
    names = [f"train/m{k}" for k in range(args.scalars)]
    log_scalar: Callable[[str, float, int], None] = logger.log_scalar
    for step in range(2000):  # warm-up, logging
        value = train()
        for name in names:
            log_scalar(name, value, step)
    assert logger.flush(120)
    CPU.clear()
    before, switches = thread_cpu(), voluntary_switches()
    start = time.perf_counter()
    step = 2000
    while time.perf_counter() - start < args.seconds:
        value = train()
        for name in names:
            log_scalar(name, value, step)
        step += 1
    elapsed = time.perf_counter() - start
    after, switches = thread_cpu(), voluntary_switches() - switches
    records = (step - 2000) * len(names)
    labels = {t.ident: t.name for t in threading.enumerate()}
    rows = sorted(((labels.get(ident, str(ident)), label, cpu, calls)
                   for (ident, label), (cpu, calls) in CPU.items()), key=lambda r: r[:2])
    result = logger.close(120)
    print(f"{args.logger}: {records / elapsed:,.0f} records/s, a step of "
          f"{1000 * elapsed / (step - 2000):.3f} ms, delivered: {bool(result)}; training "
          f"thread: {switches / elapsed:.1f} voluntary switches/s")
    print(f"{'thread':26} {'CPU ms/s':>9} {'ns/record':>10}")
    for name in sorted(after):
        if name in before and (name == "MainThread" or name.startswith("steplog")):
            cpu = after[name] - before[name]
            print(f"{name:26} {1000 * cpu / elapsed:9.2f} {1e9 * cpu / records:10.0f}")
    print(f"\n{'thread':26} {'function':40} {'CPU ms/s':>9} {'calls/s':>8} {'us/call':>8} "
          f"{'ns/record':>10}")
    for thread, label, cpu, calls in rows:
        print(f"{thread:26} {label:40} {1000 * cpu / elapsed:9.2f} {calls / elapsed:8.1f} "
              f"{1e6 * cpu / max(calls, 1):8.1f} {1e9 * cpu / records:10.0f}")


if __name__ == "__main__":
    main()
