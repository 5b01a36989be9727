"""Journal write and replay rates for batches of msgspec-encoded scalars.

Side by side in one process, alternating rounds: ``Journal.append`` of each batch with each
durability setting, and a plain buffered ``f.write`` of the same bytes to a file (the floor: no
frame, no checksum, no durability). Then a replay of the journal just written (from the page
cache): ``Journal.read`` alone, and with a typed msgspec decode of every batch. A batch is what
steplog's worker holds, a list of ``(name, value, step)`` tuples, encoded once with
``msgspec.msgpack`` before the timed loop (the caller's cost, printed for reference). Reports
scalars/s (wall clock) and ns of CPU per scalar (``time.thread_time``: user and system time of
the appending thread, which excludes waiting for the disk), medians.

    python benchmarks/bench_journal.py [--scalars 1000000] [--rounds 5] [--always-batches 100]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial

import msgspec

from steplog.journal import Durability, Journal

Row = tuple[str, float, int]
NAMES = ["loss/train", "loss/value", "reward/mean", "reward/std", "entropy", "kl", "lr",
         "grad_norm", "episode_length", "fps"]
ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(list[tuple[str, float, int]])

Measure = tuple[float, float]
"""(seconds of wall clock, seconds of this thread's CPU)."""


def make_batches(scalars: int, per_batch: int) -> list[list[Row]]:
    rng = random.Random(0)
    return [[(NAMES[i % len(NAMES)], rng.random(), step)
             for i in range(per_batch)] for step in range(scalars // per_batch)]


def timed(work: Callable[[], object]) -> Measure:
    wall, cpu = time.perf_counter(), time.thread_time()
    work()
    return time.perf_counter() - wall, time.thread_time() - cpu


def floor_write(payloads: list[bytes], where: str) -> Measure:
    def work() -> None:
        with open(os.path.join(where, "plain.bin"), "wb") as f:
            for p in payloads:
                f.write(p)
    return timed(work)


def journal_write(payloads: list[bytes], where: str, *, durability: Durability) -> Measure:
    journal = Journal.open(os.path.join(where, "journal"), durability=durability)

    def work() -> None:
        for p in payloads:
            journal.append(p)
        journal.sync()  # "flush": the one fsync that makes the round durable
    try:
        return timed(work)
    finally:
        journal.close()


def journal_replay(where: str, expected: int, *, decode: bool) -> Measure:
    journal = Journal.open(os.path.join(where, "journal"), durability="none")
    count = 0

    def work() -> None:
        nonlocal count
        if decode:
            for _, payload in journal.read():
                count += len(DECODER.decode(payload))
        else:
            count = sum(len(payload) for _, payload in journal.read())
    try:
        return timed(work)
    finally:
        journal.close()
        assert count == expected, (count, expected)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scalars", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--always-batches", type=int, default=100,
                        help="batches appended with durability 'always' (one fdatasync each)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="steplog-bench-journal-")
    rows: list[tuple[str, int, float, float]] = []
    verdicts: list[str] = []
    try:
        for per_batch in (1_000, 10_000):
            batches = make_batches(args.scalars, per_batch)
            n = len(batches) * per_batch
            payloads: list[bytes] = []
            encode = timed(partial(payloads.extend, map(ENCODER.encode, batches)))
            always = payloads[:args.always_batches]
            mb = sum(map(len, payloads)) / 1e6
            print(f"batches of {per_batch:,} scalars: {len(payloads)} batches, {n:,} scalars, "
                  f"{mb:.1f} MB encoded ({mb * 1e6 / n:.1f} bytes/scalar)")
            contenders: dict[str, tuple[int, Callable[[str], Measure]]] = {
                "f.write (the floor)": (n, partial(floor_write, payloads)),
                "journal, durability none": (n, partial(journal_write, payloads,
                                                        durability="none")),
                "journal, durability flush": (n, partial(journal_write, payloads,
                                                         durability="flush")),
                "journal, durability always": (len(always) * per_batch,
                                               partial(journal_write, always,
                                                       durability="always")),
            }
            results: dict[str, list[Measure]] = {name: [] for name in contenders}
            results["replay: read only"] = []
            results["replay: read + decode"] = []
            for r in range(args.rounds):
                names = list(contenders)
                names = names[r % len(names):] + names[:r % len(names)]  # rotate the order
                for name in names:
                    where = os.path.join(tmp, f"{per_batch}-{r}-{names.index(name)}")
                    os.makedirs(where)
                    count, run = contenders[name]
                    results[name].append(run(where))
                    if name == "journal, durability none":
                        results["replay: read only"].append(
                            journal_replay(where, sum(map(len, payloads)), decode=False))
                        results["replay: read + decode"].append(
                            journal_replay(where, count, decode=True))
                    shutil.rmtree(where)
            counts = {name: c for name, (c, _) in contenders.items()}
            counts["replay: read only"] = counts["replay: read + decode"] = n
            for name, measures in results.items():
                wall = statistics.median(w for w, _ in measures)
                cpu = statistics.median(c for _, c in measures)
                rows.append((name, per_batch, counts[name] / wall, cpu * 1e9 / counts[name]))
            rows.append(("(msgspec encode, the caller's)", per_batch, n / encode[0],
                         encode[1] * 1e9 / n))
            default = next(r for r in rows if r[0] == "journal, durability flush"
                           and r[1] == per_batch)
            rate_ok = "meets" if default[2] >= 3_000_000 else "MISSES"
            cpu_ok = "meets" if default[3] <= 50 else "MISSES"
            verdicts.append(f"target, batches of {per_batch:,}: journal (default 'flush') >= "
                            f"3,000,000 scalars/s -> {default[2]:,.0f}/s ({rate_ok}); "
                            f"<= 50 ns CPU per scalar -> {default[3]:.1f} ns ({cpu_ok})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'contender':34} {'batch':>7} {'scalars/s':>14} {'CPU ns/scalar':>14}")
    for name, per_batch, rate, ns in rows:
        print(f"{name:34} {per_batch:7,} {rate:14,.0f} {ns:14.1f}")
    print(f"(medians of {args.rounds} rounds; 'always' appends {args.always_batches} batches; "
          "'flush' syncs once at the end of each round)")
    for v in verdicts:
        print(v)


if __name__ == "__main__":
    main()
