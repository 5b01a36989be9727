"""The journal: frames come back as appended, damage is skipped with a warning, cursors are
durable, compaction never removes an unacknowledged frame, a full disk leaves no partial frame."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steplog.errors import SteplogWarning
from steplog.journal import (
    FRAME_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
    ConsumerSummary,
    Journal,
    JournalError,
    JournalFullError,
    JournalLockedError,
    JournalView,
)

ONE_FRAME_PER_SEGMENT = SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + 1
"""A segment size every frame exceeds: each frame then starts a segment of its own."""

HYPOTHESIS = settings(max_examples=30, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def journal_warnings() -> Iterator[list[str]]:
    """The messages of the SteplogWarnings raised in the block (read them after it)."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    messages.extend(str(w.message) for w in caught if issubclass(w.category, SteplogWarning))


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def make_journal(directory: Path, payloads: list[bytes], **kw: int) -> None:
    with Journal.open(directory, durability="none", **kw) as j:  # type: ignore[arg-type]
        for p in payloads:
            j.append(p)


def read_all(directory: Path, **kw: int) -> list[tuple[int, bytes]]:
    with Journal.open(directory, durability="none", **kw) as j:  # type: ignore[arg-type]
        return list(j.read())


PAYLOADS = [b"first", b"", b"third" * 10, bytes(range(256))]


# -- round trip and sequence numbers ------------------------------------------------------------

def test_appended_frames_read_back_in_order_with_sequence_numbers_from_one(tmp_path) -> None:
    with Journal.open(tmp_path / "j") as j:
        assert [j.append(p) for p in PAYLOADS] == [1, 2, 3, 4]
        assert list(j.read()) == list(enumerate(PAYLOADS, start=1))
        assert j.last_seq == 4


def test_read_after_a_seq_returns_only_the_later_frames(tmp_path) -> None:
    with Journal.open(tmp_path / "j", segment_bytes=ONE_FRAME_PER_SEGMENT) as j:
        for p in PAYLOADS:
            j.append(p)
        assert [s for s, _ in j.read(after=2)] == [3, 4]
        assert list(j.read(after=4)) == []


def test_a_read_sees_the_frames_appended_before_the_call_only(tmp_path) -> None:
    with Journal.open(tmp_path / "j") as j:
        j.append(b"a")
        frames = j.read()
        j.append(b"b")
        assert list(frames) == [(1, b"a")]


def test_a_reopened_journal_continues_after_its_last_frame(tmp_path) -> None:
    make_journal(tmp_path / "j", PAYLOADS)
    with Journal.open(tmp_path / "j") as j:
        assert j.last_seq == 4
        assert j.append(b"fifth") == 5
        assert [s for s, _ in j.read()] == [1, 2, 3, 4, 5]


def test_a_new_segment_starts_when_the_current_one_would_exceed_segment_bytes(tmp_path) -> None:
    frame = FRAME_HEADER_BYTES + 100
    make_journal(tmp_path / "j", [b"x" * 100] * 7, segment_bytes=SEGMENT_HEADER_BYTES + 3 * frame)
    files = segments(tmp_path / "j")
    assert [f.name for f in files] == [f"{s:020d}.seg" for s in (1, 4, 7)]
    sizes = [SEGMENT_HEADER_BYTES + k * frame for k in (3, 3, 1)]
    assert [f.stat().st_size for f in files] == sizes
    assert [s for s, _ in read_all(tmp_path / "j")] == list(range(1, 8))


def test_a_frame_larger_than_segment_bytes_gets_a_segment_of_its_own(tmp_path) -> None:
    make_journal(tmp_path / "j", [b"a", b"b" * 500, b"c"], segment_bytes=100)
    assert len(segments(tmp_path / "j")) == 3
    assert read_all(tmp_path / "j") == [(1, b"a"), (2, b"b" * 500), (3, b"c")]


# -- damage ---------------------------------------------------------------------------------------

@HYPOTHESIS
@given(payloads=st.lists(st.binary(max_size=40), min_size=1, max_size=4))
def test_a_torn_last_frame_is_dropped_with_one_warning_wherever_it_was_cut(
        payloads: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "j"
        make_journal(directory, payloads)
        [segment] = segments(directory)
        whole = segment.read_bytes()
        last_frame = len(whole) - FRAME_HEADER_BYTES - len(payloads[-1])
        for cut in range(last_frame + 1, len(whole)):
            segment.write_bytes(whole[:cut])
            with journal_warnings() as messages:
                frames = read_all(directory)
            assert frames == list(enumerate(payloads[:-1], start=1)), cut
            assert len(messages) == 1, (cut, messages)


def test_appends_after_a_torn_last_frame_continue_from_the_last_whole_one(tmp_path) -> None:
    make_journal(tmp_path / "j", [b"one", b"two"])
    [segment] = segments(tmp_path / "j")
    segment.write_bytes(segment.read_bytes()[:-2])
    with journal_warnings() as messages, Journal.open(tmp_path / "j") as j:
        assert j.append(b"two again") == 2
        assert list(j.read()) == [(1, b"one"), (2, b"two again")]
    assert len(messages) == 1 and "cut short" in messages[0]


def test_a_truncated_segment_in_the_middle_is_skipped_and_later_segments_are_read(
        tmp_path) -> None:
    make_journal(tmp_path / "j", [b"a" * 50, b"b" * 50, b"c" * 50],
                 segment_bytes=ONE_FRAME_PER_SEGMENT)
    middle = segments(tmp_path / "j")[1]
    middle.write_bytes(middle.read_bytes()[:-20])
    with journal_warnings() as messages:
        assert read_all(tmp_path / "j") == [(1, b"a" * 50), (3, b"c" * 50)]
    assert len(messages) == 1 and "cut short" in messages[0]


def test_a_segment_emptied_in_the_middle_is_reported_as_missing_frames(tmp_path) -> None:
    make_journal(tmp_path / "j", [b"a", b"b", b"c"], segment_bytes=ONE_FRAME_PER_SEGMENT)
    segments(tmp_path / "j")[1].write_bytes(b"")
    with journal_warnings() as messages:
        assert read_all(tmp_path / "j") == [(1, b"a"), (3, b"c")]
    assert len(messages) == 1 and "frames 2-2 are missing" in messages[0]


@HYPOTHESIS
@given(middle=st.binary(min_size=1, max_size=60), where=st.floats(0, 1, exclude_max=True))
def test_a_flipped_byte_anywhere_in_a_frame_loses_that_frame_only_with_one_warning(
        middle: bytes, where: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "j"
        make_journal(directory, [b"before", middle, b"after"])
        [segment] = segments(directory)
        data = bytearray(segment.read_bytes())
        start = SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + len(b"before")
        offset = start + int(where * (FRAME_HEADER_BYTES + len(middle)))
        data[offset] ^= 0x5A
        segment.write_bytes(bytes(data))
        with journal_warnings() as messages:
            assert read_all(directory) == [(1, b"before"), (3, b"after")]
        assert len(messages) == 1, messages


def test_each_problem_is_reported_once_however_often_the_journal_is_read(tmp_path) -> None:
    make_journal(tmp_path / "j", [b"a", b"b", b"c"], segment_bytes=ONE_FRAME_PER_SEGMENT)
    middle = segments(tmp_path / "j")[1]
    data = bytearray(middle.read_bytes())
    data[-1] ^= 1
    middle.write_bytes(bytes(data))
    with journal_warnings() as messages, Journal.open(tmp_path / "j") as j:
        for _ in range(3):
            assert [s for s, _ in j.read()] == [1, 3]
    assert len(messages) == 1 and "fails its checksum" in messages[0]


def test_a_damaged_segment_header_keeps_its_frames_and_appends_go_to_a_new_segment(
        tmp_path) -> None:
    make_journal(tmp_path / "j", [b"a", b"b"])
    [segment] = segments(tmp_path / "j")
    segment.write_bytes(b"XXXXXXXX" + segment.read_bytes()[8:])
    with journal_warnings() as messages, Journal.open(tmp_path / "j") as j:
        assert j.append(b"c") == 3
        assert list(j.read()) == [(1, b"a"), (2, b"b"), (3, b"c")]
        assert j.disk_bytes == sum(f.stat().st_size for f in segments(tmp_path / "j"))
    assert len(segments(tmp_path / "j")) == 2
    assert len(messages) == 1 and "no valid segment header" in messages[0]


def test_a_segment_of_an_unknown_format_version_is_skipped(tmp_path) -> None:
    make_journal(tmp_path / "j", [b"a", b"b"], segment_bytes=ONE_FRAME_PER_SEGMENT)
    first = segments(tmp_path / "j")[0]
    data = bytearray(first.read_bytes())
    data[8] = 2
    first.write_bytes(bytes(data))
    with journal_warnings() as messages:
        assert read_all(tmp_path / "j") == [(2, b"b")]
    assert len(messages) == 1 and "format version 2" in messages[0]


def test_a_cursor_that_is_not_a_number_reads_as_zero_with_a_warning(tmp_path) -> None:
    make_journal(tmp_path / "j", [b"a"])
    (tmp_path / "j" / "cursor.mlflow").write_text("garbage")
    with journal_warnings() as messages, Journal.open(tmp_path / "j") as j:
        assert j.cursor("mlflow") == 0
    assert len(messages) == 1 and "not a sequence number" in messages[0]


@HYPOTHESIS
@given(damage=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1,
                                                                             max_size=30)),
                       min_size=1, max_size=4))
def test_reading_never_raises_and_yields_only_original_frames_whatever_the_damage(
        damage: list[tuple[float, bytes]]) -> None:
    payloads = [bytes([k]) * (10 * k) for k in range(1, 9)]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "j"
        make_journal(directory, payloads, segment_bytes=400)
        files = segments(directory)
        for where, garbage in damage:
            victim = files[int(where * len(files))]
            data = bytearray(victim.read_bytes())
            at = int(where * len(files) % 1 * len(data))
            data[at:at + len(garbage)] = garbage
            victim.write_bytes(bytes(data))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SteplogWarning)
            frames = read_all(directory)
        seqs = [s for s, _ in frames]
        assert seqs == sorted(set(seqs))
        assert all(payloads[s - 1] == p for s, p in frames)


# -- durability -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("durability", "after_appends", "after_sync"),
                         [("none", 0, 0), ("flush", 0, 1), ("always", 3, 4)])
def test_durability_sets_when_frames_are_fsynced(tmp_path, monkeypatch, durability: str,
                                                  after_appends: int, after_sync: int) -> None:
    calls: list[int] = []
    with Journal.open(tmp_path / "j", durability=durability) as j:  # type: ignore[arg-type]
        monkeypatch.setattr(os, "fdatasync", calls.append)
        for p in (b"a", b"b", b"c"):
            j.append(p)
        assert len(calls) == after_appends
        assert j.sync() == 3
        assert len(calls) == after_sync
        monkeypatch.undo()


def test_a_full_segment_is_fsynced_before_the_next_one_starts(tmp_path, monkeypatch) -> None:
    synced: list[int] = []
    with Journal.open(tmp_path / "j", segment_bytes=ONE_FRAME_PER_SEGMENT) as j:
        j.append(b"a")
        monkeypatch.setattr(os, "fsync", synced.append)
        j.append(b"b")
        monkeypatch.undo()
    assert len(synced) == 2  # the finished segment, then the directory holding the new one


# -- cursors --------------------------------------------------------------------------------------

def test_a_cursor_survives_reopening(tmp_path) -> None:
    make_journal(tmp_path / "j", PAYLOADS)
    with Journal.open(tmp_path / "j") as j:
        assert j.ack("mlflow", 3) == 3
    with Journal.open(tmp_path / "j") as j:
        assert j.cursor("mlflow") == 3
        assert j.consumers == ["mlflow"]


def test_pending_yields_the_frames_a_consumer_has_not_acknowledged(tmp_path) -> None:
    with Journal.open(tmp_path / "j") as j:
        for p in PAYLOADS:
            j.append(p)
        j.ack("mlflow", 2)
        assert list(j.pending("mlflow")) == [(3, PAYLOADS[2]), (4, PAYLOADS[3])]


def test_a_cursor_never_moves_back(tmp_path) -> None:
    with Journal.open(tmp_path / "j") as j:
        for p in PAYLOADS:
            j.append(p)
        j.ack("mlflow", 3)
        assert j.ack("mlflow", 1) == 3
        assert j.cursor("mlflow") == 3


def test_acknowledging_a_frame_not_yet_appended_is_refused(tmp_path) -> None:
    with Journal.open(tmp_path / "j") as j:
        j.append(b"a")
        with pytest.raises(ValueError, match="last appended seq 1"):
            j.ack("mlflow", 2)


def test_an_unknown_consumer_has_no_cursor(tmp_path) -> None:
    with Journal.open(tmp_path / "j") as j, pytest.raises(KeyError, match="mlflow"):
        j.cursor("mlflow")


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65])
def test_a_consumer_name_cannot_leave_the_directory_or_hide_in_it(tmp_path, name: str) -> None:
    with Journal.open(tmp_path / "j") as j, pytest.raises(ValueError, match="consumer name"):
        j.register(name)


def test_an_ack_that_fails_before_its_rename_leaves_the_previous_cursor(tmp_path,
                                                                       monkeypatch) -> None:
    make_journal(tmp_path / "j", PAYLOADS)
    with Journal.open(tmp_path / "j") as j:
        j.ack("mlflow", 1)

        def crash(src: object, dst: object) -> None:
            raise OSError(errno.EIO, "simulated crash before the rename")

        monkeypatch.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="simulated"):
            j.ack("mlflow", 3)
        monkeypatch.undo()
        assert j.cursor("mlflow") == 1
    with Journal.open(tmp_path / "j") as j:
        assert j.cursor("mlflow") == 1
    assert sorted(p.name for p in (tmp_path / "j").iterdir() if "cursor" in p.name) == [
        "cursor.mlflow"]


def test_a_temp_cursor_left_by_a_crash_is_ignored_and_removed(tmp_path) -> None:
    make_journal(tmp_path / "j", PAYLOADS)
    with Journal.open(tmp_path / "j") as j:
        j.ack("mlflow", 1)
    (tmp_path / "j" / ".cursor.mlflow.tmp").write_text("4\n")
    with Journal.open(tmp_path / "j") as j:
        assert j.cursor("mlflow") == 1
    assert not (tmp_path / "j" / ".cursor.mlflow.tmp").exists()


# -- compaction -----------------------------------------------------------------------------------

def test_compact_removes_only_segments_every_consumer_acknowledged(tmp_path) -> None:
    with Journal.open(tmp_path / "j", segment_bytes=ONE_FRAME_PER_SEGMENT) as j:
        for p in PAYLOADS:
            j.append(p)
        j.ack("mlflow", 3)
        j.ack("clearml", 2)
        freed = j.compact()
        assert freed == sum(SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + len(p)
                            for p in PAYLOADS[:2])
        assert [s for s, _ in j.read()] == [3, 4]
        assert [s for s, _ in j.pending("clearml")] == [3, 4]


def test_a_read_under_way_skips_the_segments_compacted_meanwhile_silently(tmp_path) -> None:
    with Journal.open(tmp_path / "j", segment_bytes=ONE_FRAME_PER_SEGMENT) as j:
        for p in PAYLOADS:
            j.append(p)
        frames = j.read()
        assert next(frames)[0] == 1
        j.ack("mlflow", 3)
        j.compact()
        with journal_warnings() as messages:
            assert [s for s, _ in frames] == [4]
    assert messages == []


def test_compact_keeps_a_segment_that_holds_an_unacknowledged_frame(tmp_path) -> None:
    with Journal.open(tmp_path / "j") as j:
        for p in PAYLOADS:  # one segment
            j.append(p)
        j.ack("mlflow", 3)
        assert j.compact() == 0
        assert [s for s, _ in j.read()] == [1, 2, 3, 4]


def test_a_registered_consumer_that_never_acknowledged_keeps_every_segment(tmp_path) -> None:
    with Journal.open(tmp_path / "j", segment_bytes=ONE_FRAME_PER_SEGMENT) as j:
        for p in PAYLOADS:
            j.append(p)
        assert j.register("clearml") == 0
        j.ack("mlflow", 4)
        assert j.compact() == 0


def test_compact_without_consumers_removes_nothing(tmp_path) -> None:
    with Journal.open(tmp_path / "j", segment_bytes=ONE_FRAME_PER_SEGMENT) as j:
        for p in PAYLOADS:
            j.append(p)
        assert j.compact() == 0
        assert len(segments(tmp_path / "j")) == 4


def test_compact_keeps_the_active_segment_so_sequence_numbers_continue(tmp_path) -> None:
    with Journal.open(tmp_path / "j", segment_bytes=1000) as j:
        for p in PAYLOADS:
            j.append(p)
        j.ack("mlflow", 4)
        j.compact()
    assert [f.name for f in segments(tmp_path / "j")] == [f"{1:020d}.seg"]
    with Journal.open(tmp_path / "j") as j:
        assert j.append(b"next") == 5


def test_an_acknowledged_active_segment_larger_than_a_segment_is_replaced_and_removed(
    tmp_path,
) -> None:
    with Journal.open(tmp_path / "j", segment_bytes=ONE_FRAME_PER_SEGMENT) as j:
        for p in PAYLOADS:
            j.append(p)
        j.ack("mlflow", 4)
        j.compact()
        assert j.disk_bytes == SEGMENT_HEADER_BYTES
    assert [f.name for f in segments(tmp_path / "j")] == [f"{5:020d}.seg"]  # empty
    with Journal.open(tmp_path / "j") as j:
        assert j.append(b"next") == 5


# -- disk budget and a full disk ------------------------------------------------------------------

def test_an_append_beyond_the_disk_budget_raises_and_leaves_the_journal_whole(tmp_path) -> None:
    frame = FRAME_HEADER_BYTES + 100  # more than a quarter of the budget: a segment each
    budget = 3 * (SEGMENT_HEADER_BYTES + frame) + frame // 2
    with Journal.open(tmp_path / "j", max_bytes=budget) as j:
        for _ in range(3):
            j.append(b"x" * 100)
        with pytest.raises(JournalFullError, match="max_bytes"):
            j.append(b"y" * 100)
        assert j.disk_bytes == 3 * (SEGMENT_HEADER_BYTES + frame)
        assert j.disk_bytes == sum(f.stat().st_size for f in segments(tmp_path / "j"))
        assert j.append(b"small") == 4  # what fits still goes in
    assert sum(f.stat().st_size for f in segments(tmp_path / "j")) <= budget
    with journal_warnings() as messages:
        assert [s for s, _ in read_all(tmp_path / "j")] == [1, 2, 3, 4]
    assert messages == []


def test_appends_resume_once_compact_frees_budget(tmp_path) -> None:
    frame = SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + 100
    with Journal.open(tmp_path / "j", max_bytes=3 * frame,
                      segment_bytes=ONE_FRAME_PER_SEGMENT) as j:
        for _ in range(3):
            j.append(b"x" * 100)
        with pytest.raises(JournalFullError):
            j.append(b"x" * 100)
        j.ack("mlflow", 2)
        j.compact()
        assert j.append(b"x" * 100) == 4


def test_with_a_budget_acknowledged_frames_free_room_even_below_the_segment_size(
    tmp_path,
) -> None:
    # A segment holds at most a quarter of max_bytes: compact() frees all but the active one.
    with Journal.open(tmp_path / "j", max_bytes=1000) as j:
        appended = 0
        with pytest.raises(JournalFullError):
            for _ in range(100):
                j.append(b"x" * 100)
                appended += 1
        j.ack("sink", j.last_seq)
        assert j.compact() > 0
        assert j.disk_bytes <= 1000 // 4
        for _ in range(appended - 2):  # the budget is there again, but for the active segment
            j.append(b"x" * 100)
    assert all(f.stat().st_size <= 1000 // 4 for f in segments(tmp_path / "j"))


def test_an_acknowledged_frame_larger_than_a_segment_frees_its_room_too(tmp_path) -> None:
    with Journal.open(tmp_path / "j", max_bytes=1000) as j:  # segments of 250 bytes
        j.append(b"x" * 600)
        j.ack("sink", 1)
        assert j.compact() > 600
        assert j.append(b"y" * 400) == 2  # fits: the 600 bytes are gone
    assert read_all(tmp_path / "j") == [(2, b"y" * 400)]


def test_a_journal_reopened_with_a_budget_frees_what_its_larger_segments_held(tmp_path) -> None:
    with Journal.open(tmp_path / "j") as j:  # 64 MiB segments
        for _ in range(10):
            j.append(b"x" * 100)
        j.ack("sink", 10)
    with Journal.open(tmp_path / "j", max_bytes=1000) as j:
        assert j.disk_bytes > 1000
        j.compact()
        assert j.disk_bytes == SEGMENT_HEADER_BYTES
        assert j.append(b"y" * 100) == 11


def test_a_full_file_system_raises_journal_full_and_leaves_no_partial_frame(small_fs) -> None:
    appended = 0
    with Journal.open(small_fs / "j") as j:
        with pytest.raises(JournalFullError, match="file system is full") as raised:
            for _ in range(100):
                j.append(b"z" * 3000)
                appended += 1
        assert isinstance(raised.value.__cause__, OSError)
        assert raised.value.__cause__.errno == errno.ENOSPC
        assert 0 < appended < 100
        assert j.disk_bytes == sum(f.stat().st_size for f in segments(small_fs / "j"))
    with journal_warnings() as messages:
        assert read_all(small_fs / "j") == [(s, b"z" * 3000) for s in range(1, appended + 1)]
    assert messages == []


# -- processes ------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from steplog.journal import Journal

    journal = Journal.open(sys.argv[1], segment_bytes=1 << 20, durability="none")
    seq = 0
    while True:
        seq = journal.append(seq.to_bytes(8, "little") * (1 + seq % 2048))
        if seq % 20 == 0:
            print(seq, flush=True)
""")


def expected_payload(seq: int) -> bytes:
    return (seq - 1).to_bytes(8, "little") * (1 + (seq - 1) % 2048)


def test_a_writer_killed_mid_append_leaves_every_completed_frame_readable(tmp_path) -> None:
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "j")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reported = 0
        deadline = time.monotonic() + 60
        assert child.stdout is not None
        while reported < 2000 and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, child.stderr.read() if child.stderr else ""
            reported = int(line)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SteplogWarning)  # a torn last frame is expected
        with Journal.open(tmp_path / "j") as j:
            frames = list(j.read())
            last = j.last_seq
            assert j.append(b"after the crash") == last + 1
    assert reported >= 2000
    assert [s for s, _ in frames] == list(range(1, last + 1))
    assert last >= reported  # every append that had returned before the kill
    assert all(p == expected_payload(s) for s, p in frames)
    assert len(segments(tmp_path / "j")) > 1


def test_a_second_open_of_a_directory_is_refused_until_the_first_closes(tmp_path) -> None:
    first = Journal.open(tmp_path / "j")
    with pytest.raises(JournalLockedError, match="open elsewhere"):
        Journal.open(tmp_path / "j")
    first.close()
    Journal.open(tmp_path / "j").close()


def test_a_forked_child_cannot_append_to_its_parents_journal(tmp_path) -> None:
    with Journal.open(tmp_path / "j") as j:
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the append is refused
            try:
                j.append(b"from the child")
            except JournalError:
                os._exit(0)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert j.append(b"from the parent") == 1


def fork_waiting_child() -> tuple[int, int]:
    """A forked child that has run its fork hooks and lives until the returned pipe end is
    closed: (its pid, that pipe end)."""
    ready_r, ready_w = os.pipe()
    go_on, wait = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(wait)
        os.close(ready_r)
        os.write(ready_w, b"r")  # the hooks ran before fork() returned here
        os.read(go_on, 1)
        os._exit(0)
    os.close(go_on)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    return pid, wait


def test_a_forked_child_that_lives_on_does_not_keep_the_journal_locked(tmp_path) -> None:
    # A pool's worker forked while the journal was open outlives the parent's close: the
    # directory is free for the next open (a sync) at once.
    j = Journal.open(tmp_path / "j")
    j.append(b"a")
    pid, wait = fork_waiting_child()
    try:
        j.close()
        assert not JournalView(tmp_path / "j").held
        with Journal.open(tmp_path / "j") as again:
            assert again.last_seq == 1
    finally:
        os.close(wait)  # the child's read returns
        os.waitpid(pid, 0)


def test_a_fork_while_a_journal_is_being_opened_leaves_the_child_without_its_lock(
    tmp_path, monkeypatch
) -> None:
    # As when another thread forks (a DataLoader starting its workers) while the journal reads
    # its last segment: the child already has the lock's descriptor.
    Journal.open(tmp_path / "j").close()
    children: list[tuple[int, int]] = []
    load = Journal._load

    def load_while_forking(self: Journal) -> None:
        children.append(fork_waiting_child())
        load(self)

    monkeypatch.setattr(Journal, "_load", load_while_forking)
    j = Journal.open(tmp_path / "j")
    monkeypatch.undo()
    try:
        j.close()
        assert not JournalView(tmp_path / "j").held
    finally:
        for pid, wait in children:
            os.close(wait)
            os.waitpid(pid, 0)


def test_asking_a_view_whether_the_journal_is_held_never_makes_an_open_fail(tmp_path) -> None:
    Journal.open(tmp_path / "j").close()
    view = JournalView(tmp_path / "j")
    stop = threading.Event()
    answers = {True: 0, False: 0}

    def ask() -> None:
        while not stop.is_set():
            answers[view.held] += 1

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        for _ in range(300):
            Journal.open(tmp_path / "j").close()
    finally:
        stop.set()
        asker.join(30)
    assert sum(answers.values()) > 300


def test_opening_without_create_refuses_a_missing_directory_and_creates_nothing(
    tmp_path,
) -> None:
    with pytest.raises(FileNotFoundError, match="no journal"):
        Journal.open(tmp_path / "run" / "journal", create=False)
    assert not (tmp_path / "run").exists()


def test_a_failed_sync_when_a_segment_starts_leaves_the_journal_on_its_old_one(
    tmp_path, monkeypatch
) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    with Journal.open(tmp_path / "j", segment_bytes=ONE_FRAME_PER_SEGMENT) as j:
        j.append(b"a")

        def failing(self: Journal) -> None:
            raise OSError(errno.EIO, "the directory's fsync failed")

        monkeypatch.setattr(Journal, "_sync_directory", failing)
        with pytest.raises(OSError, match="fsync failed"):
            j.append(b"b")  # would start the second segment
        monkeypatch.undo()
        assert len(segments(tmp_path / "j")) == 1  # no file left of the new segment
        assert len(os.listdir("/proc/self/fd")) == fds + 2  # its segment and its lock
        assert j.append(b"c") == 2
    assert read_all(tmp_path / "j") == [(1, b"a"), (2, b"c")]
    assert len(os.listdir("/proc/self/fd")) == fds


def test_calls_after_close_raise_and_closing_twice_is_fine(tmp_path) -> None:
    j = Journal.open(tmp_path / "j")
    j.close()
    j.close()
    assert j.closed
    with pytest.raises(JournalError, match="closed"):
        j.append(b"late")
    with pytest.raises(JournalError, match="closed"):
        j.read()


# -- files ----------------------------------------------------------------------------------------

def test_the_directory_and_files_are_owner_only_whatever_the_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        with Journal.open(tmp_path / "runs" / "j") as j:
            j.append(b"a")
            j.ack("mlflow", 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "runs" / "j").stat().st_mode) == 0o700
    for f in (tmp_path / "runs" / "j").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_the_journal_writes_only_frames_cursors_and_an_empty_lock(tmp_path) -> None:
    with Journal.open(tmp_path / "j") as j:
        j.append(b"payload")
        j.ack("mlflow", 1)
    names = sorted(p.name for p in (tmp_path / "j").iterdir())
    assert names == [f"{1:020d}.seg", "cursor.mlflow", "lock"]
    assert (tmp_path / "j" / "cursor.mlflow").read_bytes() == b"1\n"
    assert (tmp_path / "j" / "lock").read_bytes() == b""
    segment = (tmp_path / "j" / names[0]).read_bytes()
    assert segment[SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES:] == b"payload"


def test_describe_counts_frames_bytes_and_what_each_consumer_lacks(tmp_path) -> None:
    with Journal.open(tmp_path / "j") as j:
        for p in PAYLOADS:
            j.append(p)
        j.ack("mlflow", 3)
        j.register("clearml")
        summary = j.describe()
    assert (summary.frames, summary.first_seq, summary.last_seq) == (4, 1, 4)
    assert summary.bytes == SEGMENT_HEADER_BYTES + sum(FRAME_HEADER_BYTES + len(p)
                                                       for p in PAYLOADS)
    assert summary.consumers == {"clearml": ConsumerSummary(cursor=0, pending=4),
                                 "mlflow": ConsumerSummary(cursor=3, pending=1)}


# -- a read-only view ---------------------------------------------------------------------------

def test_a_view_reads_the_frames_and_cursors_of_a_journal_its_owner_holds_open(tmp_path) -> None:
    with Journal.open(tmp_path / "j", durability="none") as j:
        for p in PAYLOADS:
            j.append(p)
        j.ack("mlflow", 2)
        view = JournalView(tmp_path / "j")
        assert view.held
        assert list(view.read()) == list(enumerate(PAYLOADS, start=1))
        assert list(view.read(after=2)) == [(3, PAYLOADS[2]), (4, PAYLOADS[3])]
        assert view.cursors == {"mlflow": 2}
        j.append(b"later")  # the owner keeps appending: a new read sees it
        assert list(view.read(after=4)) == [(5, b"later")]
    assert not view.held


def test_a_view_writes_nothing_and_a_torn_tail_is_no_damage_to_it(tmp_path) -> None:
    make_journal(tmp_path / "j", [b"one", b"two"])
    [segment] = segments(tmp_path / "j")
    segment.write_bytes(segment.read_bytes()[:-2])  # a writer killed mid-append
    (tmp_path / "j" / "lock").unlink()
    before = {p.name: p.read_bytes() for p in (tmp_path / "j").iterdir()}
    view = JournalView(tmp_path / "j")
    with journal_warnings() as messages:
        assert list(view.read()) == [(1, b"one")]
    assert not view.held and view.problems == [] and messages == []
    assert {p.name: p.read_bytes() for p in (tmp_path / "j").iterdir()} == before


def test_a_view_lists_damage_instead_of_warning_about_it(tmp_path) -> None:
    make_journal(tmp_path / "j", [b"a", b"b", b"c"], segment_bytes=ONE_FRAME_PER_SEGMENT)
    segments(tmp_path / "j")[1].write_bytes(b"")
    (tmp_path / "j" / "cursor.mlflow").write_text("x\n")
    view = JournalView(tmp_path / "j")
    with journal_warnings() as messages:
        assert list(view.read()) == [(1, b"a"), (3, b"c")]
        assert list(view.read()) == [(1, b"a"), (3, b"c")]
    assert messages == [] and view.cursors == {"mlflow": 0}
    assert len(view.problems) == 2  # each place once, however often it is read
    assert "cursor is not a sequence number" in view.problems[0]
    assert "frames 2-2 are missing" in view.problems[1]
