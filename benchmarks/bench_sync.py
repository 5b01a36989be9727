"""``steplog sync`` (``replay_run``) against a raw ``log_batch(1000)`` loop, into one real server.

One ``mlflow server`` (sqlite, one worker) is pinned to CPU 0 and this process to CPU 1 when the
machine has two or more CPUs, as in ``bench_mlflow.py``. Each round, in a rotating order:

* ``MlflowClient.log_batch`` loop: the raw sequential baseline, 1000 metrics per call into a new
  run, ``Metric`` entities built per call as a user would, the same points as the journal holds;
* ``replay_run`` of a journal of the same points, once per frame size: the journal is written
  before the timed part with :class:`~steplog.runlog.RunJournal`, exactly as a logger whose
  MLflow sink never reached the server writes it (one frame per drained chunk, encoded by
  :mod:`steplog.frames`), and ``run.json`` names the server; the timed part is the whole
  ``replay_run``: the run found or created, every frame read, decoded and written, the cursor
  advanced, the run ended and the delivered journal removed.

Every contender's run is checked afterwards: it holds each point exactly once and is FINISHED.
Rates are points per wall-clock second, medians of the rounds; the ratio is sync / raw (target
>= 1.0). Client CPU: this process's CPU time (all threads) per 1,000 points, medians.

    python benchmarks/bench_sync.py [--scalars 200000] [--frames 100,5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mlflow_support import MlflowServer, pin_beside_server
from steplog.records import Scalars
from steplog.replay import replay_run
from steplog.runlog import RunJournal
from steplog.sinks.mlflow import MLflowSink

NAMES = ["loss/train", "loss/value", "reward/mean", "reward/std", "entropy", "kl", "lr",
         "grad_norm", "episode_length", "fps"]

Frame = tuple[int, list[tuple[str, float, int]]]
"""(timestamp in ms, rows): one drained chunk."""


def make_frames(scalars: int, per_frame: int) -> list[Frame]:
    """``scalars`` points, 10 keys, a step every 10 points, one timestamp per frame."""
    rng = random.Random(0)
    base = int(time.time() * 1000) - 3_600_000
    frames: list[Frame] = []
    for start in range(0, scalars, per_frame):
        rows = [(NAMES[i % len(NAMES)], rng.random(), i // len(NAMES))
                for i in range(start, min(scalars, start + per_frame))]
        frames.append((base + start // per_frame, rows))
    return frames


def write_journal(runs: Path, url: str, experiment: str, frames: list[Frame]) -> Path:
    """A run directory whose journal holds ``frames`` for an MLflow sink that never stored any."""
    run_dir = runs / uuid.uuid4().hex[:12]
    sink = MLflowSink(experiment, tracking_uri=url)
    journal = RunJournal(run_dir, [("mlflow", sink)])
    for ts, rows in frames:
        journal.append([Scalars(rows, ts, True)], len(rows))
    journal.write_manifest("FINISHED")
    assert journal.finish(), "the journal should be kept for the sync"
    return run_dir


Measure = tuple[float, float]
"""(points per second, client CPU seconds per 1,000 points)."""


def sync_rate(server: MlflowServer, runs: Path, frames: list[Frame], n: int) -> Measure:
    experiment = f"bench-sync-{uuid.uuid4().hex[:8]}"
    run_dir = write_journal(runs, server.url, experiment, frames)
    start, cpu = time.perf_counter(), time.process_time()
    (result,) = replay_run(run_dir, timeout_s=120)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert result.error is None and result.records == n, result
    assert not run_dir.exists(), "a delivered journal is removed"
    exp = server.api("experiments/get-by-name", experiment_name=experiment)["experiment"]
    (run,) = server.api("runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert run["info"]["status"] == "FINISHED", run["info"]
    check_points(server, run["info"]["run_id"], n)
    return n / elapsed, cpu * 1000 / n


def raw_rate(server: MlflowServer, frames: list[Frame], n: int) -> Measure:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(server.url)
    exp = client.create_experiment(f"bench-raw-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(exp).info.run_id
    points = [(name, value, step, ts) for ts, rows in frames for name, value, step in rows]
    start, cpu = time.perf_counter(), time.process_time()
    for base in range(0, n, 1000):
        batch = [Metric(name, value, ts, step)
                 for name, value, step, ts in points[base:base + 1000]]
        client.log_batch(run_id, metrics=batch, synchronous=True)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    with contextlib.redirect_stdout(io.StringIO()):  # mlflow prints "View run at"
        client.set_terminated(run_id)
    check_points(server, run_id, n)
    return n / elapsed, cpu * 1000 / n


def check_points(server: MlflowServer, run_id: str, n: int) -> None:
    stored = sum(len(server.metric_history(run_id, name)) for name in NAMES)
    assert stored == n, f"run {run_id} holds {stored} points, expected {n}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scalars", type=int, default=200_000)
    parser.add_argument("--frames", default="100,5000",
                        help="records per journal frame, comma-separated (one contender each)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.frames.split(",")]
    n = args.scalars

    server_cpus, client_cpus = pin_beside_server()
    root = Path(tempfile.mkdtemp(prefix="steplog-bench-sync-"))
    server = MlflowServer(root / "server", cpus=server_cpus)
    (root / "server").mkdir()
    server.start()
    frames = {size: make_frames(n, size) for size in sizes}
    names: list[str | int] = ["raw", *sizes]
    labels = {name: "MlflowClient.log_batch(1000) loop" if name == "raw"
              else f"steplog sync (replay_run), {name:,}-record frames" for name in names}
    measures: dict[str | int, list[Measure]] = {name: [] for name in names}
    try:
        print(f"server {server.url} on CPUs {server_cpus or 'any'}, client on {client_cpus}; "
              f"{n:,} points, {args.rounds} rounds")
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                if name == "raw":
                    m = raw_rate(server, frames[sizes[0]], n)
                else:
                    m = sync_rate(server, root / "runs", frames[int(name)], n)
                measures[name].append(m)
                print(f"  round {r + 1}: {labels[name]:48} {m[0]:10,.0f} points/s, "
                      f"{m[1] * 1e3:6.1f} ms CPU per 1,000", flush=True)
    finally:
        server.stop()
    rate = {name: statistics.median(m[0] for m in ms) for name, ms in measures.items()}
    cpu = {name: statistics.median(m[1] for m in ms) for name, ms in measures.items()}
    print(f"\n{'contender (medians)':48} {'points/s':>10} {'vs raw':>7} {'CPU ms/1k':>10}")
    for name in names:
        print(f"{labels[name]:48} {rate[name]:10,.0f} {rate[name] / rate['raw']:7.2f} "
              f"{cpu[name] * 1e3:10.1f}")
    worst = min(rate[s] for s in sizes) / rate["raw"]
    print(f"\nsync / raw log_batch: {worst:.2f}x at worst (target >= 1.0)")

if __name__ == "__main__":
    main()
