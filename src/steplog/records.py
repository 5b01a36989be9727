"""Typed records: what the worker hands to sinks.

The hot path never builds these for scalars: it enqueues a plain ``(name, value, step)`` tuple,
and the worker keeps a drained chunk of them as one :class:`Scalars` block (rows sharing one
timestamp; see :mod:`steplog.pipeline` for the bound on that stamp). A sink's ``write`` receives a
:class:`Batch`: a sequence of :class:`Scalar`, :class:`Param` and :class:`Tag` records in call
order, whose :attr:`Batch.parts` let a sink encode whole blocks with one msgspec call instead of
one object per scalar. Rare records (parameters, tags, artifacts) are built at the call and
stamped there.
"""

from __future__ import annotations

import functools
import itertools
import operator
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, overload

import msgspec

__all__ = [
    "Artifact",
    "Batch",
    "MetricRecord",
    "Param",
    "Record",
    "Row",
    "Scalar",
    "Scalars",
    "Tag",
    "now_ms",
    "scalar_objects",
    "stamped_type",
]


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the epoch (MLflow's timestamp unit)."""
    return time.time_ns() // 1_000_000


class Scalar(msgspec.Struct, frozen=True, gc=False):
    """One metric point: ``value`` of ``name`` at ``step``, at ``timestamp`` (ms since epoch)."""

    name: str
    value: float
    step: int
    timestamp: int


class Param(msgspec.Struct, frozen=True):
    """One run parameter: a value fixed for the whole run (JSON-encodable)."""

    name: str
    value: Any
    timestamp: int


class Tag(msgspec.Struct, frozen=True):
    """One run tag: a string label that may be overwritten."""

    name: str
    value: str
    timestamp: int


class Artifact(msgspec.Struct, frozen=True):
    """A file (or in-memory bytes) to store with the run under the relative path ``name``.

    Exactly one of ``source`` (a file or directory on disk) and ``data`` (bytes captured at the
    call) is set. ``move`` means the sink may move ``source`` instead of copying it.
    """

    name: str
    timestamp: int
    source: str | None = None
    data: bytes | None = None
    kind: str = "artifact"
    step: int | None = None
    metadata: dict[str, Any] | None = None
    aliases: list[str] | None = None
    move: bool = False
    cleanup: bool = False
    """The pipeline deletes ``source`` once every sink has it (a staged snapshot of ours)."""
    checkpoint: bool = False
    """A ``save_policy`` checkpoint: ``source`` is a folder holding ``model.pth`` and
    ``meta.json`` (``kind`` alone does not say so: ``log_artifact(type=...)`` sets it)."""

    @staticmethod
    def is_checkpoint(fields: dict[str, Any]) -> bool:
        """Whether the stored fields of an artifact (a manifest line, a kept upload's
        manifest) describe a ``save_policy`` checkpoint; fields written before ``checkpoint``
        was have only ``kind``, and then only ``save_policy`` wrote ``"policy"``."""
        return fields.get("checkpoint", fields.get("kind") == "policy") is True

    @property
    def size(self) -> int:
        """Bytes of the payload (0 when unknown, e.g. a directory)."""
        if self.data is not None:
            return len(self.data)
        return 0


MetricRecord = Scalar | Param | Tag
"""What travels on the metrics lane, in call order."""

Row = tuple[str, float, int]
"""One scalar without its timestamp: ``(name, value, step)``, as ``log_scalar`` queues it."""

_NAME = operator.itemgetter(0)
_VALUE = operator.itemgetter(1)
_STEP = operator.itemgetter(2)


class Scalars(msgspec.Struct, frozen=True, gc=False, repr_omit_defaults=True):
    """Scalars logged between two drains, as rows that share one ``timestamp`` (ms since epoch).

    ``finite`` is True only when every value is known to be finite (a sink may then skip its
    NaN/infinity handling); False means "maybe not". ``encoded``, when set, is this very block
    as :func:`steplog.frames.encode_block` encodes it: whoever encodes the block later (the
    journal, a sink host's wire) copies those bytes instead of reading every row again. The
    rows of a block that carries them never change: a slice or a renamed copy is a new block
    without them (never ``msgspec.structs.replace``). Equality ignores them.
    """

    rows: list[Row]
    timestamp: int
    finite: bool = False
    encoded: bytes | None = None

    def __eq__(self, other: object) -> bool:
        if type(other) is not Scalars:
            return NotImplemented
        return (self.rows == other.rows and self.timestamp == other.timestamp
                and self.finite == other.finite)

    __hash__ = None  # type: ignore[assignment]  # rows are a list: never hashable

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice) -> Scalars:
        return Scalars(self.rows[index], self.timestamp, self.finite)

    def records(self) -> Iterator[Scalar]:
        """The rows as :class:`Scalar` records (one object each: for sinks that want them)."""
        rows = self.rows
        return map(Scalar, map(_NAME, rows), map(_VALUE, rows), map(_STEP, rows),
                   itertools.repeat(self.timestamp))

    def names(self) -> set[str]:
        return set(map(_NAME, self.rows))


Part = Scalars | MetricRecord
"""A piece of a :class:`Batch`: a block of scalars, or one record."""


def _part_len(part: Part) -> int:
    return len(part.rows) if type(part) is Scalars else 1


class Batch(Sequence[MetricRecord]):
    """Metric records in call order, held as :attr:`parts` (:class:`Scalars` blocks and single
    records). Indexing and iteration give :class:`Scalar`/:class:`Param`/:class:`Tag` records,
    built on demand; slicing gives a :class:`Batch` without building any record."""

    __slots__ = ("_size", "parts")

    def __init__(self, parts: Iterable[Part] = ()) -> None:
        self.parts: list[Part] = list(parts)
        self._size = sum(map(_part_len, self.parts))

    @classmethod
    def of(cls, records: Sequence[MetricRecord]) -> Batch:
        """``records`` as a batch (itself when it is one already)."""
        return records if type(records) is Batch else cls(records)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[MetricRecord]:
        for part in self.parts:
            if isinstance(part, Scalars):
                yield from part.records()
            else:
                yield part

    @overload
    def __getitem__(self, index: int) -> MetricRecord: ...

    @overload
    def __getitem__(self, index: slice) -> Batch: ...

    def __getitem__(self, index: int | slice) -> MetricRecord | Batch:
        if isinstance(index, slice):
            start, stop, stride = index.indices(self._size)
            if stride != 1:
                raise ValueError("a Batch slices with step 1 only")
            return self._range(start, stop)
        if index < 0:
            index += self._size
        if not 0 <= index < self._size:
            raise IndexError("Batch index out of range")
        for part in self.parts:
            if isinstance(part, Scalars):
                if index < len(part.rows):
                    name, value, step = part.rows[index]
                    return Scalar(name, value, step, part.timestamp)
                index -= len(part.rows)
            elif index == 0:
                return part
            else:
                index -= 1
        raise AssertionError("unreachable")

    def _range(self, start: int, stop: int) -> Batch:
        out: list[Part] = []
        pos = 0
        for part in self.parts:
            if pos >= stop:
                break
            n = _part_len(part)
            if pos + n > start:
                if type(part) is Scalars and (start > pos or stop < pos + n):
                    part = part[max(0, start - pos) : stop - pos]
                out.append(part)
            pos += n
        return Batch(out)

    def renamed(self, rename: Callable[[str], str]) -> Batch:
        """The same records with every scalar's name passed through ``rename`` (params and tags
        unchanged)."""
        parts: list[Part] = []
        for part in self.parts:
            if type(part) is Scalars:
                rows = part.rows
                names = map(rename, map(_NAME, rows))
                parts.append(Scalars(list(zip(names, map(_VALUE, rows), map(_STEP, rows),
                                              strict=True)), part.timestamp, part.finite))
            elif type(part) is Scalar:
                parts.append(Scalar(rename(part.name), part.value, part.step, part.timestamp))
            else:
                parts.append(part)
        return Batch(parts)

    def extend(self, other: Batch) -> None:
        """Append the records of ``other``."""
        self.parts += other.parts
        self._size += other._size

    def names(self) -> set[str]:
        """Every metric, param and tag name in the batch."""
        names: set[str] = set()
        for part in self.parts:
            if isinstance(part, Scalars):
                names |= part.names()
            else:
                names.add(part.name)
        return names

    def __repr__(self) -> str:
        return f"Batch({len(self)} records in {len(self.parts)} parts)"


def scalar_objects(parts: Sequence[Part], key: str = "name",
                   rename: Callable[[str], str] | None = None) -> tuple[list[Any], bool, bool]:
    """The scalars of a batch's ``parts`` as structs that msgspec encodes as
    ``{key: .., "value": .., "step": .., "timestamp": ..}`` objects, in order, built by one
    C-level pass per block (see :func:`stamped_type`), each name passed through ``rename``
    when given; whether every value is known to be finite; and whether the parts also hold
    params or tags."""
    if rename is None and len(parts) == 1 and type(parts[0]) is Scalars:  # the common case
        block = parts[0]
        return list(itertools.starmap(stamped_type(block.timestamp, key), block.rows)), \
            block.finite, False
    objects: list[Any] = []
    finite = True
    settings = False
    for part in parts:
        if isinstance(part, Scalars):
            stamped = stamped_type(part.timestamp, key)
            rows = part.rows
            if rename is None:
                objects += itertools.starmap(stamped, rows)
            else:  # no new row tuples: the renamed names go straight into the structs
                objects += map(stamped, map(rename, map(_NAME, rows)), map(_VALUE, rows),
                               map(_STEP, rows))
            finite = finite and part.finite
        elif isinstance(part, Scalar):
            name = part.name if rename is None else rename(part.name)
            objects.append(stamped_type(part.timestamp, key)(name, part.value, part.step))
            finite = finite and _is_finite(part.value)
        else:
            settings = True
    return objects, finite, settings


def _is_finite(value: Any) -> bool:
    try:
        return bool(value - value == 0)
    except TypeError:
        return False


@functools.lru_cache(maxsize=16)
def stamped_type(timestamp: int, key: str = "name") -> type[msgspec.Struct]:
    """A struct type ``(key, value, step, timestamp=timestamp)`` that msgspec encodes as
    ``{key: .., "value": .., "step": .., "timestamp": ..}``: built from a block's rows with
    ``itertools.starmap`` (the shared timestamp is the field's default), a block becomes
    encodable objects in one C-level pass."""
    return msgspec.defstruct(
        "StampedScalar",
        [("name", str), ("value", float), ("step", int), ("timestamp", int, timestamp)],
        rename={"name": key} if key != "name" else None,
        frozen=True,
        gc=False,
    )

Record = Scalar | Param | Tag | Artifact
