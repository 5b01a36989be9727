"""One rank of the multi-process tests in test_ranks.py, started as torchrun starts a worker
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

    python rank_worker.py <tracking_uri> <out_dir> <mode> <records> <tag>

It joins a gloo process group on loopback, then logs ``records`` steps of ``loss`` (log_scalar)
and ``acc``/``lr`` (log_metrics) at full speed, value ``rank * 1e6 + step``, and writes what
its loggers said to ``<out_dir>/rank<R>.json``. In ``policies`` mode each logger also stores
the file ``note.txt`` ("rank <R>").

``mode`` ``policies``: one logger per policy (zero, all, own), one after the other, experiment
``<tag>-<policy>``. ``mode`` ``kill``: an ``all`` and an ``own`` logger side by side; rank 2
flushes half its records, logs the other half at full speed, writes ``<out_dir>/flushed2``
once they left the in-memory queue (for the journal) and waits to be killed; the others log
their second half once ``<out_dir>/killed`` exists (or 60 s passed).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from steplog import MLFlowLogger, Options

POLICIES = ("zero", "all", "own")


def log_steps(loggers: list[MLFlowLogger], rank: int, steps: range) -> None:
    for i in steps:
        v = rank * 1e6 + i
        for lg in loggers:
            lg.log_scalar("loss", v, i)
            lg.log_metrics({"acc": v + 0.25, "lr": v + 0.5}, i)


def options(policy: str) -> Options:
    return Options(drain_interval_s=0.01, timeout_s=60, ranks=policy)  # type: ignore[arg-type]


def report(lg: MLFlowLogger, result: Any) -> dict[str, Any]:
    return {"type": type(lg).__name__, "state": lg.state.value, "run_id": lg.run_id,
            "run_dir": lg.run_dir, "ok": bool(result), "inactive": result.inactive,
            "undelivered": getattr(result, "undelivered", 0)}


def main() -> None:
    uri, out_dir, mode, records, tag = sys.argv[1:6]
    out = Path(out_dir)
    n = int(records)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    reports: dict[str, Any] = {}
    if mode == "policies":
        for policy in POLICIES:
            threads = threading.active_count()
            lg = MLFlowLogger(f"{tag}-{policy}", tracking_uri=uri, run_name=tag,
                              options=options(policy))
            started = threading.active_count() - threads
            note = out / f"note{rank}.txt"
            note.write_text(f"rank {rank}")
            lg.log_artifact(note, name="note.txt")
            log_steps([lg], rank, range(n))
            reports[policy] = {**report(lg, lg.close()), "threads_started": started}
    else:
        both = [MLFlowLogger(f"{tag}-{policy}", tracking_uri=uri, run_name=tag,
                             options=options(policy))
                for policy in ("all", "own")]
        log_steps(both, rank, range(n // 2))
        if rank == 2:
            for lg in both:
                assert lg.flush(60)
            log_steps(both, rank, range(n // 2, n))  # at full speed, then killed
            # Killed once drained (journaled): what a kill -9 takes is only what was still in
            # the in-memory queue, as for any logger.
            deadline = time.monotonic() + 30
            while any(lg.stats().queue_depth for lg in both) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            dirs = {p: lg.run_dir for p, lg in zip(("all", "own"), both, strict=True)}
            (out / "rank2.json").write_text(json.dumps(dirs))
            (out / "flushed2").write_text("")
            time.sleep(60)
            return
        deadline = time.monotonic() + 60
        while not (out / "killed").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        log_steps(both, rank, range(n // 2, n))
        reports = {p: report(lg, lg.close()) for p, lg in zip(("all", "own"), both,
                                                               strict=True)}
    (out / f"rank{rank}.json").write_text(json.dumps(reports))
    # No barrier here: a rank that ends never waits for another.


if __name__ == "__main__":
    main()
