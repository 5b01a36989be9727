"""The ``steplog`` command: ``demo`` runs a small training job, ``show`` summarises a run,
``sync`` uploads what a logger kept after its retries ran out."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from steplog.replay import SinkReplay

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    """Train a small torch policy on a contextual bandit, logging to files and MLflow (sqlite)."""
    try:
        import torch
    except ImportError:
        print("steplog demo needs torch: pip install 'steplog[torch]'", file=sys.stderr)
        return 2
    from steplog import FileSink, Logger
    from steplog.sinks.mlflow import MLflowSink

    out = Path(args.dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    mlflow_sink = MLflowSink("steplog-demo", tracking_uri=tracking_uri, run_name="bandit")
    logger = Logger(sinks=[FileSink(out / "files"), mlflow_sink])

    torch.manual_seed(0)
    arms, dim = 4, 8
    true_w = torch.randn(dim, arms)
    policy = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.Tanh(),
                                 torch.nn.Linear(64, arms))
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    logger.log_parameters({"algo": "REINFORCE", "arms": arms, "dim": dim, "lr": args.lr,
                           "steps": args.steps, "hidden": [64]})
    logger.log_tags({"source": "steplog demo"})

    start = time.perf_counter()
    for step in range(args.steps):
        ctx = torch.randn(256, dim)
        log_probs = torch.log_softmax(policy(ctx), dim=1)
        action = torch.multinomial(log_probs.exp(), 1)
        reward = (ctx @ true_w).gather(1, action).squeeze(1)
        advantage = reward - reward.mean()
        loss = -(log_probs.gather(1, action).squeeze(1) * advantage).mean()
        entropy = -(log_probs.exp() * log_probs).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        opt.step()
        # Tensors are captured at the call; nothing here waits on a sink.
        logger.log_metrics({"loss": loss.detach(), "reward/mean": reward.mean(),
                            "entropy": entropy.detach(), "grad_norm": grad_norm,
                            "lr": opt.param_groups[0]["lr"]}, step)
        if (step + 1) % max(1, args.steps // 4) == 0:
            logger.save_policy(policy, name="checkpoints", step=step + 1)
    train_s = time.perf_counter() - start

    flushed = logger.flush(60)
    result = logger.close(60)
    stats = logger.stats()
    print(f"trained {args.steps} steps in {train_s:.2f} s; flush {flushed.elapsed_s:.3f} s")
    print(f"delivered {stats.delivered} records ({stats.sinks}), closed ok={bool(result)}")
    print(f"files:   {out / 'files'}   (steplog show {out / 'files'})")
    print(f"mlflow:  mlflow ui --backend-store-uri {tracking_uri}   (run {mlflow_sink.run_id})")
    return 0 if result else 1


def _show(args: argparse.Namespace) -> int:
    """Print a file run's status, parameters, and count / last value of every scalar; or, for a
    run directory of a journaling logger, what its journal holds and what each sink lacks."""
    run = Path(args.dir)
    if (run / "journal").is_dir():
        try:
            return _show_journal(run)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"steplog show: cannot read {run}: {exc}", file=sys.stderr)
            return 1
    scalars = run / "scalars.jsonl"
    if not scalars.exists():
        print(f"{run} is not a steplog file run (no scalars.jsonl)", file=sys.stderr)
        return 2
    status = "running or killed"
    if (run / "run.json").exists():
        status = json.loads((run / "run.json").read_text())["status"]
    print(f"run {run}: {status}")
    if (run / "parameters.json").exists():
        print("parameters:", json.dumps(json.loads((run / "parameters.json").read_text()),
                                        sort_keys=True))
    series: dict[str, list[Any]] = {}
    with open(scalars, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # a line cut short by a crash
            row = json.loads(line)
            entry = series.setdefault(row["name"], [0, None, None])
            entry[0] += 1
            entry[1], entry[2] = row["step"], row["value"]
    width = max((len(n) for n in series), default=4)
    print(f"{'name':{width}}  {'points':>8}  {'last step':>10}  last value")
    for name, (count, step, value) in sorted(series.items()):
        print(f"{name:{width}}  {count:8d}  {step:10d}  {value:.6g}")
    return 0


def _show_journal(run: Path) -> int:
    from steplog.frames import count_records
    from steplog.journal import Journal, JournalLockedError
    from steplog.kept import find_kept
    from steplog.paths import sync_command

    manifest = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    try:
        journal = Journal.open(run / "journal")
    except JournalLockedError:
        print(f"run {run}: its logger is still running (the journal is in use)")
        return 0
    with journal:
        summary = journal.describe()
        print(f"run {run}: closed with {manifest.get('status') or 'no close (killed?)'}; "
              f"journal: {summary.frames} frames, {summary.bytes:,} bytes")
        for consumer, info in manifest.get("sinks", {}).items():
            where, run_name = _destination(info.get("target") or {})
            lacking = sum(count_records(payload) for _, payload in journal.pending(consumer))
            cursor = journal.cursor(consumer) if consumer in journal.consumers else 0
            moved = ""
            if info.get("moved_from"):
                origin = info["moved_from"]
                moved = (f" (moved from {origin.get('tracking_uri') or '?'} run "
                         f"{origin.get('run_id') or 'never created'})")
            print(f"  {consumer}: {where} {run_name}{moved}: stored up to frame {cursor}; "
                  f"lacks {lacking} records")
    kept = list(find_kept(run))
    if kept:
        print(f"  {len(kept)} uploads kept: "
              + ", ".join(f"{k.artifact.name} -> {k.sink}" for k in kept))
    if kept or any(c.pending for c in summary.consumers.values()):
        print(f"deliver what is missing with: {sync_command(run)}")
    return 0


def _destination(target: dict[str, Any]) -> tuple[str, str]:
    """Where a journaled sink writes (a server, a directory) and its run, for ``show``."""
    if "task_id" in target:  # ClearML
        return (target.get("api_host") or "?",
                f"task {target.get('task_id') or 'not created yet'}")
    return (target.get("tracking_uri") or target.get("output_dir") or "?",
            f"run {target.get('run_id') or 'not created yet'}")


class _ProgressLine:
    """The journal replay on a terminal: one line per run and sink, rewritten in place (at most
    ten times a second) with the records written out of those the sink lacked, the rate so far
    and the time left at that rate."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._sink: tuple[Path, str] | None = None
        self._started = 0.0
        self._shown = 0.0

    def update(self, r: SinkReplay) -> None:
        now = time.monotonic()
        if self._sink != (r.run, r.consumer):
            self._sink = (r.run, r.consumer)
            self._started = now  # the run is reached: writing starts
        elif r.records < r.total and now - self._shown < 0.1:
            return
        self._shown = now
        elapsed = now - self._started
        rate = r.records / elapsed if r.records and elapsed > 0 else None
        percent = 100.0 * r.records / r.total if r.total else 100.0
        line = (f"{r.run.name} -> {r.consumer}: {r.records:,}/{r.total:,} records "
                f"({percent:.1f}%), ")
        if rate is None:
            line += "-- records/s, ETA --"  # nothing measured yet: no made-up figures
        else:
            line += f"{rate:,.0f} records/s, ETA {_duration((r.total - r.records) / rate)}"
        self._stream.write(f"\r{line}\x1b[K")
        self._stream.flush()

    def clear(self) -> None:
        """Remove the line (the summary is printed in its place)."""
        if self._sink is not None:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._sink = None


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def _summary(r: SinkReplay) -> str:
    """One line saying what the sync did for one sink of one run."""
    what = f"run      {r.run.name} -> {r.consumer}: "
    if not r.total and not r.pending:
        return what + "nothing to send"
    rate = r.records / r.seconds if r.seconds > 0 else 0.0
    what += (f"{r.records} records sent in {r.seconds:.1f} s ({rate:,.0f} records/s), "
             f"{r.rejected} refused by the backend")
    if r.destination is not None:
        what += f", into {r.destination}"
    if r.moved_from is not None:
        what += f" (moved from {r.moved_from})"
    if r.error is not None or r.pending:
        what += f"; {r.pending} frames still kept: {r.error}"
    return what


def _sync(args: argparse.Namespace) -> int:
    """Deliver what loggers kept on disk under PATH (one run directory, or all of them): the
    journaled records a sink did not store, and the uploads that failed after their retries.
    Running it again stores nothing twice. With --to URI, what an MLflow run lacks goes to a
    new run at that tracking URI instead (the same one on every later sync)."""
    from steplog.kept import KeptUpload, sync_kept
    from steplog.replay import find_runs, replay_run
    from steplog.sinks.mlflow.common import redact, tracking_uri_problem

    path = Path(args.path)
    if not path.exists():
        print(f"steplog sync: {path} does not exist", file=sys.stderr)
        return 2
    to: str | None = args.to
    if to is not None:
        problem = tracking_uri_problem(to)
        if problem is not None:
            print(f"steplog sync: --to {redact(to)}: {problem}", file=sys.stderr)
            return 2
    failed = 0
    line = _ProgressLine(sys.stderr) if sys.stderr.isatty() else None

    for run in find_runs(path):
        try:
            results = replay_run(run, timeout_s=args.timeout, to=to,
                                 progress=None if line is None else line.update)
        except Exception as exc:
            failed += 1
            print(f"run      {run}: {exc}")
            continue
        finally:
            if line is not None:
                line.clear()
        for r in results:
            if r.error is not None or r.pending:
                failed += 1
            print(_summary(r))

    def report(kept: KeptUpload, error: str | None) -> None:
        what = f"{kept.artifact.kind} {kept.artifact.name!r} -> {kept.sink}"
        if error is None:
            if kept.moved_from is not None and kept.target is not None:
                what += f" (new run at {kept.target.get('tracking_uri')})"
            print(f"stored   {what}")
        else:
            print(f"kept     {what}: {error} ({kept.folder})")

    def unreadable(manifest: Path, why: str) -> None:
        print(f"skipped  {manifest}: {why}")

    stored, kept = sync_kept(path, report, unreadable, to=to)
    print(f"{stored} stored, {kept} still kept")
    return 0 if failed == 0 and kept == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steplog", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help=_demo.__doc__)
    demo.add_argument("--dir", default=os.environ.get("STEPLOG_DEMO_DIR", "steplog-demo"))
    demo.add_argument("--steps", type=int, default=2000)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.set_defaults(func=_demo)
    show = sub.add_parser("show", help=_show.__doc__)
    show.add_argument("dir")
    show.set_defaults(func=_show)
    sync = sub.add_parser("sync", help=_sync.__doc__)
    sync.add_argument("path", nargs="?",
                      default=os.environ.get("STEPLOG_RUNS_DIR", "steplog-runs"))
    sync.add_argument("--timeout", type=float, default=60.0,
                      help="longest one write is retried before the rest stays kept (s)")
    sync.add_argument("--to", metavar="URI",
                      help="deliver what each MLflow run lacks into a new run at this tracking "
                           "URI (same experiment, run name, tags and status)")
    sync.set_defaults(func=_sync)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        # A sync stopped here resumes where its cursors are with the next one.
        print("steplog: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
