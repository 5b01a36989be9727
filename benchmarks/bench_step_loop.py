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

With ``--alternate PHASE_S`` each contender's process instead turns its logging on and off
in phases of PHASE_S seconds (the logger open throughout) and prints on / off of the step time
and of the training thread's CPU per step: the same process, memory layout and CPU on both
sides, so the differences between processes (a few percent here) drop out; ``none`` shows the
method's own spread. It also prints the mean, over every pair of adjacent on and off phases,
of their ratio, with its 95% confidence interval: a long run (``--seconds 600``) narrows it
well below the machine's second-to-second variation. Beside them, the median step with
logging off shows the machine's speed during the contender's runs.

With ``--threads`` each contender's process instead runs the loop with logging on for
``--seconds`` (after a 2 s warm-up) and prints, for each of its threads (named as in
``threading``), the CPU time per second of loop (``/proc/self/task/*/schedstat``) and the
voluntary context switches per second: a training thread that has to wait for the GIL (or a
lock) while a worker thread holds it switches out, so its switches against ``none``'s count
the hand-overs that logging costs the loop; the worker threads' CPU is also given per record.
``--drain-interval S`` sets ``Options(drain_interval_s=S)`` on steplog's loggers.

``--contenders`` runs a subset (``none`` always runs, as the baseline); the MLflow server is
started only when an MLflow contender runs.

    python benchmarks/bench_step_loop.py [--seconds 20] [--scalars 2 10] [--repeat 1]
        [--alternate PHASE_S | --threads] [--drain-interval S]
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
import threading
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


Contender = tuple[Callable[[float, int], None] | None, Callable[[int], bool]]
"""A contender's per-step logging (``None`` for no logging) and its ending: ``end(steps)``
closes it and says whether every record of the ``steps`` logged steps arrived."""


def open_contender(contender: str, names: list[str], url: str, workdir: str) -> Contender:
    """Build the contender's logger (or the ClearML SDK's task) as at the top of a training
    script (with ``Options(drain_interval_s=...)`` when ``$BENCH_DRAIN_INTERVAL_S`` is set)."""
    if contender == "none":
        return None, lambda steps: True
    if contender == "clearml-sdk":
        from clearml import Task

        task = Task.init(project_name="bench-step", task_name="sdk")
        report = task.get_logger().report_scalar
        pairs = [tuple(n.split("/", 1)) for n in names]

        def report_step(value: float, step: int) -> None:
            for title, series in pairs:
                report(title, series, value, iteration=step)

        def end_task(steps: int) -> bool:
            task.close()
            return True

        return report_step, end_task
    import steplog

    interval = os.environ.get("BENCH_DRAIN_INTERVAL_S")
    options = steplog.Options(drain_interval_s=float(interval)) if interval else None
    logger: steplog.Logger
    if contender == "file":
        logger = steplog.FileLogger(os.path.join(workdir, "run"), options=options)
    elif contender == "file-thread":
        logger = steplog.FileLogger(os.path.join(workdir, "run"), offload="never",
                                    options=options)
    elif contender == "mlflow-embedded":
        logger = steplog.MLFlowLogger("bench-step", tracking_uri=f"sqlite:///{workdir}/m.db",
                                      options=options)
    elif contender == "mlflow-embedded-log-batch":  # the sqlite fast path turned off
        os.environ["STEPLOG_MLFLOW_FAST_PATH"] = "0"
        logger = steplog.MLFlowLogger("bench-step", tracking_uri=f"sqlite:///{workdir}/m.db",
                                      options=options)
    elif contender == "mlflow-http":
        logger = steplog.MLFlowLogger("bench-step", tracking_uri=url, options=options)
    elif contender == "clearml":
        logger = steplog.ClearMLLogger("bench-step", "steplog", options=options)
    else:
        raise ValueError(f"unknown contender {contender!r}")
    log_scalar = logger.log_scalar

    def log_step(value: float, step: int) -> None:
        for name in names:
            log_scalar(name, value, step)

    def end(steps: int) -> bool:
        result = logger.close(300)
        return bool(result) and result.delivered == steps * len(names)

    return log_step, end


def loop(contender: str, scalars: int, seconds: float, url: str, workdir: str) -> None:
    """One contender in this process: print the per-second mean step times (ms) as JSON."""
    train = training_step()
    names = [f"train/m{k}" for k in range(scalars)]
    if contender != "none":
        import steplog  # noqa: F401  (imported before the loop, as at the top of a script)

    start = time.perf_counter()
    log_step, end = open_contender(contender, names, url, workdir)
    buckets: list[list[float]] = [[] for _ in range(int(seconds) + 1)]
    step = 0
    now = time.perf_counter()
    while now - start < seconds:
        t0 = now
        value = train()
        if log_step is not None:
            log_step(value, step)
        step += 1
        now = time.perf_counter()
        buckets[int(t0 - start)].append(now - t0)
    ok = end(step)
    per_second = [1000 * statistics.fmean(b) for b in buckets if b]
    print(json.dumps({"per_second_ms": per_second, "steps": step, "ok": ok}))


def run_for(train: Callable[[], float], log_step: Callable[[float, int], None] | None,
            length: float, first: int) -> int:
    """Run training steps for ``length`` seconds, logging each (when ``log_step`` is given) at
    steps ``first``, ``first + 1``, ...; how many steps ran."""
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < length:
        value = train()
        if log_step is not None:
            log_step(value, first + n)
        n += 1
    return n


def alternate(contender: str, scalars: int, seconds: float, phase: float, url: str,
              workdir: str) -> None:
    """One contender in this process, its logging on and off in alternating phases of
    ``phase`` seconds (on-off, off-on, ...) after a 2 s warm-up with it on; print, per phase,
    the mean wall time and the training thread's CPU time per step (ms) as JSON. The logger
    stays open throughout, so both kinds of phase run in the same process, memory layout and
    CPU; with ``none`` both kinds log nothing, which shows the method's own spread."""
    train = training_step()
    names = [f"train/m{k}" for k in range(scalars)]
    log_step, end = open_contender(contender, names, url, workdir)
    step = logged = 0

    def run_phase(on: bool, length: float) -> tuple[float, float]:
        nonlocal step, logged
        t0 = time.perf_counter()
        c0 = time.thread_time()
        n = run_for(train, log_step if on else None, length, logged)
        wall = time.perf_counter() - t0
        step += n
        logged += n if on else 0
        return 1000 * wall / n, 1000 * (time.thread_time() - c0) / n

    run_phase(True, 2.0)
    on: list[tuple[float, float]] = []
    off: list[tuple[float, float]] = []
    for pair in range(max(1, int(seconds / (2 * phase)))):
        for kind in ((True, False) if pair % 2 == 0 else (False, True)):
            (on if kind else off).append(run_phase(kind, phase))
    print(json.dumps({"on": on, "off": off, "steps": step, "ok": end(logged)}))


def thread_counters() -> dict[str, tuple[int, int]]:
    """Per thread of this process: (CPU ns, voluntary context switches), keyed by the thread's
    ``threading`` name (``other:<tid>`` for threads Python did not start, such as torch's);
    threads of the same name are added up."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, tuple[int, int]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                cpu = int(f.read().split()[0])
            with open(f"/proc/self/task/{tid}/status") as f:
                switches = next(int(line.split()[1]) for line in f
                                if line.startswith("voluntary_ctxt_switches"))
        except (OSError, StopIteration):  # the thread ended meanwhile
            continue
        name = names.get(int(tid), f"other:{tid}")
        total_cpu, total_switches = out.get(name, (0, 0))
        out[name] = (total_cpu + cpu, total_switches + switches)
    return out


def threads(contender: str, scalars: int, seconds: float, url: str, workdir: str) -> None:
    """One contender in this process with logging on throughout: after a 2 s warm-up, print
    each thread's CPU (ms per second of loop) and voluntary context switches per second over
    ``seconds``, and the records logged per second, as JSON."""
    train = training_step()
    names = [f"train/m{k}" for k in range(scalars)]
    log_step, end = open_contender(contender, names, url, workdir)
    warm = run_for(train, log_step, 2.0, 0)
    before = thread_counters()
    t0 = time.perf_counter()
    n = run_for(train, log_step, seconds, warm)
    elapsed = time.perf_counter() - t0
    after = thread_counters()
    per_thread = {
        name: [(cpu - before[name][0]) / 1e6 / elapsed, (sw - before[name][1]) / elapsed]
        for name, (cpu, sw) in after.items() if name in before
    }
    records = n * scalars if log_step is not None else 0
    print(json.dumps({"threads": per_thread, "records_per_s": records / elapsed,
                      "step_ms": 1000 * elapsed / n, "ok": end(warm + n)}))


def run_contender(contender: str, scalars: int, seconds: float, url: str,
                  phase: float | None = None, mode_threads: bool = False,
                  drain_interval: float | None = None) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="steplog-bench-") as workdir:
        cmd = [sys.executable, __file__, "--contender", contender, "--scalars", str(scalars),
               "--seconds", str(seconds), "--url", url, "--workdir", workdir]
        if phase is not None:
            cmd += ["--alternate", str(phase)]
        if mode_threads:
            cmd += ["--threads"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
        if drain_interval is not None:
            env["BENCH_DRAIN_INTERVAL_S"] = str(drain_interval)
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
    parser.add_argument("--alternate", type=float, metavar="PHASE_S",
                        help="in each contender's process, turn its logging on and off in "
                             "phases of PHASE_S seconds over --seconds, and compare them")
    parser.add_argument("--threads", action="store_true",
                        help="report each thread's CPU and voluntary context switches")
    parser.add_argument("--drain-interval", type=float, metavar="S",
                        help="Options(drain_interval_s=S) for steplog's loggers")
    args = parser.parse_args()
    if args.contender:
        if args.threads:
            threads(args.contender, args.scalars[0], args.seconds, args.url, args.workdir)
        elif args.alternate:
            alternate(args.contender, args.scalars[0], args.seconds, args.alternate, args.url,
                      args.workdir)
        else:
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
                                                     server.url if server else "",
                                                     args.alternate, args.threads,
                                                     args.drain_interval))
                if args.threads:
                    report_threads(k, runs)
                elif args.alternate:
                    report_alternating(k, args.alternate, runs)
                else:
                    report(k, {c: _median_run(rs) for c, rs in runs.items()})
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


def report_alternating(scalars: int, phase: float,
                       runs: dict[str, list[dict[str, object]]]) -> None:
    """Per contender: logging on over off, of the wall time per step and of the training
    thread's CPU per step, each the median over the process's phases, then the median over
    processes (the range over processes in brackets); and the median step with logging off
    (the machine's speed during the contender's runs)."""
    print(f"\n{scalars} scalars per step, logging on vs off in the same process, phases of "
          f"{phase:g} s: step time on / off - 1")
    print(f"{'contender':<20}{'wall per step':>26}{'paired wall, 95% CI':>26}"
          f"{'training thread CPU':>26}{'pairs':>7}{'step off, ms':>14}{'delivered':>11}")
    for c, rs in runs.items():
        walls, cpus, paired, steps_off = [], [], [], []
        for r in rs:
            on, off = r["on"], r["off"]
            assert isinstance(on, list) and isinstance(off, list)
            walls.append(statistics.median(x[0] for x in on) / statistics.median(x[0] for x in off))
            cpus.append(statistics.median(x[1] for x in on) / statistics.median(x[1] for x in off))
            paired += [a[0] / b[0] for a, b in zip(on, off, strict=False)]
            steps_off += [x[0] for x in off]
        cells = [f"{100 * (statistics.median(v) - 1):+.2f}% "
                 f"[{100 * (min(v) - 1):+.2f}, {100 * (max(v) - 1):+.2f}]" for v in (walls, cpus)]
        mean = statistics.fmean(paired)
        half = 1.96 * statistics.stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else 0.0
        pair_cell = f"{100 * (mean - 1):+.2f}% \u00b1 {100 * half:.2f}"
        ok = "ok" if all(bool(r["ok"]) for r in rs) else "LOST"
        print(f"{c:<20}{cells[0]:>26}{pair_cell:>26}{cells[1]:>26}{len(paired):>7}"
              f"{statistics.median(steps_off):>14.3f}{ok:>11}")
    print("none: both kinds of phase log nothing (the method's own spread). Paired: the mean "
          "over every on/off pair of adjacent phases of on / off, with its 95% confidence "
          "interval (1.96 standard errors). Step off: the median step with logging off (the "
          "machine's speed during the contender's runs)")


def report_threads(scalars: int, runs: dict[str, list[dict[str, object]]]) -> None:
    """Per contender and thread: CPU ms per second of loop, voluntary switches per second and
    (worker threads) CPU ns per record, each the median over processes."""
    print(f"\n{scalars} scalars per step, logging on throughout: each thread's CPU and "
          "voluntary context switches per second of loop (medians over processes)")
    print(f"{'contender':<26}{'thread':<30}{'CPU ms/s':>10}{'switches/s':>12}"
          f"{'ns/record':>11}")
    for c, rs in runs.items():
        rate = statistics.median(float(str(r["records_per_s"])) for r in rs)
        step = statistics.median(float(str(r["step_ms"])) for r in rs)
        ok = "ok" if all(bool(r["ok"]) for r in rs) else "LOST"
        print(f"{c:<26}{f'({rate:,.0f} records/s, step {step:.3f} ms, {ok})':<30}")
        tables = [r["threads"] for r in rs]
        names: list[str] = []
        for t in tables:
            assert isinstance(t, dict)
            names += [n for n in t if n not in names and not n.startswith("other:")]
        for name in names:
            values = [t[name] for t in tables if isinstance(t, dict) and name in t]
            cpu = statistics.median(v[0] for v in values)
            switches = statistics.median(v[1] for v in values)
            per_record = (f"{1e6 * cpu / rate:>11.0f}" if rate and name != "MainThread"
                          else f"{'':>11}")
            print(f"{'':<26}{name:<30}{cpu:>10.1f}{switches:>12.0f}{per_record}")


if __name__ == "__main__":
    main()
