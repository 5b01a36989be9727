"""``steplog sync`` of journals: deliver what a run's journal holds and a sink never stored.

For each sink named in ``<run>/run.json``, the sink is rebuilt for the same run
(:meth:`Sink.reattach`; an MLflow run whose creation never succeeded is found by its token or
created; a ClearML Task always exists, its logger created it when it was built),
and every frame after that sink's cursor is decoded and written, in order, the cursor advancing
frame by frame. A refused record is isolated by splitting the frame (the rest is stored); a
failure that retrying does not cure within ``timeout_s``, or a refusal of the request as a whole
(no permission, a deleted run), stops that sink with its cursor kept, so a later sync continues
there. Once a sink has every frame, its run is ended with the status the logger closed with
(``run.json``), when it closed. Writing a frame twice stores nothing twice (only sinks that keep
identical rows once are journaled). A journal every sink acknowledged whole is removed, with
``run.json``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from steplog.frames import decode_batch
from steplog.journal import Journal
from steplog.records import Batch
from steplog.retry import RetryPolicy, call_with_retry, is_retryable
from steplog.sinks.base import Sink

__all__ = ["SinkReplay", "find_runs", "replay_run"]


class SinkReplay(msgspec.Struct):
    """What a sync did for one sink of one run."""

    run: Path
    consumer: str
    kind: str
    frames: int = 0
    records: int = 0
    rejected: int = 0
    pending: int = 0
    error: str | None = None


def find_runs(path: str | Path) -> Iterator[Path]:
    """Run directories (holding ``run.json`` and ``journal/``) at or under ``path``."""
    root = Path(path)
    if (root / "run.json").is_file() and (root / "journal").is_dir():
        yield root
        return
    for manifest in sorted(root.rglob("run.json")):
        if (manifest.parent / "journal").is_dir():
            yield manifest.parent


def replay_run(run: Path, *, timeout_s: float = 60.0,
               progress: Callable[[SinkReplay, int], None] | None = None) -> list[SinkReplay]:
    """Deliver every unacknowledged frame of ``run`` to its sinks (see the module docstring)."""
    from steplog.sinks import reattach

    manifest = json.loads((run / "run.json").read_text())
    results: list[SinkReplay] = []
    with Journal.open(run / "journal") as journal:
        for consumer, info in manifest.get("sinks", {}).items():
            out = SinkReplay(run, consumer, info.get("kind", "?"))
            results.append(out)
            if consumer not in journal.consumers:
                journal.register(consumer)
            frames = list(journal.pending(consumer))
            out.pending = len(frames)
            if not frames:
                continue
            try:
                if not info.get("target"):
                    raise ValueError(f"the {out.kind} sink cannot be reached again from here")
                sink = reattach(out.kind, info["target"])
            except Exception as exc:
                out.error = str(exc) or repr(exc)
                continue
            deadline = time.monotonic() + timeout_s
            policy = RetryPolicy(initial_s=0.2, max_s=5.0, jitter_s=0.2)
            try:
                call_with_retry(sink.open, policy, functools.partial(_at, deadline), _quiet)
                for seq, payload in frames:
                    try:
                        batch = decode_batch(payload)
                    except msgspec.DecodeError as exc:
                        out.error = f"frame {seq} cannot be decoded ({exc}); skipped"
                    else:
                        out.rejected += _write(sink, batch, policy, deadline)
                        out.records += len(batch)
                    journal.ack(consumer, seq)
                    out.frames += 1
                    out.pending -= 1
                    if progress is not None:
                        progress(out, len(frames))
                status = manifest.get("status")
                if status in ("FINISHED", "FAILED", "KILLED"):
                    # The logger closed with this status; its run (or one this sync created)
                    # is ended so.
                    call_with_retry(functools.partial(sink.close, status), policy,
                                    functools.partial(_at, deadline), _quiet)
            except Exception as exc:
                out.error = str(exc) or repr(exc)
            finally:
                with contextlib.suppress(Exception):
                    sink.release()
        done = all(journal.cursor(c) >= journal.last_seq for c in journal.consumers)
        if done:
            journal.compact()
    if done:
        shutil.rmtree(run / "journal", ignore_errors=True)
        with contextlib.suppress(OSError):
            (run / "run.json").unlink()
        with contextlib.suppress(OSError):
            run.rmdir()
    return results


def _at(deadline: float) -> float:
    return deadline


def _quiet(exc: BaseException) -> None:
    """Retries during a sync are silent; the outcome is reported per sink."""


def _write(sink: Sink, batch: Batch, policy: RetryPolicy, deadline: float) -> int:
    """Store ``batch``, isolating refused records; how many were refused. Raises when a
    retryable failure outlasts ``deadline`` (nothing after it is written)."""
    try:
        call_with_retry(lambda: sink.write(batch), policy, functools.partial(_at, deadline),
                        _quiet)
    except Exception as exc:
        if is_retryable(exc) or getattr(exc, "whole_batch", False):
            raise  # not about these records (down, no permission, no run): keep them
        if len(batch) > 1:
            mid = len(batch) // 2
            return (_write(sink, batch[:mid], policy, deadline)
                    + _write(sink, batch[mid:], policy, deadline))
        return len(batch)
    return 0
