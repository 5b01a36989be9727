"""Where a step loop's logging time goes: wall time, the training thread's CPU and the other
threads' CPU per step, for a FileLogger whose scalar lines are written by its worker thread or by
its writer process.

Each contender runs in a fresh Python process: a one-thread torch step loop (an MLP forward and
backward plus an SGD step, about 0.55 ms) logging ``--scalars`` scalars per step for
``--seconds`` seconds after 200 warm-up steps. Contenders alternate over ``--rounds`` rounds:

* ``none``: no logging;
* ``thread``: ``FileLogger(offload="never")``;
* ``writer``: ``FileLogger(offload="always")``, timed once its writer process answers;
* ``auto``: ``FileLogger()``, whose writer process starts during the loop.

The other threads' CPU is the process's CPU minus the training thread's: the worker threads
(whose Python work holds the GIL the loop needs) and the kernel work they cause. The writer
process's own CPU is not in it.

    python benchmarks/bench_step_cpu.py [--scalars 200] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CONTENDERS = ("none", "thread", "writer", "auto")


def loop(contender: str, scalars: int, seconds: float) -> None:
    import steplog
    from bench_file_sink import wait_for_writer
    from bench_step_loop import training_step

    train = training_step()
    names = [f"train/m{k}" for k in range(scalars)]
    with tempfile.TemporaryDirectory(prefix="steplog-bench-") as out:
        logger = None
        if contender != "none":
            offload = {"thread": "never", "writer": "always", "auto": "auto"}[contender]
            logger = steplog.FileLogger(out, offload=offload)  # type: ignore[arg-type]
        if contender == "writer":
            assert logger is not None
            sink = logger._sinks[0]
            assert isinstance(sink, steplog.FileSink)
            wait_for_writer(sink)
        for _ in range(200):
            train()
        cpu, process, start = time.thread_time(), os.times(), time.perf_counter()
        steps = 0
        while time.perf_counter() - start < seconds:
            value = train()
            if logger is not None:
                for name in names:
                    logger.log_scalar(name, value, steps)
            steps += 1
        wall = time.perf_counter() - start
        main = time.thread_time() - cpu
        end = os.times()
        total = end.user - process.user + end.system - process.system
        ok = True
        if logger is not None:
            result = logger.close(300)
            ok = bool(result) and result.delivered == steps * scalars
    print(json.dumps({"wall": wall / steps * 1e6, "main": main / steps * 1e6,
                      "others": (total - main) / steps * 1e6, "ok": ok}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scalars", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contender", choices=CONTENDERS)
    args = parser.parse_args()
    if args.contender:
        loop(args.contender, args.scalars, args.seconds)
        return
    print(f"{args.scalars} scalars per step, {args.seconds:g} s per contender, "
          f"{args.rounds} rounds; microseconds per step")
    print(f"{'round':>5} {'contender':>9} {'wall':>8} {'main CPU':>9} {'others CPU':>11}")
    for r in range(args.rounds):
        for contender in CONTENDERS:
            out = subprocess.run(
                [sys.executable, __file__, "--contender", contender, "--scalars",
                 str(args.scalars), "--seconds", str(args.seconds)],
                capture_output=True, text=True, timeout=args.seconds + 300, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            assert row["ok"], f"{contender}: not every record arrived"
            print(f"{r:>5} {contender:>9} {row['wall']:>8.1f} {row['main']:>9.1f} "
                  f"{row['others']:>11.1f}")


if __name__ == "__main__":
    main()
