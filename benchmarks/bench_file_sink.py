"""End-to-end rate of the file sink: log N scalars, flush, everything on disk.

Side by side in one process: steplog's FileLogger with its worker thread writing
(``offload="never"``), with its writer process writing (``offload="always"``, timed once the
process answers), and with the journal; TensorBoard's SummaryWriter (add_scalar + flush), and a
hand-written synchronous JSON Lines writer (``json.dumps`` + ``write`` per call, the seed's way
of doing it without a queue). Reports scalars per second, median of rounds, and the CPU per
scalar of steplog's worker threads (and of the writer process).

    python benchmarks/bench_file_sink.py [--scalars 1000000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steplog import FileSink

WORKER_NS: dict[str | None, list[tuple[float, float]]] = {None: [], "flush": [], "none": [],
                                                          "writer": []}
"""Worker CPU per scalar of each steplog round, process CPU minus the main thread's: (user, system).
User time is Python and msgspec work, under the GIL the training loop needs; system time is the
kernel's (mostly the ``write`` of the lines), which runs without the GIL. Keyed by the journal's
durability (``None``: no journal). With ``"flush"`` (the default) the ``flush()`` that ends
each round fdatasyncs the journal, so the kernel's writeback of its pages is charged to the
worker; with ``"none"`` the OS writes them back later, in its own threads. ``"writer"``: no
journal, the writer process writing."""
WRITER_NS: list[float] = []
"""CPU per scalar (user + system) of the writer process, in the ``"writer"`` rounds."""


def wait_for_writer(sink: FileSink, timeout_s: float = 60.0) -> int:
    """The pid of ``sink``'s writer process, once the sink sends it the batches."""
    deadline = time.monotonic() + timeout_s
    while not sink._hosted:
        assert time.monotonic() < deadline, "the writer process did not start"
        time.sleep(0.01)
    assert sink.host is not None and sink.host.pid is not None
    return sink.host.pid


def steplog_rate(n: int, out: str, journal: str | None = None, writer: bool = False) -> float:
    import psutil

    import steplog

    options = steplog.Options(journal=journal is not None, runs_dir=f"{out}-runs",
                              journal_durability=journal or "flush")  # type: ignore[arg-type]
    logger = steplog.FileLogger(out, options=options, offload="always" if writer else "never")
    sink = logger._sinks[0]
    assert isinstance(sink, steplog.FileSink)
    if writer:
        host = psutil.Process(wait_for_writer(sink))
        host_cpu = host.cpu_times()
    log = logger.log_scalar
    cpu, main_cpu = os.times(), resource.getrusage(resource.RUSAGE_THREAD)
    start = time.perf_counter()
    for i in range(n):
        log("loss", 0.5, i)
    ok = logger.flush()
    elapsed = time.perf_counter() - start
    cpu_end, main_end = os.times(), resource.getrusage(resource.RUSAGE_THREAD)
    user = (cpu_end.user - cpu.user) - (main_end.ru_utime - main_cpu.ru_utime)
    system = (cpu_end.system - cpu.system) - (main_end.ru_stime - main_cpu.ru_stime)
    WORKER_NS["writer" if writer else journal].append((user * 1e9 / n, system * 1e9 / n))
    if writer:
        end_cpu = host.cpu_times()
        WRITER_NS.append((end_cpu.user - host_cpu.user + end_cpu.system - host_cpu.system)
                         * 1e9 / n)
    assert ok, ok
    logger.close(60)
    with open(os.path.join(out, "scalars.jsonl"), "rb") as f:
        lines = sum(1 for _ in f)
    assert lines == n, (lines, n)
    # Each round starts with the same amount of dirty page cache: the kernel slows down (and
    # charges system time to) writers once much of it is dirty.
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}-runs", ignore_errors=True)
    return n / elapsed


def json_lines_rate(n: int, out: str) -> float:
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(out, "scalars.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"name": "loss", "value": 0.5, "step": i,
                                "timestamp": time.time_ns() // 1_000_000}) + "\n")
        f.flush()
    return n / (time.perf_counter() - start)


def tensorboard_rate(n: int, out: str) -> float:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(out, max_queue=1000)
    start = time.perf_counter()
    for i in range(n):
        writer.add_scalar("loss", 0.5, i)
    writer.flush()
    elapsed = time.perf_counter() - start
    writer.close()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scalars", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="steplog-bench-")
    rates: dict[str, list[float]] = {"steplog FileLogger": [], "  writer process": [],
                                     "  + journal": [],
                                     "  + journal, durability none": [],
                                     "sync json.dumps lines": [],
                                     "TensorBoard SummaryWriter": []}
    for r in range(args.rounds):
        rates["steplog FileLogger"].append(steplog_rate(args.scalars, f"{tmp}/s{r}"))
        rates["  writer process"].append(steplog_rate(args.scalars, f"{tmp}/w{r}", writer=True))
        rates["  + journal"].append(steplog_rate(args.scalars, f"{tmp}/sj{r}", journal="flush"))
        rates["  + journal, durability none"].append(
            steplog_rate(args.scalars, f"{tmp}/sn{r}", journal="none"))
        rates["sync json.dumps lines"].append(json_lines_rate(args.scalars, f"{tmp}/j{r}"))
        tb_n = max(1, args.scalars // 10)
        rates["TensorBoard SummaryWriter"].append(tensorboard_rate(tb_n, f"{tmp}/t{r}"))
        for done in (f"{tmp}/j{r}", f"{tmp}/t{r}"):
            shutil.rmtree(done, ignore_errors=True)
    base = statistics.median(rates["steplog FileLogger"])
    print(f"{'writer':28} {'scalars/s (median)':>20} {'steplog is x faster':>20}")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"{name:28} {med:20,.0f} {base / med:20.2f}")
    labels = {None: "(drain, batch, encode, write)", "writer": "with the writer process",
              "flush": "with the journal", "none": "with the journal, durability none"}
    for journal, label in labels.items():
        runs = WORKER_NS[journal]
        total = statistics.median(u + s for u, s in runs)
        user = statistics.median(u for u, _ in runs)
        system = statistics.median(s for _, s in runs)
        print(f"steplog worker CPU per scalar {label}: {total:.0f} ns "
              f"(median; user {user:.0f} ns, system {system:.0f} ns)")
    print(f"the writer process's CPU per scalar (decode, encode, write): "
          f"{statistics.median(WRITER_NS):.0f} ns (median)")
    worker = statistics.median(u + s for u, s in WORKER_NS[None])
    for journal in ("flush", "none"):
        with_journal = statistics.median(u + s for u, s in WORKER_NS[journal])
        print(f"the journal ({journal}) adds {with_journal - worker:.0f} ns of worker CPU per "
              f"scalar (target <= 50 ns)")
    verdict = "meets" if base >= 3_000_000 else "MISSES"
    print(f"target: file sink >= 3,000,000 scalars/s end to end -> {base:,.0f}/s ({verdict})")
    for label, key in (("worker thread", None), ("writer process", "writer")):
        cpu = statistics.median(u + s for u, s in WORKER_NS[key])
        verdict = "meets" if cpu <= 150 else "MISSES"
        print(f"target: worker CPU <= 150 ns per scalar ({label}) -> {cpu:.0f} ns ({verdict})")


if __name__ == "__main__":
    main()
