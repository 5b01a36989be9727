"""Journal frames: a batch encoded to bytes decodes to an equal batch."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from steplog.frames import count_records, decode_batch, encode_batch, with_encoding
from steplog.records import Batch, Param, Scalar, Scalars, Tag

names = st.text(min_size=1, max_size=20)
values = st.floats(allow_nan=True, allow_infinity=True)
steps = st.integers(min_value=-(2**63), max_value=2**63 - 1)
stamps = st.integers(min_value=0, max_value=2**53)
rows = st.lists(st.tuples(names, values, steps), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)
parts = st.one_of(
    st.builds(Scalars, rows, stamps, st.booleans()),
    st.builds(Param, names, json_values, stamps),
    st.builds(Tag, names, st.text(max_size=10), stamps),
    st.builds(Scalar, names, values, steps, stamps),
)


def same_value(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@given(st.lists(parts, max_size=10))
def test_every_batch_round_trips_in_order(batch_parts: list[object]) -> None:
    batch = Batch(batch_parts)  # type: ignore[arg-type]
    back = decode_batch(encode_batch(batch))
    assert len(back) == len(batch)
    assert [type(p) for p in back.parts] == [type(p) for p in batch.parts]
    for got, want in zip(back, batch, strict=True):
        assert type(got) is type(want)
        assert got.name == want.name and got.timestamp == want.timestamp
        assert same_value(got.value, want.value)
        if isinstance(want, Scalar):
            assert got.step == want.step  # type: ignore[union-attr]


def test_a_block_decodes_as_one_block_with_its_shared_timestamp() -> None:
    block = Scalars([("loss", 0.5, 1), ("loss", float("inf"), 2)], 1234, False)
    (part,) = decode_batch(encode_batch(Batch([block]))).parts
    assert isinstance(part, Scalars)
    assert part.rows == block.rows and part.timestamp == 1234


def test_bytes_that_are_not_a_frame_raise_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_batch(b"\x93\x01\x02")


@given(st.lists(parts, max_size=10))
def test_count_records_says_how_many_records_a_frame_decodes_to(batch_parts: list[object]) -> None:
    batch = Batch(batch_parts)  # type: ignore[arg-type]
    assert count_records(encode_batch(batch)) == len(batch)


@pytest.mark.parametrize("rows", [0, 15, 16, 65_535, 65_536])  # each msgpack array header size
def test_count_records_reads_every_size_of_block(rows: int) -> None:
    block = Scalars([("x", 1.0, i) for i in range(rows)], 1, True)
    assert count_records(encode_batch(Batch([Param("lr", 0.1, 1), block]))) == rows + 1


def test_counting_bytes_that_are_not_a_frame_raises_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        count_records(b"\x93\x01\x02")


@given(st.lists(parts, max_size=10))
def test_blocks_carrying_their_encoding_encode_to_the_same_bytes(batch_parts: list[object]) -> None:
    plain = Batch(batch_parts)  # type: ignore[arg-type]
    carried = Batch([with_encoding(p) if type(p) is Scalars else p  # type: ignore[misc]
                     for p in batch_parts])
    assert encode_batch(carried) == encode_batch(plain)


def test_a_block_carrying_its_encoding_is_encoded_from_those_bytes() -> None:
    block = with_encoding(Scalars([("loss", 0.5, 1)], 7, True))
    # Bytes of another block put in its place show that encoding copies them.
    other = with_encoding(Scalars([("acc", 0.25, 2), ("acc", 0.5, 3)], 8, True))
    swapped = Scalars(block.rows, block.timestamp, block.finite, other.encoded)
    assert decode_batch(encode_batch(Batch([swapped]))).parts == [other]


def test_a_slice_or_a_renamed_block_is_encoded_from_its_own_rows() -> None:
    block = with_encoding(Scalars([("a", 1.0, 1), ("b", 2.0, 2)], 5, True))
    assert block[1:].encoded is None
    assert decode_batch(encode_batch(Batch([block[1:]]))).parts == [block[1:]]
    renamed = Batch([block]).renamed(lambda name: f"rank1/{name}")
    assert decode_batch(encode_batch(renamed)).parts[0].rows == [("rank1/a", 1.0, 1),
                                                                   ("rank1/b", 2.0, 2)]


def test_a_blocks_equality_ignores_whether_it_carries_its_encoding() -> None:
    block = Scalars([("loss", 0.5, 1)], 7, True)
    assert with_encoding(block) == block
    assert with_encoding(block) != Scalars([("loss", 0.5, 2)], 7, True)
