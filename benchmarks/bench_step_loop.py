"""What logging costs a real training step loop, second by second, side by side in one run.

Each contender runs in a fresh Python process (so start-up costs such as imports count, as in
a real job): a one-thread torch step loop (an MLP forward and backward plus an SGD step, about
0.5 ms) for ``--seconds`` seconds, logging ``K`` scalars per step, against:

* ``none``: the same loop without logging (the baseline);
* ``file``: ``FileLogger`` (its default ``offload="auto"``: a writer process takes the encoding
  once batches of 10,000 scalars keep coming);
* ``file-thread``: ``FileLogger(offload="never")``: the worker thread always encodes and writes;
* ``mlflow-embedded``: ``MLFlowLogger`` on the embedded default store (``sqlite:///``), which
  runs MLflow's client in steplog's sink host process (metric points by its sqlite fast path);
* ``mlflow-embedded-log-batch``: the same with ``STEPLOG_MLFLOW_FAST_PATH=0`` (every metric
  through MLflow's ``log_batch`` in the host);
* ``mlflow-http``: ``MLFlowLogger`` against an ``mlflow server`` started by this benchmark;
* ``clearml``: ``ClearMLLogger`` in ClearML offline mode (no ClearML server can run here);
* ``clearml-sdk``: what the seed's synchronous ClearMLLogger did: ``Task.init`` with ClearML's
  defaults and one ``report_scalar`` per scalar, offline;
* ``none-again``: the baseline once more, last, to show how much the machine itself varies.

``steplog`` is imported before the loop (as at the top of a training script); the logger is
created when the loop starts, and closed after it (every record checked delivered). With two or
more CPUs the server is pinned to CPU 0 (``taskset``); the training process and the sink host
are left to the scheduler, as in a real job. It prints the mean step time of every second and
the overhead against ``none``, per second and for the whole run.

With ``--repeat R`` every contender runs R times, the order rotating between rounds, and each
figure is the median over the rounds (per second, and for the whole run).

``--contenders`` runs a subset (``none`` always runs, as the baseline); the MLflow server is
started only when an MLflow contender runs.

    python benchmarks/bench_step_loop.py [--seconds 20] [--scalars 2 10] [--repeat 1]
        [--contenders none file file-thread mlflow-embedded mlflow-embedded-log-batch
                      mlflow-http clearml clearml-sdk none-again]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CONTENDERS = ("none", "file", "file-thread", "mlflow-embedded", "mlflow-embedded-log-batch",
              "mlflow-http", "clearml", "clearml-sdk", "none-again")
"""``none-again`` repeats the baseline last: its difference from ``none`` is the machine's noise."""


def training_step() -> Callable[[], float]:
    """One thread's torch training step (an MLP forward and backward plus an SGD step, about
    0.5 ms here); each call runs a step and returns its loss."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 8))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(64, 64)

    def step() -> float:
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        return float(loss.item())

    return step


def loop(contender: str, scalars: int, seconds: float, url: str, workdir: str) -> None:
    """One contender in this process: print the per-second mean step times (ms) as JSON."""
    train = training_step()
    names = [f"train/m{k}" for k in range(scalars)]
    if contender != "none":
        import steplog

    start = time.perf_counter()
    logger = None
    if contender == "file":
        logger = steplog.FileLogger(os.path.join(workdir, "run"))
    elif contender == "file-thread":
        logger = steplog.FileLogger(os.path.join(workdir, "run"), offload="never")
    elif contender == "mlflow-embedded":
        logger = steplog.MLFlowLogger("bench-step", tracking_uri=f"sqlite:///{workdir}/m.db")
    elif contender == "mlflow-embedded-log-batch":  # the sqlite fast path turned off
        os.environ["STEPLOG_MLFLOW_FAST_PATH"] = "0"
        logger = steplog.MLFlowLogger("bench-step", tracking_uri=f"sqlite:///{workdir}/m.db")
    elif contender == "mlflow-http":
        logger = steplog.MLFlowLogger("bench-step", tracking_uri=url)
    elif contender == "clearml":
        logger = steplog.ClearMLLogger("bench-step", "steplog")
    report = None
    if contender == "clearml-sdk":
        from clearml import Task

        task = Task.init(project_name="bench-step", task_name="sdk")
        report = task.get_logger().report_scalar
        pairs = [tuple(n.split("/", 1)) for n in names]
    buckets: list[list[float]] = [[] for _ in range(int(seconds) + 1)]
    step = 0
    now = time.perf_counter()
    while now - start < seconds:
        t0 = now
        value = train()
        if logger is not None:
            for name in names:
                logger.log_scalar(name, value, step)
        elif report is not None:
            for title, series in pairs:
                report(title, series, value, iteration=step)
        step += 1
        now = time.perf_counter()
        buckets[int(t0 - start)].append(now - t0)
    ok = True
    if logger is not None:
        result = logger.close(300)
        ok = bool(result) and result.delivered == step * scalars
    if report is not None:
        task.close()
    per_second = [1000 * statistics.fmean(b) for b in buckets if b]
    print(json.dumps({"per_second_ms": per_second, "steps": step, "ok": ok}))


def run_contender(contender: str, scalars: int, seconds: float, url: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="steplog-bench-") as workdir:
        cmd = [sys.executable, __file__, "--contender", contender, "--scalars", str(scalars),
               "--seconds", str(seconds), "--url", url, "--workdir", workdir]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
        env.update(CLEARML_OFFLINE_MODE="1", CLEARML_CACHE_DIR=os.path.join(workdir, "clearml"),
                   HOME=workdir)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 600,
                             check=False, env=env, cwd=workdir)
        if out.returncode != 0:
            raise RuntimeError(f"{contender} failed:\n{out.stderr[-3000:]}")
        result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--scalars", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--contender", choices=CONTENDERS[:-1])
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--url", default="")
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    if args.contender:
        loop(args.contender, args.scalars[0], args.seconds, args.url, args.workdir)
        return

    from mlflow_support import MlflowServer

    chosen = tuple(c for c in CONTENDERS if c in args.contenders or c == "none")
    two_cpus = (os.cpu_count() or 1) >= 2
    with tempfile.TemporaryDirectory(prefix="steplog-bench-server-") as root:
        server = None
        if "mlflow-http" in chosen:
            server = MlflowServer(Path(root), cpus={0} if two_cpus else None)
            server.start()
        try:
            for k in args.scalars:
                runs: dict[str, list[dict[str, object]]] = {c: [] for c in chosen}
                for r in range(args.repeat):
                    order = chosen[r % len(chosen):] + chosen[:r % len(chosen)]
                    for c in order:
                        runs[c].append(run_contender(c.replace("-again", ""), k, args.seconds,
                                                     server.url if server else ""))
                results = {c: _median_run(rs) for c, rs in runs.items()}
                report(k, results)
        finally:
            if server is not None:
                server.stop()


def _median_run(runs: list[dict[str, object]]) -> dict[str, object]:
    """Per-second and whole-run medians over repeated runs of one contender."""
    per = [r["per_second_ms"] for r in runs]
    seconds = min(len(p) for p in per if isinstance(p, list))
    return {
        "per_second_ms": [statistics.median(p[s] for p in per if isinstance(p, list))
                          for s in range(seconds)],
        "steps": int(statistics.median(int(str(r["steps"])) for r in runs)),
        "ok": all(bool(r["ok"]) for r in runs),
    }


def report(scalars: int, results: dict[str, dict[str, object]]) -> None:
    base = results["none"]["per_second_ms"]
    assert isinstance(base, list)
    seconds = len(base)
    print(f"\n{scalars} scalars per step: mean step time (ms) in each second of the run")
    header = f"{'second':>6}" + "".join(f"{c:>18}" for c in results)
    print(header)
    for s in range(seconds):
        row = f"{s:>6}"
        for c in results:
            per = results[c]["per_second_ms"]
            assert isinstance(per, list)
            if s < len(per):
                over = 100 * (per[s] / base[s] - 1)
                row += f"{per[s]:>10.3f} {over:+6.1f}%" if c != "none" else f"{per[s]:>18.3f}"
            else:
                row += f"{'-':>18}"
        print(row)
    print(f"{'run':>6}", end="")
    for c in results:
        steps = results[c]["steps"]
        ok = results[c]["ok"]
        assert isinstance(steps, int)
        base_steps = results["none"]["steps"]
        assert isinstance(base_steps, int)
        over = 100 * (base_steps / steps - 1)
        cell = f"{steps} steps" if c == "none" else f"{over:+.2f}% {'ok' if ok else 'LOST'}"
        print(f"{cell:>18}", end="")
    print()
    for c in list(results)[1:]:
        per = results[c]["per_second_ms"]
        assert isinstance(per, list)
        worst = max(100 * (per[s] / base[s] - 1) for s in range(min(seconds, len(per))))
        print(f"worst second of {c}: {worst:+.1f}%", end="; ")
    print("targets: every second <= 3%, the run <= 1%")


if __name__ == "__main__":
    main()
