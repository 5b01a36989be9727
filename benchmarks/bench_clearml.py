"""ClearML: what one logging call costs the caller, and how long close takes, side by side.

Two contenders, each in a fresh process in ClearML offline mode (no ClearML server can run
here), one after the other in one run:

* ``sdk``: what the seed's synchronous ClearMLLogger does per scalar: ``Task.init`` with
  ClearML's defaults, then ``task.get_logger().report_scalar(title, series, value, iteration)``
  per call;
* ``steplog``: ``steplog.ClearMLLogger.log_scalar(name, value, iteration)`` per call.

Each call is timed alone with ``perf_counter_ns`` (the timer adds about 50-100 ns to every
figure). Printed: median, p99, p99.9 and worst call; the time to flush everything; and the time
``close(timeout=5)`` takes (steplog) against ``Task.close()`` (SDK).

    python benchmarks/bench_clearml.py [--calls 100000] [--sdk-calls 5000]
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


def child(contender: str, calls: int) -> None:
    """One contender in this process; prints its figures as JSON."""
    names = [("loss", "train"), ("loss", "val"), ("reward", "mean"), ("metrics", "lr"),
             ("metrics", "entropy")]
    durations = []
    clock = time.perf_counter_ns
    if contender == "sdk":
        from clearml import Task

        task = Task.init(project_name="bench", task_name="sdk")
        report = task.get_logger().report_scalar
        for i in range(calls):
            title, series = names[i % 5]
            t0 = clock()
            report(title, series, float(i), iteration=i // 5)
            durations.append(clock() - t0)
        t0 = clock()
        task.flush(wait_for_uploads=True)
        flush_s = (clock() - t0) / 1e9
        t0 = clock()
        task.close()
        close_s = (clock() - t0) / 1e9
        ok = True
    else:
        import steplog

        logger = steplog.ClearMLLogger("bench", "steplog")
        log = logger.log_scalar
        full = [f"{t}/{s}" if t != "metrics" else s for t, s in names]
        for i in range(calls):
            name = full[i % 5]
            t0 = clock()
            log(name, float(i), i // 5)
            durations.append(clock() - t0)
        t0 = clock()
        flushed = logger.flush(60)
        flush_s = (clock() - t0) / 1e9
        t0 = clock()
        result = logger.close(timeout=5)
        close_s = (clock() - t0) / 1e9
        ok = bool(flushed) and bool(result) and result.delivered == calls
    durations.sort()
    n = len(durations)
    print(json.dumps({
        "calls": n,
        "median_ns": statistics.median(durations),
        "p99_ns": durations[int(n * 0.99)],
        "p999_ns": durations[int(n * 0.999)],
        "worst_ns": durations[-1],
        "flush_s": flush_s,
        "close_s": close_s,
        "ok": ok,
    }))


def run(contender: str, calls: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="steplog-bench-clearml-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
        env.update(HOME=home, CLEARML_CACHE_DIR=os.path.join(home, "cache"),
                   CLEARML_OFFLINE_MODE="1")
        out = subprocess.run([sys.executable, __file__, "--child", contender, "--calls",
                              str(calls)], capture_output=True, text=True, env=env,
                             timeout=1800, check=False, cwd=home)
        if out.returncode != 0:
            raise RuntimeError(f"{contender} failed:\n{out.stderr[-3000:]}")
        result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--sdk-calls", type=int, default=5_000,
                        help="calls for the SDK (each takes milliseconds of wall time)")
    parser.add_argument("--child", choices=("sdk", "steplog"))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls)
        return
    results = {"sdk": run("sdk", args.sdk_calls), "steplog": run("steplog", args.calls)}
    print(f"{'contender':>10} {'calls':>8} {'median':>10} {'p99':>10} {'p99.9':>10} "
          f"{'worst':>10} {'flush':>8} {'close':>8}")
    for name, r in results.items():
        print(f"{name:>10} {int(r['calls']):>8} {r['median_ns'] / 1e3:>8.2f}us "
              f"{r['p99_ns'] / 1e3:>8.2f}us {r['p999_ns'] / 1e3:>8.1f}us "
              f"{r['worst_ns'] / 1e6:>8.2f}ms {r['flush_s']:>7.2f}s {r['close_s']:>7.2f}s"
              f"{'' if r['ok'] else '  LOST'}")
    sdk, ours = results["sdk"], results["steplog"]
    print(f"median call: SDK / steplog = {sdk['median_ns'] / ours['median_ns']:.0f}x; "
          f"worst call: SDK {sdk['worst_ns'] / 1e6:.1f} ms, steplog "
          f"{ours['worst_ns'] / 1e6:.2f} ms (target < 1 ms over 100,000 calls); "
          f"steplog close(timeout=5): {ours['close_s']:.2f} s (target <= 5.5 s)")


if __name__ == "__main__":
    main()
