"""Several ``log-batch`` requests in flight for one run, no two of them carrying the same key.

A batch of scalars is cut into at most ``ways`` *streams* whose key sets are disjoint (each key's
points keep their call order inside its stream), balanced by point count. The REST transport sends
each stream's requests one after the other on its own connection, the streams at once.

Why key-disjoint: MLflow stores a point as a row keyed by all its fields, so the ``metrics`` table
does not care which request lands first; but ``latest_metrics`` holds one row per key that each
request reads, compares by ``(step, timestamp, value)`` and rewrites. MLflow locks that row only
when it exists already: two transactions creating the same key's row collide (an integrity error,
then MLflow's fallback or an HTTP 500), can deadlock each other on PostgreSQL, and on stores
without that lock (sqlite servers, other MLflow versions) may leave an older point as the latest.
With disjoint keys every key sees exactly the sequence of requests that one request at a time
would send, whatever the store's isolation; only requests of different keys overlap.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import cast

from steplog.records import Batch, Row, Scalar, Scalars
from steplog.sinks.mlflow.common import MAX_METRICS_PER_REQUEST, Chunk

__all__ = ["key_streams", "scalars_only"]


def scalars_only(batch: Batch) -> bool:
    """True when ``batch`` holds metric points only (no params or tags, whose requests keep
    the batch's order: a tag's later value must win)."""
    return all(type(p) is Scalars or type(p) is Scalar for p in batch.parts)


def key_streams(batch: Batch, ways: int) -> list[list[Chunk]]:
    """The scalars of ``batch`` as at most ``ways`` lists of requests (chunks of at most
    1000 points), no key in two lists, each key's points in call order; keys go to the least
    loaded list, largest first. One list when ``batch`` has a single key or ``ways`` is 1.

    Points of different keys may change places (MLflow applies a request's metrics as a set);
    one pass over the rows groups them by key, the blocks of a list are one per key and drain.
    """
    blocks: list[tuple[Scalars, dict[str, list[Row]]]] = []
    counts: dict[str, int] = {}
    for part in batch.parts:
        if type(part) is not Scalars:
            one = cast(Scalar, part)
            part = Scalars([(one.name, one.value, one.step)], one.timestamp)
        groups: collections.defaultdict[str, list[Row]] = collections.defaultdict(list)
        for row in part.rows:
            groups[row[0]].append(row)
        blocks.append((part, groups))
        for key, rows in groups.items():
            counts[key] = counts.get(key, 0) + len(rows)
    if ways <= 1 or len(counts) <= 1:
        return [_requests(batch)]
    loads = [0] * min(ways, len(counts))
    lane: dict[str, int] = {}
    for key, n in sorted(counts.items(), key=_minus_count):  # stable: ties in first-seen order
        i = loads.index(min(loads))
        lane[key] = i
        loads[i] += n
    parts: list[list[Scalars]] = [[] for _ in loads]
    for block, grouped in blocks:
        for key, rows in grouped.items():
            parts[lane[key]].append(Scalars(rows, block.timestamp, block.finite))
    return [_requests(Batch(p)) for p in parts]


def _minus_count(item: tuple[str, int]) -> int:
    return -item[1]


def _requests(batch: Batch) -> list[Chunk]:
    step = MAX_METRICS_PER_REQUEST
    return [Chunk(cast("Sequence[Scalar]", batch[i : i + step]))
            for i in range(0, len(batch), step)]
