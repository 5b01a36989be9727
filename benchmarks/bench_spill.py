"""The training loop while its MLflow server is down: ``"spill"`` against ``"block"``.

Each contender runs in a fresh child process (so its memory figure is its own): an
``MLFlowLogger`` whose tracking URI is a loopback port nobody listens on (connection refused,
retried while the logger is open) logs N scalars in a tight loop, as a training loop would. Side
by side: the ``deque.append`` floor (the same loop appending the tuples to a deque that
nothing drains), the ``"spill"`` policy (the default), and ``"block"`` with a queue and lane
large enough to hold every record in memory (what a queue without a journal must do to keep the
loop going).
Reports the loop's ns per call, its ratio to the floor, the process's resident memory growth
during the loop, and the records held only in the journal at the end. The children close
their loggers with ``timeout=0`` (the records stay in the journal for ``steplog sync``; nothing
is delivered: the server never comes).

    python benchmarks/bench_spill.py [--scalars 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent("""
    import collections, json, sys, time
    n, policy, uri, runs = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    import steplog
    names = [f"metric/{i}" for i in range(10)]
    logger = None
    if policy != "floor":
        big = n + 1
        options = (steplog.Options(runs_dir=runs, lane_capacity=20_000, queue_size=200_000)
                   if policy == "spill" else
                   steplog.Options(runs_dir=runs, full_policy="block", lane_capacity=big,
                                   queue_size=big))
        import warnings
        warnings.simplefilter("ignore")
        logger = steplog.MLFlowLogger("bench-spill", tracking_uri=uri, options=options)
        log = logger.log_scalar
    base = rss()
    peak = 0
    start = time.perf_counter()
    if logger is None:  # the floor: the same loop appending the tuple to a deque
        append = collections.deque().append
        for i in range(n):
            append((names[i % 10], 0.5, i // 10))
            if i % 100_000 == 0:
                peak = max(peak, rss() - base)
    else:
        for i in range(n):
            log(names[i % 10], 0.5, i // 10)
            if i % 100_000 == 0:
                peak = max(peak, rss() - base)
    elapsed = time.perf_counter() - start
    time.sleep(0.5)  # the worker takes what the loop left in the queue
    peak = max(peak, rss() - base)
    spilled = logger.stats().spilled if logger else 0
    print(json.dumps({"ns": elapsed * 1e9 / n, "rss": peak, "spilled": spilled}))
    sys.stdout.flush()
    if logger is not None:
        logger.close(timeout=0)
""")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(n: int, policy: str, uri: str, runs: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), policy, uri, runs],
                         capture_output=True, text=True, timeout=600, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scalars", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    uri = f"http://127.0.0.1:{closed_port()}"
    contenders = ["floor", "spill", "block"]
    results: dict[str, list[dict[str, float]]] = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for c in contenders:
                results[c].append(run(args.scalars, c, uri, os.path.join(tmp, f"{c}-{r}")))
    floor = statistics.median(x["ns"] for x in results["floor"])
    print(f"{args.scalars:,} scalars, server down, medians of {args.rounds} rounds")
    print(f"{'contender':<34}{'ns/call':>9}{'x floor':>9}{'RSS growth MB':>15}"
          f"{'spilled':>11}")
    labels = {"floor": "deque.append floor",
              "spill": 'MLFlowLogger, "spill" (default)',
              "block": 'MLFlowLogger, "block", all in memory'}
    for c in contenders:
        ns = statistics.median(x["ns"] for x in results[c])
        mb = statistics.median(x["rss"] for x in results[c]) / 2**20
        spilled = statistics.median(x["spilled"] for x in results[c])
        print(f"{labels[c]:<34}{ns:>9.1f}{ns / floor:>9.2f}{mb:>15.1f}{spilled:>11,.0f}")


if __name__ == "__main__":
    main()
