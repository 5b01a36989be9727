"""Delivery and ``steplog sync`` into a PostgreSQL-backed ``mlflow server``: 1 worker vs several,
one ``log-batch`` request in flight per run vs several (``max_in_flight``), side by side.

One PostgreSQL server (the ``pgserver`` wheel's binaries, PostgreSQL's default durability: each
commit flushed to disk) holds one database per ``mlflow server``; the servers (``--workers 1`` and
``--workers N``) run at once, unpinned: PostgreSQL, the server workers and this process share the
machine's CPUs. Each round, in a rotating order, every contender runs against every server:

* delivery: an :class:`~steplog.loggers.MLFlowLogger` whose run is open logs ``--scalars``
  points (10 keys, a step every 10 points) as fast as the loop goes, then ``flush()``; the rate is
  points / (first log call to the flush's return);
* sync: ``replay_run`` of a journal of the same points (written before the timed part, as a
  logger whose sink never reached the server writes it, 1,000-record frames), the rate is
  points / the whole ``replay_run``.

The CPU time of the server's processes and of PostgreSQL's during each contender (user + system
time of each process tree) shows what a point costs the server side, which
the machine's cores bound whatever the client does.

Every run is checked afterwards: each key holds each of its points exactly once (and sync runs
are FINISHED). Rates are points per wall-clock second, medians of the rounds, with the spread
(max/min) of each contender's rounds.

    python benchmarks/bench_mlflow_server.py [--scalars 40000] [--workers 1,4]
        [--in-flight 1,4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sync import NAMES, check_points, make_frames, write_journal
from mlflow_support import MlflowServer
from postgres_support import PostgresServer, postgres_mlflow
from steplog.replay import replay_run
from steplog.sinks.mlflow.sink import IN_FLIGHT_ENV


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its descendants: the live
    ones' own, and the exited ones' as their parents' reaped-children times (PostgreSQL's
    backends leave the process group and come and go with connections, so the tree is
    followed)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def deliver_rate(server: MlflowServer, n: int, in_flight: int) -> float:
    from steplog.loggers import MLFlowLogger

    logger = MLFlowLogger(f"bench-pg-{uuid.uuid4().hex[:8]}", tracking_uri=server.url,
                          max_in_flight=in_flight)
    try:
        if not logger.flush(120) or logger.run_id is None:
            raise TimeoutError("the MLflow run was not created in time")
        log = logger.log_scalar
        keys = len(NAMES)
        start = time.perf_counter()
        for i in range(n):
            log(NAMES[i % keys], i * 0.5, i // keys)
        result = logger.flush(timeout=600)
        elapsed = time.perf_counter() - start
        assert result, result
        run_id = logger.run_id
    finally:
        logger.close(60)
    check_points(server, run_id, n)
    return n / elapsed


def sync_rate(server: MlflowServer, runs: Path, n: int, in_flight: int) -> float:
    experiment = f"bench-pg-sync-{uuid.uuid4().hex[:8]}"
    run_dir = write_journal(runs, server.url, experiment, make_frames(n, 1000))
    os.environ[IN_FLIGHT_ENV] = str(in_flight)
    try:
        start = time.perf_counter()
        (result,) = replay_run(run_dir, timeout_s=120)
        elapsed = time.perf_counter() - start
    finally:
        del os.environ[IN_FLIGHT_ENV]
    assert result.error is None and result.records == n, result
    exp = server.api("experiments/get-by-name", experiment_name=experiment)["experiment"]
    (run,) = server.api("runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert run["info"]["status"] == "FINISHED", run["info"]
    check_points(server, run["info"]["run_id"], n)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scalars", type=int, default=40_000)
    parser.add_argument("--workers", default="1,4", help="server workers, comma-separated")
    parser.add_argument("--in-flight", default="1,4", help="max_in_flight, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.scalars
    workers = [int(w) for w in args.workers.split(",")]
    flights = [int(k) for k in args.in_flight.split(",")]

    root = Path(tempfile.mkdtemp(prefix="steplog-bench-pg-"))
    os.environ.setdefault("STEPLOG_RUNS_DIR", str(root / "journals"))  # the loggers' journals
    postgres = PostgresServer(durable=True)
    servers: dict[int, MlflowServer] = {}
    try:
        postgres.start()
        for w in workers:
            (root / f"w{w}").mkdir()
            servers[w] = postgres_mlflow(postgres, root / f"w{w}", f"mlflow_w{w}", w)
            servers[w].start()
        contenders = [(w, what, k) for w in workers for what in ("deliver", "sync")
                      for k in flights]
        rates: dict[tuple[int, str, int], list[float]] = {c: [] for c in contenders}
        cpu: dict[tuple[int, str, int], list[tuple[float, float]]] = {c: [] for c in contenders}
        """(server, PostgreSQL) CPU ms per 1,000 points."""
        print(f"PostgreSQL {postgres.port}, servers {', '.join(f'{w} worker(s)' for w in workers)}"
              f"; {os.cpu_count()} CPUs; {n:,} points, 10 keys, {args.rounds} rounds")
        for r in range(args.rounds):
            shift = r % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                w, what, k = c
                groups = (servers[w].pgid, postgres.pgid)
                before = [tree_cpu_s(g) for g in groups]
                if what == "deliver":
                    rate = deliver_rate(servers[w], n, k)
                else:
                    rate = sync_rate(servers[w], root / "runs", n, k)
                used = [(tree_cpu_s(g) - b) * 1e6 / n for g, b in zip(groups, before,
                                                                        strict=True)]
                rates[c].append(rate)
                cpu[c].append((used[0], used[1]))
                print(f"  round {r + 1}: {w} worker(s) {what:7} in flight {k}: "
                      f"{rate:9,.0f} points/s; CPU ms per 1,000: server {used[0]:5.1f}, "
                      f"PostgreSQL {used[1]:5.1f}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)

    base = {(w, what): statistics.median(rates[(w, what, flights[0])])
            for w in workers for what in ("deliver", "sync")}
    first = workers[0]
    print(f"\n{'workers':>7} {'what':8} {'in flight':>9} {'points/s':>10} {'spread':>7} "
          f"{'vs K=' + str(flights[0]):>7} {'vs ' + str(first) + ' worker':>10} "
          f"{'server CPU':>10} {'PG CPU':>7}  (ms per 1,000 points)")
    for w, what, k in contenders:
        med = statistics.median(rates[(w, what, k)])
        spread = max(rates[(w, what, k)]) / min(rates[(w, what, k)])
        same_k_first = statistics.median(rates[(first, what, k)])
        server_cpu = statistics.median(u[0] for u in cpu[(w, what, k)])
        pg_cpu = statistics.median(u[1] for u in cpu[(w, what, k)])
        print(f"{w:7} {what:8} {k:9} {med:10,.0f} {spread:7.2f} {med / base[(w, what)]:7.2f} "
              f"{med / same_k_first:10.2f} {server_cpu:10.1f} {pg_cpu:7.1f}")


if __name__ == "__main__":
    main()
