"""The embedded MLflow store (``sqlite:///``): the sink host's fast path against MLflow's own
``log_batch``, side by side in one run.

Two measures, each contender in alternating rounds (fast path, then ``STEPLOG_MLFLOW_FAST_PATH=0``,
which sends every metric through ``MlflowClient.log_batch`` in the same host):

* **ingest, end to end**: an ``MLFlowLogger`` on a new store in a temporary folder; once its run
  is open (the host's start and MLflow's import are not timed), ``log_scalar`` over 10 keys, a
  step every 10 points, then ``close()``. The rate is points over the time from the first call
  to ``close()``'s return; afterwards MLflow must read every point back
  (``MlflowClient.get_metric_history``) and the latest value of each key. CPU: this process's,
  and the sink host's (sampled from ``/proc`` while it runs), per point.
* **``steplog sync``** (``replay_run``) of a journal a killed logger left (written as
  ``bench_sync.py`` writes it: 10 keys, 5,000 points per frame) into a new store: the host's
  start, every frame read, decoded and written, the run ended, the journal removed.

* **a write after a long history** (``--history N``): a run whose 10 keys already hold ``N``
  points each (inserted directly into the store), then writes of one new point per key, each
  through the sink host's object (``log_frame``), as a run logging a value per epoch does late
  in a long run: milliseconds per write, and the fast path's longest transaction.

The log_batch contender gets fewer points (``--slow-scalars``): at about 10,000 points/s it would
take minutes; rates are per second either way.

    python benchmarks/bench_sqlite_fast_path.py [--scalars 500000] [--slow-scalars 100000]
        [--sync-scalars 1000000] [--slow-sync-scalars 200000] [--rounds 2] [--skip-sync]
        [--history 300000] [--history-writes 5]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sync import make_frames, write_journal

DISABLE = "STEPLOG_MLFLOW_FAST_PATH"
NAMES = [f"train/m{k}" for k in range(10)]


def _cpu_of(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HostCpu:
    """The CPU time a process used since :meth:`start`, sampled every 20 ms until it exits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.first = _cpu_of(pid) or 0.0
        self.last = self.first
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            cpu = _cpu_of(self.pid)
            if cpu is None:
                return
            self.last = cpu
            time.sleep(0.02)

    def stop(self) -> float:
        self._done.set()
        self._thread.join(5)
        return self.last - self.first


def ingest(fast: bool, n: int) -> dict[str, float]:
    from mlflow import MlflowClient

    from steplog import MLFlowLogger

    with tempfile.TemporaryDirectory(prefix="steplog-bench-fast-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        logger = MLFlowLogger("bench-fast", tracking_uri=uri)
        if not logger.flush(120) or logger.run_id is None or logger.sink.host_pid is None:
            raise TimeoutError("the run was not opened in time")
        host = HostCpu(logger.sink.host_pid)
        log = logger.log_scalar
        steps = n // len(NAMES)
        start, cpu = time.perf_counter(), time.process_time()
        for step in range(steps):
            value = step * 0.5
            for name in NAMES:
                log(name, value, step)
        result = logger.close(900)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        host_cpu = host.stop()
        assert result and result.delivered == steps * len(NAMES), result
        info = logger.stats().sinks["mlflow"].info
        assert (info.get("metrics_path") == "sqlite fast path") == fast, info
        reader = MlflowClient(uri)
        assert len(reader.get_metric_history(logger.run_id, NAMES[3])) == steps
        assert reader.get_run(logger.run_id).data.metrics == {
            name: (steps - 1) * 0.5 for name in NAMES}
        points = steps * len(NAMES)
        return {"rate": points / elapsed, "cpu_us": cpu * 1e6 / points,
                "host_us": host_cpu * 1e6 / points}


def sync(fast: bool, n: int) -> float:
    from steplog.replay import replay_run

    with tempfile.TemporaryDirectory(prefix="steplog-bench-fast-") as tmp:
        db = Path(tmp) / "mlflow.db"
        run_dir = write_journal(Path(tmp) / "runs", f"sqlite:///{db}", "bench-sync",
                                make_frames(n, 5_000))
        start = time.perf_counter()
        (result,) = replay_run(run_dir, timeout_s=600)
        elapsed = time.perf_counter() - start
        assert result.error is None and result.records == n, result
        with sqlite3.connect(db) as conn:
            (stored,) = conn.execute("SELECT count(*) FROM metrics").fetchone()
        conn.close()
        assert stored == n, stored
        return n / elapsed


def late_writes(fast: bool, history: int, writes: int) -> tuple[list[float], float | None]:
    """Milliseconds of each write of one new point per key into a run already holding
    ``history`` points per key; the fast path's longest transaction (s), ``None`` for
    log_batch."""
    from steplog.frames import encode_batch
    from steplog.records import Batch, Scalars
    from steplog.sinks.mlflow.client import ClientTransport
    from steplog.sinks.mlflow.new_store import create_sqlite_store

    with tempfile.TemporaryDirectory(prefix="steplog-bench-fast-") as tmp:
        db = f"{tmp}/mlflow.db"
        create_sqlite_store(f"sqlite:///{db}")
        client = ClientTransport(f"sqlite:///{db}")
        run = client.create_run(client.experiment_id("bench-late"), "late", {}, 1_000).run_id
        assert (client.metrics_path(run) is None) == fast
        with sqlite3.connect(db) as conn:
            for name in NAMES:
                conn.executemany("INSERT INTO metrics VALUES (?, 0.1, ?, ?, ?, 0)",
                                 ((name, 10_000 + i, run, i) for i in range(history)))
                conn.execute("INSERT INTO latest_metrics VALUES (?, 0.1, ?, ?, 0, ?)",
                             (name, 10_000 + history - 1, history - 1, run))
        conn.close()
        times = []
        for w in range(writes):
            batch = Batch([Scalars([(name, 0.2, history + w) for name in NAMES],
                                   10_000 + history + w)])
            start = time.perf_counter()
            client.log_frame(run, encode_batch(batch), {}, {})
            times.append(1000 * (time.perf_counter() - start))
        fast_path = client._fast
        longest = getattr(fast_path, "longest_transaction_s", None) if fast else None
        with sqlite3.connect(db) as conn:
            latest = conn.execute("SELECT min(step), max(step) FROM latest_metrics "
                                  "WHERE run_uuid = ?", (run,)).fetchone()
        conn.close()
        assert latest == (history + writes - 1, history + writes - 1), latest
        return times, longest


def contender(fast: bool) -> None:
    if fast:
        os.environ.pop(DISABLE, None)
    else:
        os.environ[DISABLE] = "0"  # the sink host inherits it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scalars", type=int, default=500_000)
    parser.add_argument("--slow-scalars", type=int, default=100_000)
    parser.add_argument("--sync-scalars", type=int, default=1_000_000)
    parser.add_argument("--slow-sync-scalars", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-sync", action="store_true")
    parser.add_argument("--history", type=int, default=300_000,
                        help="points per key already stored before the late writes (0: skip)")
    parser.add_argument("--history-writes", type=int, default=5)
    args = parser.parse_args()
    runs_dir = tempfile.TemporaryDirectory(prefix="steplog-bench-runs-")
    os.environ["STEPLOG_RUNS_DIR"] = runs_dir.name  # the loggers' journals go there
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    runs: dict[str, list[dict[str, float]]] = {"fast path": [], "log_batch": []}
    for r in range(args.rounds):
        for fast in (True, False) if r % 2 == 0 else (False, True):
            contender(fast)
            out = ingest(fast, args.scalars if fast else args.slow_scalars)
            runs["fast path" if fast else "log_batch"].append(out)
            print(f"  round {r} {'fast path' if fast else 'log_batch'}: "
                  f"{out['rate']:,.0f} points/s, training process {out['cpu_us']:.2f} us/point, "
                  f"sink host {out['host_us']:.2f} us/point", flush=True)
    med = {k: {m: statistics.median(o[m] for o in v) for m in v[0]} for k, v in runs.items()}
    print("ingest into the embedded store, end to end (log -> close -> readable), medians:")
    for k, v in med.items():
        print(f"  {k:10s} {v['rate']:>10,.0f} points/s  training process {v['cpu_us']:.2f} "
              f"us/point  sink host {v['host_us']:.2f} us/point")
    ratio = med["fast path"]["rate"] / med["log_batch"]["rate"]
    print(f"  ratio fast path / log_batch: {ratio:.1f}x  (target >= 200,000 points/s)")

    if args.history:
        print(f"a write of one point per key after {args.history:,} points per key:")
        for fast in (True, False):
            contender(fast)
            times, longest = late_writes(fast, args.history, args.history_writes)
            extra = "" if longest is None else \
                f", longest transaction {1000 * longest:.0f} ms"
            print(f"  {'fast path' if fast else 'log_batch':10s} ms per write: "
                  f"{', '.join(f'{t:.0f}' for t in times)} (median "
                  f"{statistics.median(times):.1f}){extra}", flush=True)

    if args.skip_sync:
        return
    rates: dict[str, list[float]] = {"fast path": [], "log_batch": []}
    for r in range(args.rounds):
        for fast in (True, False) if r % 2 == 0 else (False, True):
            contender(fast)
            rate = sync(fast, args.sync_scalars if fast else args.slow_sync_scalars)
            rates["fast path" if fast else "log_batch"].append(rate)
            print(f"  round {r} sync {'fast path' if fast else 'log_batch'}: {rate:,.0f} "
                  "points/s", flush=True)
    print(f"steplog sync into a new sqlite store ({args.sync_scalars:,} points fast path, "
          f"{args.slow_sync_scalars:,} log_batch), medians:")
    for k, v in rates.items():
        print(f"  {k:10s} {statistics.median(v):>10,.0f} points/s")
    ratio = statistics.median(rates["fast path"]) / statistics.median(rates["log_batch"])
    print(f"  ratio: {ratio:.1f}x")


if __name__ == "__main__":
    main()
