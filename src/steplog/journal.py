"""A durable, append-only journal of encoded batches: checksummed frames in segment files,
per-consumer cursors, and a replay that skips damage instead of failing on it.

On disk (format version 1, every integer little-endian; see ``docs/journal.md``)::

    <directory>/                      mode 0700
      lock                            empty; the open Journal holds flock(LOCK_EX) on it
      00000000000000000001.seg        a segment, named by the sequence number of its first frame
      cursor.<consumer>               what <consumer> acknowledged: ASCII decimal seq + "\\n"

    segment  = header (16 bytes) + frames
      header = b"STEPLOGJ" | u32 version (1) | u32 reserved (0)
    frame    = header (24 bytes) + payload
      header = b"SLFR" | u32 payload length | u64 seq | u32 crc32(payload)
               | u32 crc32(the 20 header bytes before it)

Checksums are ``zlib.crc32`` (CRC-32/ISO-HDLC, as in zip and PNG). The journal writes nothing
but these frames (the caller's payload bytes, unchanged), cursors and the empty lock file.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import itertools
import os
import re
import struct
import threading
import time
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

import msgspec

from steplog.errors import SteplogWarning
from steplog.paths import fsync_path, write_all

__all__ = [
    "NEWER_FORMAT",
    "ConsumerSummary",
    "Durability",
    "Journal",
    "JournalError",
    "JournalFullError",
    "JournalLockedError",
    "JournalSummary",
    "JournalView",
]

Durability = Literal["none", "flush", "always"]
"""How far an appended frame gets before the call returns.

``"none"``: the OS (the page cache): a crash or ``kill -9`` of the process loses nothing, a power
loss or kernel crash may lose what the OS had not written back. ``"flush"`` (the default): as
``"none"``, and ``sync()`` and ``close()`` fsync, so everything appended before them is on disk.
``"always"``: every ``append`` fdatasyncs before it returns."""

SEGMENT_MAGIC = b"STEPLOGJ"
FRAME_MAGIC = b"SLFR"
VERSION = 1
SEGMENT_HEADER_BYTES = 16
FRAME_HEADER_BYTES = 24
MAX_PAYLOAD_BYTES = 2**32 - 1
DEFAULT_SEGMENT_BYTES = 64 * 2**20
MIN_SEGMENT_BYTES = SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + 1
MIN_MAX_BYTES = SEGMENT_HEADER_BYTES

_SEGMENT_HEADER = struct.Struct("<8sII")
_FRAME_HEAD = struct.Struct("<4sIQI")  # the 20 bytes that the header checksum covers
_U32 = struct.Struct("<I")
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
_CONSUMER = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
_CURSOR_PREFIX = "cursor."
_CURSOR_TMP = re.compile(r"^\.cursor\..*\.tmp$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_BUFFER = 1 << 20
_SCAN_CHUNK = 1 << 20
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_LOCK_TRIES = 50
"""Tries at the directory's lock, 1 ms apart: a :attr:`JournalView.held` that holds it for an
instant must not make an open fail."""

_Report = Callable[[Path, int, str], None]


class JournalError(Exception):
    """The journal could not do what was asked; the files are as they were before the call."""


class JournalFullError(JournalError):
    """An append did not fit (the ``max_bytes`` budget, or the file system is full).

    No byte of the frame stays on disk. Appends succeed again once ``compact()`` (after
    acknowledgements) or the file system frees room: with ``max_bytes`` a segment holds at most
    a quarter of it (a larger frame gets one of its own), and every segment the consumers
    acknowledged whole can go (see :meth:`Journal.compact`)."""


class JournalLockedError(JournalError):
    """Another open journal, in this process or another one, holds the directory."""


class ConsumerSummary(msgspec.Struct, frozen=True):
    """What one consumer acknowledged (``cursor``, a seq) and how many readable frames follow."""

    cursor: int
    pending: int


class JournalSummary(msgspec.Struct, frozen=True):
    """A journal at a glance: readable frames, their seq range, bytes on disk, consumers.

    ``bytes`` counts the segment files (cursors and the lock file are a few bytes more);
    ``first_seq`` and ``last_seq`` are 0 when no frame is readable."""

    directory: str
    durability: str
    segments: int
    bytes: int
    frames: int
    first_seq: int
    last_seq: int
    consumers: dict[str, ConsumerSummary]


NEWER_FORMAT = "which this steplog cannot read"
"""How the report of a segment in another format version reads (not damage: a steplog that
reads that version delivers it)."""


def _segment_path(directory: Path, first_seq: int) -> Path:
    return directory / f"{first_seq:020d}.seg"


def _header_ok(buf: bytes, at: int) -> bool:
    """``buf[at:at + 24]`` is a frame header: the magic, and its own checksum matches."""
    return (len(buf) >= at + FRAME_HEADER_BYTES and buf[at:at + 4] == FRAME_MAGIC
            and zlib.crc32(buf[at:at + 20]) == _U32.unpack_from(buf, at + 20)[0])


def _find_frame(f: BinaryIO, start: int, end: int) -> int | None:
    """The offset of the first valid frame header in ``[start, end)``, or None."""
    pos = start
    while end - pos >= FRAME_HEADER_BYTES:
        f.seek(pos)
        chunk = f.read(min(_SCAN_CHUNK, end - pos))
        last = len(chunk) - FRAME_HEADER_BYTES  # headers starting later need the next chunk
        if last < 0:
            return None
        i = chunk.find(FRAME_MAGIC, 0, last + 4)
        while i >= 0:
            if _header_ok(chunk, i):
                return pos + i
            i = chunk.find(FRAME_MAGIC, i + 1, last + 4)
        pos += last + 1
    return None


def _segment_frames(path: Path, *, limit: int | None, after: int, report: _Report,
                    start: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """(seq, end offset, payload) of every valid frame of one segment with seq > ``after``,
    from byte ``start`` (a frame boundary) when it is past the segment header.

    Reads at most ``limit`` bytes (what the writer has completed). Damage is passed to
    ``report`` and skipped: a bad segment header (frames are still looked for), a frame header
    that fails its checksum (reading resumes at the next valid frame header), a payload that
    fails its checksum (skipped by its length, which the header checksum vouches for), a
    frame cut short by the end of the file, a seq not above the one before it. Never raises
    for damage; a segment removed meanwhile (compacted) yields nothing."""
    try:
        f = open(path, "rb", buffering=_READ_BUFFER)  # noqa: SIM115 (closed by the with below)
    except FileNotFoundError:
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        end = size if limit is None else min(size, limit)
        if limit is not None and size < limit:
            report(path, size, f"the segment ends at byte {size} but {limit} bytes were "
                               "written to it: it was truncated")
        if end == 0:
            return
        head = f.read(SEGMENT_HEADER_BYTES)
        pos = SEGMENT_HEADER_BYTES
        if len(head) < SEGMENT_HEADER_BYTES or not head.startswith(SEGMENT_MAGIC):
            report(path, 0, "no valid segment header (looking for frames in it anyway)")
            pos = 0
            found = _find_frame(f, 0, end)
            if found is None:
                return
            pos = found
            f.seek(pos)
        else:
            version = _SEGMENT_HEADER.unpack(head)[1]
            if version != VERSION:
                report(path, 0, f"format version {version}, {NEWER_FORMAT}: segment skipped")
                return
        if start > pos:
            pos = start
            f.seek(pos)
        prev = 0
        while pos < end:
            if end - pos < FRAME_HEADER_BYTES:
                report(path, pos, f"{end - pos} bytes after the last whole frame are not a "
                                  "frame (a write cut short): skipped")
                return
            header = f.read(FRAME_HEADER_BYTES)
            if not _header_ok(header, 0):
                found = _find_frame(f, pos + 1, end)
                if found is None:
                    report(path, pos, f"{end - pos} bytes hold no valid frame (a write cut "
                                      "short, or corruption): skipped")
                    return
                report(path, pos, f"{found - pos} corrupt bytes before the next valid frame: "
                                  "skipped")
                pos = found
                f.seek(pos)
                continue
            _, n, seq, crc = _FRAME_HEAD.unpack_from(header)
            frame_end = pos + FRAME_HEADER_BYTES + n
            if frame_end > end:
                report(path, pos, f"frame {seq} is cut short ({end - pos - FRAME_HEADER_BYTES} "
                                  f"of its {n} payload bytes; a torn write or a truncated "
                                  "segment): skipped")
                return
            if seq <= prev:
                report(path, pos, f"frame {seq} follows frame {prev}: out of order, skipped")
                f.seek(n, os.SEEK_CUR)
                pos = frame_end
                continue
            prev = seq
            if seq <= after:
                f.seek(n, os.SEEK_CUR)
                pos = frame_end
                continue
            payload = f.read(n)
            pos = frame_end
            if len(payload) < n:  # the file shrank while we read it
                report(path, pos, f"frame {seq} is cut short: skipped")
                return
            if zlib.crc32(payload) != crc:
                report(path, pos - n - FRAME_HEADER_BYTES,
                       f"frame {seq} fails its checksum (crc32 of {n} payload bytes): skipped")
                continue
            yield seq, frame_end, payload


class Journal:
    """An append-only journal of encoded batches in one directory, owned by one open instance.

    Thread-safe: ``append``, ``ack``, ``compact`` and ``read`` may be called from different
    threads. Create one with :meth:`open`. A child made by ``fork()`` does not inherit it: its
    copies of the files are closed there, so a child that outlives the journal's close (a
    pool's worker) never keeps the directory locked."""

    def __init__(self, directory: str | os.PathLike[str], *,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, max_bytes: int | None = None,
                 durability: Durability = "flush", create: bool = True) -> None:
        if durability not in ("none", "flush", "always"):
            raise ValueError(f"durability must be 'none', 'flush' or 'always', "
                             f"got {durability!r}")
        if segment_bytes < MIN_SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be at least {MIN_SEGMENT_BYTES}, "
                             f"got {segment_bytes}")
        if max_bytes is not None and max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"max_bytes must be None or at least {MIN_MAX_BYTES}, "
                             f"got {max_bytes}")
        self.directory = Path(directory).absolute()
        if max_bytes is not None:  # room for compact() to free within the budget
            segment_bytes = min(segment_bytes, max(max_bytes // 4, MIN_SEGMENT_BYTES))
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.durability: Durability = durability
        self._lock = threading.Lock()
        self._reported: set[tuple[str, int]] = set()
        self._pid = os.getpid()
        self._segments: list[int] = []  # first seq of each segment, ascending; the last is active
        self._cursors: dict[str, int] = {}
        self._fd = -1  # the active segment, O_APPEND; -1 once closed
        self._active_size = 0
        self._bytes = 0
        self._next_seq = 1
        self._lock_fd = -1
        try:
            self._take_directory(create)
            self._load()
        except BaseException:
            self._close_files()
            raise

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *,
             segment_bytes: int = DEFAULT_SEGMENT_BYTES, max_bytes: int | None = None,
             durability: Durability = "flush", create: bool = True) -> Journal:
        """An open journal in ``directory`` (created 0700 if missing, unless ``create`` is
        false: then a missing directory raises FileNotFoundError), ready to append.

        An existing journal continues after its last valid frame: a torn frame at the end of its
        last segment (the writer was killed mid-append) is cut off, with a warning. Raises
        :class:`JournalLockedError` if another open journal holds the directory.
        ``max_bytes`` also caps a segment at a quarter of it (see :class:`JournalFullError`)."""
        return cls(directory, segment_bytes=segment_bytes, max_bytes=max_bytes,
                   durability=durability, create=create)

    # -- opening ------------------------------------------------------------------------------

    def _take_directory(self, create: bool) -> None:
        if not self.directory.is_dir():
            if not create:
                raise FileNotFoundError(f"no journal at {self.directory}")
            self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            os.chmod(self.directory, _DIR_MODE)  # mkdir's mode is masked by the umask
        lock = self.directory / "lock"
        with _fd_lock:  # no fork sees the file open and the journal not yet known
            fd = self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                         _FILE_MODE)
            _open_journals.add(self)
        for attempt in range(_LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == _LOCK_TRIES - 1:
                    raise JournalLockedError(
                        f"the journal {self.directory} is open elsewhere (another "
                        "process, or another Journal here)") from None
                time.sleep(0.001)
        if not create:
            # The directory may have been removed or renamed (a sync that delivered it
            # whole) between the check above and the lock: the lock must be its own.
            held = os.fstat(fd)
            try:
                now = os.stat(lock)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                raise FileNotFoundError(f"no journal at {self.directory}")

    def _load(self) -> None:
        for entry in os.scandir(self.directory):
            if _CURSOR_TMP.match(entry.name):  # an ack interrupted before its rename
                os.unlink(entry.path)
            elif entry.name.startswith(_CURSOR_PREFIX):
                consumer = entry.name[len(_CURSOR_PREFIX):]
                if _CONSUMER.match(consumer):
                    self._cursors[consumer] = self._read_cursor(Path(entry.path))
            else:
                m = _SEGMENT_NAME.match(entry.name)
                if m:
                    self._segments.append(int(m.group(1)))
        self._segments.sort()
        next_seq = max([1, *(c + 1 for c in self._cursors.values())])
        if self._segments:
            next_seq = max(next_seq, self._open_last_segment())
            self._bytes = sum(self._path(s).stat().st_size for s in self._segments)
        self._next_seq = next_seq
        if self._fd < 0:
            self._new_segment(next_seq)

    def _read_cursor(self, path: Path) -> int:
        seq = _parse_cursor(path)
        if seq is not None:
            return seq
        self._report(path, 0, _BAD_CURSOR)
        return 0

    def _open_last_segment(self) -> int:
        """Open the last segment for appending, cutting off a torn tail; returns the next seq."""
        first = self._segments[-1]
        path = self._path(first)
        problems: list[tuple[Path, int, str]] = []

        def note(where: Path, offset: int, what: str) -> None:
            problems.append((where, offset, what))

        last_seq, good_end = 0, SEGMENT_HEADER_BYTES
        for seq, end, _ in _segment_frames(path, limit=None, after=0, report=note):
            last_seq, good_end = seq, end
        with open(path, "rb") as f:
            head = f.read(SEGMENT_HEADER_BYTES)
        size = path.stat().st_size
        fresh = len(head) < SEGMENT_HEADER_BYTES and SEGMENT_MAGIC.startswith(head[:8])
        ours = head == _SEGMENT_HEADER.pack(SEGMENT_MAGIC, VERSION, 0)
        if not ours and not fresh:
            # Not a segment we may append to: report its damage, leave it, start a new one.
            for p in problems:
                self._report(*p)
            return max(first + 1, last_seq + 1)
        for p in problems:
            if p[1] < good_end and not fresh:
                self._report(*p)
        with _fd_lock:
            fd = self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if fresh:  # the writer died while creating it: it holds no frame
            os.ftruncate(fd, 0)
            write_all(fd, _SEGMENT_HEADER.pack(SEGMENT_MAGIC, VERSION, 0))
        elif size > good_end:
            os.ftruncate(fd, good_end)
            self._report(path, good_end, f"{size - good_end} bytes after the last whole "
                                         "frame (a write cut short) were removed")
        self._active_size = os.fstat(fd).st_size
        return max(first, last_seq + 1)

    # -- appending ----------------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Append ``payload`` as one frame and return its sequence number.

        When this returns the frame is whole in the OS (and on disk with ``"always"``); when it
        raises, no byte of it is on disk. Raises :class:`JournalFullError` when the frame
        exceeds ``max_bytes`` or the file system is full, and the OSError of any other failed
        write."""
        n = len(payload)
        frame_bytes = FRAME_HEADER_BYTES + n
        with self._lock:
            self._check_open()
            if n > MAX_PAYLOAD_BYTES:
                raise ValueError(f"a frame holds at most {MAX_PAYLOAD_BYTES} bytes, got {n}")
            roll = (self._active_size + frame_bytes > self.segment_bytes
                    and self._active_size > SEGMENT_HEADER_BYTES)
            needed = frame_bytes + (SEGMENT_HEADER_BYTES if roll else 0)
            if self.max_bytes is not None and self._bytes + needed > self.max_bytes:
                raise JournalFullError(
                    f"journal {self.directory}: a frame of {frame_bytes} bytes does not fit the "
                    f"disk budget max_bytes={self.max_bytes} ({self._bytes} bytes in use); "
                    "acknowledge and compact() to free room")
            seq = self._next_seq
            if roll:
                self._new_segment(seq)
            head = _FRAME_HEAD.pack(FRAME_MAGIC, n, seq, zlib.crc32(payload))
            header = head + _U32.pack(zlib.crc32(head))
            before = self._active_size
            try:
                written = os.writev(self._fd, (header, payload))
                if written < frame_bytes:  # a short write: the disk is filling up
                    write_all(self._fd, memoryview(header + bytes(payload))[written:])
                if self.durability == "always":
                    os.fdatasync(self._fd)
            except BaseException as exc:
                self._truncate_to(before)
                if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                    raise JournalFullError(f"journal {self.directory}: the file system is full "
                                           f"({os.strerror(exc.errno)}); the frame of "
                                           f"{frame_bytes} bytes was not written") from exc
                raise
            self._next_seq = seq + 1
            self._active_size = before + frame_bytes
            self._bytes += frame_bytes
            return seq

    def _new_segment(self, first_seq: int) -> None:
        """Start the segment whose first frame will be ``first_seq`` and make it the active one."""
        path = self._path(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                     _FILE_MODE)
        # Everything that can fail comes before the switch: a failure leaves the journal on
        # its old segment, as it was, and no new file behind.
        try:
            write_all(fd, _SEGMENT_HEADER.pack(SEGMENT_MAGIC, VERSION, 0))
            if self.durability != "none":
                if self._fd >= 0:
                    os.fsync(self._fd)  # the finished segment is whole on disk before we leave
                self._sync_directory()
        except BaseException as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                raise JournalFullError(f"journal {self.directory}: the file system is full "
                                       f"({os.strerror(exc.errno)}); no new segment") from exc
            raise
        with _fd_lock:
            old, self._fd = self._fd, fd
            if old >= 0:
                os.close(old)
        self._segments.append(first_seq)
        self._active_size = SEGMENT_HEADER_BYTES
        self._bytes += SEGMENT_HEADER_BYTES

    def _truncate_to(self, size: int) -> None:
        """Cut a failed append off the active segment (best effort: the error raised is the
        append's; a later read skips whatever a failed truncate left, with a warning)."""
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            self._bytes += os.fstat(self._fd).st_size - size
            self._active_size = os.fstat(self._fd).st_size

    def sync(self) -> int:
        """Make every frame appended before the call durable; return the last appended seq.

        Durable means on disk for ``"flush"`` and ``"always"``, in the OS for ``"none"``
        (which never fsyncs). Returns 0 when the journal holds no frame."""
        with self._lock:
            self._check_open()
            if self.durability != "none":
                os.fdatasync(self._fd)
            return self._next_seq - 1

    # -- reading ------------------------------------------------------------------------------

    def read(self, after: int = 0) -> Iterator[tuple[int, bytes]]:
        """Every valid frame appended before this call with seq > ``after``: (seq, payload).

        In seq order, across segments. Damage (a torn or truncated frame, a failed checksum, a
        truncated segment) is skipped with one :class:`~steplog.errors.SteplogWarning` per
        problem and reading goes on with the next valid frame; it never raises for damage."""
        return (frame[:2] for frame in self.read_from(after))

    def read_from(self, after: int = 0, position: tuple[int, int] | None = None,
                  problems: list[str] | None = None
                  ) -> Iterator[tuple[int, bytes, tuple[int, int]]]:
        """As :meth:`read`, with each frame's position (its segment, the byte after it).

        ``position``: the one yielded with frame ``after`` by an earlier pass; this pass then
        starts right after that frame instead of at the start of its segment (a reader that
        follows the journal as it grows reads each byte once). ``problems``: each piece of
        damage met is appended there (a description naming the file and byte) instead of
        being warned about."""
        with self._lock:
            self._check_open()
            segments = list(self._segments)
            active_end = self._active_size
        start = 0
        offset = 0
        if position is not None and position[0] in segments:
            start = segments.index(position[0])
            offset = position[1]
        else:
            for i in range(len(segments) - 1):
                if segments[i + 1] - 1 <= after:  # every seq this segment may hold is <= after
                    start = i + 1
        return self._frames(segments[start:], active_end, after, offset, problems)

    def _frames(self, segments: list[int], active_end: int, after: int, offset: int = 0,
                problems: list[str] | None = None
                ) -> Iterator[tuple[int, bytes, tuple[int, int]]]:
        last = len(segments) - 1
        previous = 0  # the last seq yielded
        damaged = False  # a problem was reported since then

        def report(path: Path, offset: int, what: str) -> None:
            nonlocal damaged
            damaged = True
            tell(path, offset, what)

        def tell(path: Path, offset: int, what: str) -> None:
            if problems is None:
                self._report(path, offset, what)
            else:
                problems.append(f"{path}, byte {offset}: {what}")

        for i, first in enumerate(segments):
            path = self._path(first)
            limit = active_end if i == last else None
            for seq, end, payload in _segment_frames(path, limit=limit, after=after,
                                                     report=report, start=offset):
                if (previous and seq > previous + 1 and not damaged
                        and previous + 1 >= self._segments[0]):
                    # Frames went missing without a trace, and not by a compact() that ran
                    # since this read began: a segment was emptied or removed.
                    tell(path, end - len(payload) - FRAME_HEADER_BYTES,
                         f"frames {previous + 1}-{seq - 1} are missing (a segment was "
                         "truncated or removed)")
                after = previous = seq
                damaged = False
                yield seq, payload, (first, end)
            offset = 0

    def _report(self, path: Path, offset: int, what: str) -> None:
        """Warn about one problem at one place, once in this journal's life."""
        key = (path.name, offset)
        if key in self._reported:
            return
        self._reported.add(key)
        warnings.warn(f"steplog journal {path}, byte {offset}: {what}", SteplogWarning,
                      stacklevel=3)

    # -- consumers ----------------------------------------------------------------------------

    def register(self, consumer: str) -> int:
        """``consumer`` counts for ``compact()`` from now on; returns its cursor (0 if new).

        A consumer is also registered by its first ``ack``; registrations survive reopening."""
        with self._lock:
            self._check_open()
            _check_consumer(consumer)
            if consumer not in self._cursors:
                self._write_cursor(consumer, 0)
            return self._cursors[consumer]

    def ack(self, consumer: str, seq: int) -> int:
        """Durably record that ``consumer`` holds every frame up to ``seq``; return its cursor.

        The cursor file is replaced atomically (temp file, fsync, rename, directory fsync;
        the fsyncs are skipped with durability ``"none"``): a crash leaves the old cursor or the
        new one. A cursor never moves back: acknowledging less than it holds changes nothing."""
        with self._lock:
            self._check_open()
            _check_consumer(consumer)
            if not 0 <= seq < self._next_seq:
                raise ValueError(f"seq must be between 0 and the last appended seq "
                                 f"{self._next_seq - 1}, got {seq}")
            current = self._cursors.get(consumer)
            if current is None or seq > current:
                self._write_cursor(consumer, seq)
            return self._cursors[consumer]

    def _write_cursor(self, consumer: str, seq: int) -> None:
        final = self.directory / f"{_CURSOR_PREFIX}{consumer}"
        tmp = self.directory / f".{_CURSOR_PREFIX}{consumer}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _FILE_MODE)
        try:
            try:
                write_all(fd, f"{seq}\n".encode("ascii"))
                if self.durability != "none":
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.durability != "none":
            self._sync_directory()
        self._cursors[consumer] = seq

    def cursor(self, consumer: str) -> int:
        """The last seq ``consumer`` acknowledged (0: none yet); KeyError if never registered."""
        with self._lock:
            if consumer not in self._cursors:
                raise KeyError(f"no consumer {consumer!r} in journal {self.directory} "
                               f"(registered: {sorted(self._cursors)})")
            return self._cursors[consumer]

    @property
    def consumers(self) -> list[str]:
        """The registered consumers, sorted."""
        with self._lock:
            return sorted(self._cursors)

    def pending(self, consumer: str, problems: list[str] | None = None
                ) -> Iterator[tuple[int, bytes]]:
        """Every valid frame ``consumer`` has not acknowledged, as :meth:`read` gives them
        (``problems``: as :meth:`read_from` takes it)."""
        return (frame[:2] for frame in self.read_from(self.cursor(consumer), None, problems))

    # -- housekeeping -------------------------------------------------------------------------

    def compact(self, through: int | None = None) -> int:
        """Remove the segments every registered consumer acknowledged whole; return bytes freed.

        A segment goes only when every seq it can hold (from its first seq to the next
        segment's first seq - 1) is at or below every consumer's cursor. The active (last)
        segment stays, so sequence numbers continue, unless it is larger than
        ``segment_bytes`` (a frame larger than that, or a journal written with larger
        segments) and acknowledged whole: then a new active segment replaces it. With no
        consumer nothing goes, unless ``through`` gives the seq up to which frames are no
        longer needed."""
        with self._lock:
            self._check_open()
            if self._cursors:
                floor = min(self._cursors.values())
            elif through is not None:
                floor = min(through, self._next_seq - 1)
            else:
                return 0
            freed = removed = 0
            for first, following in itertools.pairwise(self._segments):
                if following - 1 > floor:
                    break
                path = self._path(first)
                freed += path.stat().st_size
                path.unlink()
                removed += 1
            if removed:
                del self._segments[:removed]
                self._bytes -= freed
            if self._active_size > self.segment_bytes and floor >= self._next_seq - 1:
                # An active segment larger than a segment may be (a frame larger than one,
                # or written with a larger segment_bytes) that every consumer acknowledged:
                # a new one takes its place, so that it can go as well.
                old = self._segments[-1]
                self._new_segment(self._next_seq)
                path = self._path(old)
                size = path.stat().st_size
                path.unlink()
                self._segments.remove(old)
                self._bytes -= size
                freed += size
                removed += 1
            if removed and self.durability != "none":
                self._sync_directory()
            return freed

    def describe(self) -> JournalSummary:
        """Readable frames, bytes and per-consumer pending frames, read from the files now."""
        seqs = [seq for seq, _ in self.read()]
        with self._lock:
            cursors = dict(self._cursors)
            segments, size = len(self._segments), self._bytes
        consumers = {c: ConsumerSummary(cursor=v, pending=len(seqs) - bisect.bisect_right(seqs, v))
                     for c, v in sorted(cursors.items())}
        return JournalSummary(directory=str(self.directory), durability=self.durability,
                              segments=segments, bytes=size, frames=len(seqs),
                              first_seq=seqs[0] if seqs else 0, last_seq=seqs[-1] if seqs else 0,
                              consumers=consumers)

    @property
    def last_seq(self) -> int:
        """The seq of the last frame appended (0 before the first one)."""
        return self._next_seq - 1

    @property
    def disk_bytes(self) -> int:
        """Bytes of segment files on disk, the figure ``max_bytes`` bounds."""
        return self._bytes

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Sync (unless durability is ``"none"``), close the files and release the directory.

        Closing twice is fine; every other call on a closed journal raises JournalError."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                if self.durability != "none" and self._pid == os.getpid():
                    os.fdatasync(self._fd)
            finally:
                self._close_files()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"last_seq={self.last_seq}"
        return f"<Journal {self.directory} {state}>"

    # -- helpers ------------------------------------------------------------------------------

    def _path(self, first_seq: int) -> Path:
        return _segment_path(self.directory, first_seq)

    def _check_open(self) -> None:
        if os.getpid() != self._pid:
            raise JournalError(f"the journal {self.directory} was opened by process "
                               f"{self._pid}; a forked child cannot use it")
        if self._fd < 0:
            raise JournalError(f"the journal {self.directory} is closed")

    def _close_files(self) -> None:
        """Close the active segment and the lock (releasing the directory)."""
        with _fd_lock:
            _open_journals.discard(self)
            fds = (self._fd, self._lock_fd)
            self._fd = self._lock_fd = -1
            for fd in fds:
                if fd >= 0:
                    with contextlib.suppress(OSError):  # the descriptor is freed anyway
                        os.close(fd)

    def _after_fork_in_child(self) -> None:
        """The child's copies of the files are closed (the parent's stay open and locked); the
        parent's threads do not exist here, so its lock may be held: a new one."""
        self._lock = threading.Lock()
        self._close_files()  # _fd_lock is the forking thread's, which is this one

    def _sync_directory(self) -> None:
        fsync_path(self.directory)


_open_journals: weakref.WeakSet[Journal] = weakref.WeakSet()
_fd_lock = threading.RLock()
"""Held while a journal opens or closes a file and records it; a fork waits for it, so a
child knows exactly which of its inherited descriptors are a journal's."""


def _before_fork() -> None:
    _fd_lock.acquire()


def _after_fork_in_parent() -> None:
    _fd_lock.release()


def _after_fork_in_child() -> None:
    for journal in list(_open_journals):
        journal._after_fork_in_child()  # which leaves the set
    _fd_lock.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def _parse_cursor(path: Path) -> int | None:
    """The seq in a cursor file, None when it holds no sequence number."""
    text = path.read_text(encoding="ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None


_BAD_CURSOR = ("the cursor is not a sequence number: read as 0 (its consumer gets every frame "
               "again)")


class JournalView:
    """A read-only look at a journal directory as its files are now: its frames, its cursors,
    and whether an open :class:`Journal` holds it.

    Writes nothing (a torn tail stays for the next :meth:`Journal.open` to cut off) and takes
    the directory's lock only for an instant, in :attr:`held` (an open that meets it tries
    again), so it can look at the journal of a running logger. Damage is collected in
    :attr:`problems` instead of warned about."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).absolute()
        if not self.directory.is_dir():
            raise FileNotFoundError(f"no journal at {self.directory}")
        self.problems: list[str] = []
        """One line per damaged place found so far."""
        self.cursors: dict[str, int] = {}
        """Each registered consumer's acknowledged seq, as its cursor file says now."""
        self.segments: list[int] = []
        for entry in os.scandir(self.directory):
            m = _SEGMENT_NAME.match(entry.name)
            if m:
                self.segments.append(int(m.group(1)))
            elif (entry.name.startswith(_CURSOR_PREFIX)
                  and _CONSUMER.match(entry.name[len(_CURSOR_PREFIX):])):
                try:
                    seq = _parse_cursor(Path(entry.path))
                except FileNotFoundError:
                    continue  # replaced or removed meanwhile
                if seq is None:
                    self._report(Path(entry.path), 0, _BAD_CURSOR)
                self.cursors[entry.name[len(_CURSOR_PREFIX):]] = seq or 0
        self.segments.sort()

    @property
    def held(self) -> bool:
        """An open :class:`Journal` (a running logger, a sync) holds the directory now."""
        try:
            fd = os.open(self.directory / "lock", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            # Held for no longer than the test: an opener that comes meanwhile is refused
            # only within these two calls.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def read(self, after: int = 0) -> Iterator[tuple[int, bytes]]:
        """Every valid frame with seq > ``after`` in the segment files now: (seq, payload), in
        seq order. Bytes after the last whole frame of the last segment (a write in progress,
        or one a kill cut short) are no frame and no damage."""
        last = len(self.segments) - 1
        previous = 0
        problems: list[tuple[Path, int, str]] = []  # of one segment, not yet reported

        def note(where: Path, offset: int, what: str) -> None:
            problems.append((where, offset, what))

        for i, first in enumerate(self.segments):
            if i < last and self.segments[i + 1] - 1 <= after:
                continue
            path = _segment_path(self.directory, first)
            problems.clear()
            for seq, end, payload in _segment_frames(path, limit=None, after=after,
                                                     report=note):
                if (previous and seq > previous + 1 and not problems
                        and not self._compacted(self.segments[:i])):
                    self._report(path, end - len(payload) - FRAME_HEADER_BYTES,
                                 f"frames {previous + 1}-{seq - 1} are missing (a segment was "
                                 "truncated or removed)")
                for problem in problems:
                    self._report(*problem)
                problems.clear()
                previous = seq
                yield seq, payload
            if i < last:  # what follows the last frame of the last segment is no damage
                for problem in problems:
                    self._report(*problem)

    def _compacted(self, segments: list[int]) -> bool:
        """One of ``segments`` was removed since the view listed them (its journal's owner
        compacted it: what it held was delivered)."""
        return not all(_segment_path(self.directory, s).exists() for s in segments)

    def _report(self, path: Path, offset: int, what: str) -> None:
        line = f"{path}, byte {offset}: {what}"
        if line not in self.problems:
            self.problems.append(line)


def _check_consumer(consumer: str) -> None:
    if not isinstance(consumer, str) or not _CONSUMER.match(consumer):
        raise ValueError(f"a consumer name is 1-64 characters of letters, digits, '_', '-', "
                         f"'.', not starting with '.', got {consumer!r}")
