"""steplog's MLflow sink against a real local ``mlflow server``, side by side in one run.

The server (sqlite, one worker) is pinned to CPU 0 and this process to CPU 1 when the machine
has two or more CPUs, so the server's own work is not counted against the client. Contenders,
all against the same server:

* ``MlflowClient.log_batch`` loop: the raw sequential baseline, 1000 metrics per call, entities
  built per call as a user would;
* steplog ``MLFlowLogger``: ``log_scalar`` N times in a tight loop, then ``flush()``; the rate is
  N over the time from the first call to the flush's return;
* ``mlflow.log_metric(..., synchronous=False)``: MLflow's own async mode, then
  ``flush_async_logging()``;
* ``mlflow.log_metric`` synchronous, one call per scalar: the seed's design.

Then the step-loop overhead: a training loop of real torch forward/backward steps (about 1-2 ms,
one thread) logging 5 scalars per step, with the MLflow sink against the same loop without
logging, in alternating rounds (median). Targets (issue 3): delivery >= 1.0x the raw loop;
step-loop overhead <= 3%; flush after 100k scalars <= 1.2x (100k / raw rate).

    python benchmarks/bench_mlflow.py [--scalars 100000] [--steps 1500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mlflow_support import MlflowServer, pin_beside_server


def wait_open(logger: Any, timeout_s: float = 60.0) -> None:
    """Return once the logger's worker created the run (opening is not part of any figure)."""
    if not logger.flush(timeout_s) or logger.run_id is None:
        raise TimeoutError("the MLflow run was not created in time")


def raw_log_batch_rate(url: str, n: int) -> float:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(url)
    exp = client.create_experiment(f"bench-raw-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(exp).info.run_id
    start = time.perf_counter()
    for base in range(0, n, 1000):
        ts = int(time.time() * 1000)
        batch = [Metric("loss", 0.5 * i, ts, i) for i in range(base, min(n, base + 1000))]
        client.log_batch(run_id, metrics=batch, synchronous=True)
    elapsed = time.perf_counter() - start
    client.set_terminated(run_id)
    return n / elapsed


def steplog_rate(url: str, n: int) -> tuple[float, float]:
    """(scalars per second end to end, seconds from flush() call to its return)."""
    from steplog.loggers import MLFlowLogger

    logger = MLFlowLogger(f"bench-steplog-{uuid.uuid4().hex[:8]}", tracking_uri=url)
    wait_open(logger)
    log = logger.log_scalar
    start = time.perf_counter()
    for i in range(n):
        log("loss", 0.5 * i, i)
    flush_start = time.perf_counter()
    result = logger.flush(timeout=600)
    end = time.perf_counter()
    assert result, result
    logger.close(60)
    return n / (end - start), end - flush_start


def mlflow_async_rate(url: str, n: int) -> float:
    import mlflow

    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(f"bench-async-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run():
        start = time.perf_counter()
        for i in range(n):
            mlflow.log_metric("loss", 0.5 * i, step=i, synchronous=False)
        mlflow.flush_async_logging()
        elapsed = time.perf_counter() - start
    return n / elapsed


def mlflow_sync_rate(url: str, n: int) -> float:
    import mlflow

    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(f"bench-sync-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run():
        start = time.perf_counter()
        for i in range(n):
            mlflow.log_metric("loss", 0.5 * i, step=i)
        elapsed = time.perf_counter() - start
    return n / elapsed


def step_loop(steps: int, logger: Any) -> float:
    """Seconds for ``steps`` training steps (forward, backward, SGD) logging 5 scalars each."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 768), torch.nn.ReLU(), torch.nn.Linear(768, 256)
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 256), torch.randn(64, 256)
    start = time.perf_counter()
    for step in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if logger is not None:
            v = loss.item()
            logger.log_metrics(
                {"loss": v, "lr": 1e-3, "grad": v * 0.5, "reward": -v, "entropy": 1.0}, step
            )
    return time.perf_counter() - start


def step_overhead(url: str, steps: int, rounds: int) -> tuple[float, float, float]:
    """(median seconds per step without logging, with logging, overhead fraction)."""
    import torch

    from steplog.loggers import MLFlowLogger

    torch.set_num_threads(1)
    step_loop(200, None)  # warm up
    bare: list[float] = []
    logged: list[float] = []
    for _ in range(rounds):
        bare.append(step_loop(steps, None))
        logger = MLFlowLogger(f"bench-loop-{uuid.uuid4().hex[:8]}", tracking_uri=url)
        wait_open(logger)
        logged.append(step_loop(steps, logger))
        assert logger.close(120)
    b, w = statistics.median(bare), statistics.median(logged)
    return b / steps, w / steps, w / b - 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scalars", type=int, default=100_000)
    parser.add_argument("--async-scalars", type=int, default=3_000)
    parser.add_argument("--sync-scalars", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    server_cpus, client_cpus = pin_beside_server()
    server = MlflowServer(Path(tempfile.mkdtemp(prefix="steplog-bench-mlflow-")), cpus=server_cpus)
    server.start()
    try:
        print(f"server {server.url} on CPUs {server_cpus or 'any'}, client on {client_cpus}")
        raw = statistics.median(raw_log_batch_rate(server.url, args.scalars) for _ in range(3))
        runs = [steplog_rate(server.url, args.scalars) for _ in range(3)]
        ours = statistics.median(r for r, _ in runs)
        flush_s = statistics.median(f for _, f in runs)
        async_rate = mlflow_async_rate(server.url, args.async_scalars)
        sync_rate = mlflow_sync_rate(server.url, args.sync_scalars)

        print(f"\n{'delivery (one key)':44} {'scalars/s':>12} {'vs raw':>8}")
        for name, rate in (
            (f"MlflowClient.log_batch(1000) loop, {args.scalars:,}", raw),
            (f"steplog MLFlowLogger + flush, {args.scalars:,}", ours),
            (f"mlflow.log_metric(synchronous=False), {args.async_scalars:,}", async_rate),
            (f"mlflow.log_metric synchronous, {args.sync_scalars:,}", sync_rate),
        ):
            print(f"{name:44} {rate:12,.0f} {rate / raw:8.2f}")
        bound = 1.2 * args.scalars / raw
        print(f"\nsteplog delivery / raw log_batch: {ours / raw:.2f}x (target >= 1.0)")
        print(
            f"flush() after {args.scalars:,} scalars: {flush_s:.2f} s "
            f"(target <= 1.2 x {args.scalars:,} / raw rate = {bound:.2f} s)"
        )

        bare, logged, overhead = step_overhead(server.url, args.steps, args.rounds)
        print(
            f"\nstep loop ({args.steps} steps x {args.rounds} rounds, 5 scalars/step): "
            f"{bare * 1e3:.3f} ms/step bare, {logged * 1e3:.3f} ms/step with MLflow sink: "
            f"overhead {overhead * 100:+.1f}% (target <= 3%)"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
