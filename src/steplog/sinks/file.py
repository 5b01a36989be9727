"""The file sink: a run directory of plain files, written incrementally.

Layout under ``output_dir``::

    scalars.jsonl     one JSON object per point: name, value, step, timestamp (ms since epoch)
    parameters.json   every parameter logged so far (rewritten atomically)
    tags.json         every tag logged so far (rewritten atomically)
    artifacts.jsonl   one line per stored artifact: name, kind, step, metadata, aliases, timestamp
                      (and checkpoint: true for a save_policy snapshot)
    scalars.json      written at close, the seed FileLogger's format: {name: [[step, value], ...]}
    run.json          written at close: status and end time
    <artifacts>       files under the names they were logged with
    previous/<time>/  an earlier run's files, moved aside when a new run starts here

``pandas.read_json(path, lines=True)`` reads ``scalars.jsonl``; NaN and infinities are written
as the ``NaN``/``Infinity``/``-Infinity`` tokens that pandas and Python's json module accept.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import msgspec

from steplog.errors import PermanentError, RetryableError, SteplogWarning
from steplog.frames import decode_batch, encode_batch
from steplog.paths import discard, link_or_copy, safe_relpath, write_all
from steplog.records import (
    Artifact,
    Batch,
    MetricRecord,
    Param,
    Scalar,
    Scalars,
    Tag,
    now_ms,
    scalar_objects,
)
from steplog.sinks.base import RunStatus, Sink
from steplog.sinks.placing import TEMP_PREFIX, put_in_place, sibling

if TYPE_CHECKING:
    from steplog.host import Host

__all__ = ["OFFLOAD_ROWS", "RUN_FILES", "Existing", "FileSink", "Offload", "ScalarAppender",
           "scalar_lines"]

Existing = Literal["aside", "append", "error"]
"""What a new run does in a directory that holds an earlier one: move the earlier run's files
into ``previous/<time>/``, continue it, or raise ``FileExistsError``."""

RUN_FILES = (
    "scalars.jsonl", "scalars.json", "parameters.json", "tags.json", "artifacts.jsonl",
    "run.json",
)  # fmt: skip
"""The files of a run that the sink writes itself (artifacts come on top)."""

Offload = Literal["auto", "always", "never"]
"""Where a file sink encodes and writes its scalar lines: in a writer process beside the
training process once batches of ``OFFLOAD_ROWS`` scalars keep coming (``"auto"``),
there from the start (``"always"``), or always on the worker thread (``"never"``)."""

OFFLOAD_ROWS = 10_000
"""Scalars per batch that make an ``"auto"`` file sink start its writer process once such
batches have kept coming for half a second: a batch is a drained chunk, which holds that many
at 50,000 scalars per second with the default drain interval of 0.2 s."""

_HOST_STARTS = 3
"""Writer processes a sink tries to start in all; after that its worker thread writes."""

_OFFLOAD_AFTER_S = 0.5
"""How long batches of ``OFFLOAD_ROWS`` must keep coming before ``"auto"`` starts the writer."""

_WRITER_EXIT_S = 1.0
"""How long a close waits for the writer process to exit before killing it (nothing is in
flight then: an idle writer exits at once)."""

_WRITER_START_WAIT_S = 2.0
"""How long a close waits for a writer start in progress, which then closes the process."""


class _WriterNotGone(Exception):
    """A killed writer process may still append: the file must stay as it is."""


_WRITER_NOT_GONE = ("the file sink's writer process was killed but has not exited yet; the "
                    "batch is written once it has")

_NONFINITE_MARK = b'"value":null'
_ENCODER = msgspec.json.Encoder()


def _write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole, or what it held before: never a partial file."""
    tmp = sibling(path, ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _manifest(manifest: Path) -> list[tuple[str, bool]]:
    """Each upload ``artifacts.jsonl`` lists, in order: its name and whether it is a
    ``save_policy`` checkpoint (a torn or foreign line is skipped)."""
    entries = []
    if manifest.exists():
        for line in manifest.read_bytes().splitlines():
            try:
                entry = json.loads(line)
                entries.append((safe_relpath(entry["name"]), Artifact.is_checkpoint(entry)))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    return entries


def _dump_json_atomic(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=True)
    _write_atomic(path, text.encode("utf-8"))


def scalar_lines(parts: Sequence[Any]) -> tuple[bytes, bool]:
    """The ``scalars.jsonl`` lines of the scalars in a batch's parts, built with one msgspec
    call (see :func:`~steplog.records.scalar_objects`; NaN and infinities as the tokens
    pandas reads), and whether the parts also hold params or tags."""
    scalars, finite, settings = scalar_objects(parts)
    if not scalars:
        return b"", settings
    data = _ENCODER.encode_lines(scalars)
    if not finite and _NONFINITE_MARK in data:
        data = _lines_with_nonfinite(scalars)
    return data, settings


def _lines_with_nonfinite(scalars: list[Any]) -> bytes:
    lines = []
    for r in scalars:
        if math.isfinite(r.value):
            lines.append(_ENCODER.encode(r))
        else:
            row = {"name": r.name, "value": r.value, "step": r.step, "timestamp": r.timestamp}
            lines.append(json.dumps(row, allow_nan=True, separators=(",", ":")).encode())
    lines.append(b"")
    return b"\n".join(lines)


class ScalarAppender:
    """A file sink's writer process (a :class:`~steplog.host.Host` object): encodes the scalars
    of a frame and appends their lines to the sink's ``scalars.jsonl``.

    It opens the file by path and refuses to start when that path no longer names the file the
    sink has open (``device``, ``inode``): a run moved aside, say."""

    def __init__(self, path: str | bytes, device: int, inode: int) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        st = os.fstat(self._fd)
        if (st.st_dev, st.st_ino) != (device, inode):
            os.close(self._fd)
            raise PermanentError(f"{os.fsdecode(path)} is no longer the file the sink writes")

    def size(self) -> int:
        """The file's size in bytes (a call that also says the process is ready)."""
        return os.fstat(self._fd).st_size

    def append(self, frame: bytes) -> None:
        """Append the lines of ``frame``'s scalars."""
        data, _ = scalar_lines(decode_batch(frame).parts)
        write_all(self._fd, data)

    def close(self) -> None:
        os.close(self._fd)


class FileSink(Sink):
    """Writes a run into ``output_dir``, a batch at a time. A write that fails leaves the files
    as they were before it (a partial batch is truncated away), so a retried or split batch
    never duplicates a line, and a crash loses only records not yet written.

    ``offload`` (see :data:`Offload`): at high rates the JSON encoding of the scalars is most of
    the worker's Python work, and it shares the training process's GIL. A writer process (a
    :class:`~steplog.host.Host` running :class:`ScalarAppender`) then takes the batches as
    msgpack frames and encodes and writes them on another core. It starts in the background
    (the worker writes meanwhile) and exits with the training process. When it dies, the sink
    cuts the file back to where the batch began and writes that batch itself, then starts
    another in the background (three in all; then the worker writes). Params, tags and
    artifacts are always written by the sink itself."""

    kind: ClassVar[str] = "file"
    moves_sources: ClassVar[bool] = True
    max_batch = 50_000
    max_batch_age_s = 0.1  # within the default drain interval: each drained chunk is written

    def __init__(self, output_dir: str | os.PathLike[str], *, existing: Existing = "aside",
                 offload: Offload = "auto") -> None:
        if existing not in ("aside", "append", "error"):
            raise ValueError(f"existing must be 'aside', 'append' or 'error', got {existing!r}")
        if offload not in ("auto", "always", "never"):
            raise ValueError(f"offload must be 'auto', 'always' or 'never', got {offload!r}")
        self.output_dir = Path(output_dir).absolute()
        self.existing = existing
        self.offload = offload
        self._encoder = msgspec.json.Encoder()
        self._scalars: Any = None
        self._params: dict[str, Any] = {}
        self._tags: dict[str, str] = {}
        self._stored: dict[str, bool] | None = None
        """The names of the uploads in the run, each with whether a checkpoint was stored under
        it (read from ``artifacts.jsonl`` when first needed)."""
        self.host: Host | None = None
        """The writer process, once one was asked for."""
        self._hosted = False
        """Whether batches go to the writer process (it answered, and has not died since)."""
        self._host_lock = threading.Lock()
        self._starting = False
        self._start_thread: threading.Thread | None = None
        self._closing = False
        self._large_since: float | None = None
        """When the current run of batches of ``OFFLOAD_ROWS`` scalars or more began."""
        self._starts = 0
        """Writer processes this sink tried to start."""
        self._cut_back_to: int | None = None
        """Where the batch a killed, not yet exited, writer was appending began."""

    def describe(self) -> str:
        return str(self.output_dir)

    def target(self) -> dict[str, Any] | None:
        return {"output_dir": str(self.output_dir)}

    @classmethod
    def reattach(cls, target: dict[str, Any]) -> FileSink:
        sink = cls(target["output_dir"], existing="append")
        if not sink.output_dir.is_dir():
            raise FileNotFoundError(f"the run directory {sink.output_dir} is gone")
        return sink

    def prepare(self) -> None:
        """The directory exists and is writable, and an earlier run in it is handled as
        ``existing`` says."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=self.output_dir, prefix=".steplog-probe-")
        os.close(fd)
        os.unlink(probe)
        earlier = [f for f in RUN_FILES if (self.output_dir / f).exists()]
        if not earlier or self.existing == "append":
            return
        if self.existing == "error":
            raise FileExistsError(
                f"{self.output_dir} already holds a run ({', '.join(earlier)}); use another "
                "directory, or existing='aside' to move it aside, or 'append' to continue it"
            )
        where = self._move_aside(earlier)
        warnings.warn(f"{self.output_dir} held an earlier run: moved it to {where}",
                      SteplogWarning, stacklevel=2)

    def _move_aside(self, run_files: list[str]) -> Path:
        """Move the earlier run's files and the artifacts it listed into previous/<time>/."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        dest = self.output_dir / "previous" / stamp
        n = 1
        while dest.exists():
            n += 1
            dest = self.output_dir / "previous" / f"{stamp}-{n}"
        dest.mkdir(parents=True)
        listed = dict.fromkeys(
            list(run_files) + [n for n, _ in _manifest(self.output_dir / "artifacts.jsonl")])
        # An upload inside a folder that is itself listed moves with that folder.
        names = [n for n in listed if not any(a in listed for a in _ancestors(n))]
        for name in names:
            src = self.output_dir / name
            if not src.exists() or name.split("/")[0] == "previous":
                continue
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest / name)
            parent = src.parent
            while parent != self.output_dir and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        return dest

    def open(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # A run continued here (existing="append") is running again: its old end goes.
        (self.output_dir / "run.json").unlink(missing_ok=True)
        for attr, fname in (("_params", "parameters.json"), ("_tags", "tags.json")):
            path = self.output_dir / fname
            if path.is_file():  # appending to an earlier run: merge
                setattr(self, attr, json.loads(path.read_text(encoding="utf-8")))
        path = self.output_dir / "scalars.jsonl"
        _drop_torn_tail(path)
        # Unbuffered: a failed write leaves nothing in a buffer that a later write would flush.
        self._scalars = open(path, "ab", buffering=0)  # noqa: SIM115
        if self.offload == "always":
            self._start_host()

    def write(self, records: Sequence[MetricRecord]) -> None:
        """Append the batch's scalars and store its params and tags, all or nothing.

        The scalars are encoded with one msgspec call for the batch (:func:`scalar_lines`), on
        this thread or in the writer process (``offload``)."""
        fd = self._scalars.fileno()
        self._await_dead_writer(fd)
        start = os.fstat(fd).st_size
        params, tags = self._params, self._tags
        batch = Batch.of(records)
        parts = batch.parts
        try:
            if self._hosted:
                settings = self._append_in_host(parts, fd, start)
            else:
                data, settings = scalar_lines(parts)
                write_all(fd, data)
                if self.offload == "auto":
                    self._note_rate(len(batch))
            if settings:
                self._store_settings(parts)
        except _WriterNotGone:
            raise RetryableError(_WRITER_NOT_GONE) from None
        except BaseException:
            # Leave no partial batch behind: the retry (or each half of a split batch) writes
            # its records again, once.
            self._params, self._tags = params, tags
            os.ftruncate(fd, start)
            raise

    def _await_dead_writer(self, fd: int) -> None:
        """While a killed writer process has not exited, raise ``RetryableError`` (it might
        still append); once it has, cut the file back to where its last batch began."""
        cut = self._cut_back_to
        if cut is None:
            return
        assert self.host is not None
        if not self.host.settled():
            raise RetryableError(_WRITER_NOT_GONE)
        os.ftruncate(fd, cut)
        self._cut_back_to = None
        self._start_host()

    def _note_rate(self, records: int) -> None:
        """``"auto"``: start the writer once batches of ``OFFLOAD_ROWS`` records or more have
        kept coming for ``_OFFLOAD_AFTER_S`` (a rate, not a backlog drained at once)."""
        if records < OFFLOAD_ROWS:
            self._large_since = None
            return
        now = time.monotonic()
        if self._large_since is None:
            self._large_since = now
        elif now - self._large_since >= _OFFLOAD_AFTER_S:
            self._start_host()

    def _append_in_host(self, parts: list[Any], fd: int, start: int) -> bool:
        host = self.host
        assert host is not None
        scalars = [p for p in parts if type(p) is Scalars or type(p) is Scalar]
        if not scalars:  # params or tags only: the sink writes them itself
            return True
        try:
            host.call("api", "append", encode_batch(Batch(scalars)), spawn=False)
        except (RetryableError, PermanentError) as exc:
            if host.pid is not None:  # the writer runs: the append failed there (a full disk)
                raise
            self._hosted = False
            if not host.settled():  # killed, but it may still append: hold the file as it is
                self._cut_back_to = start
                raise _WriterNotGone from exc
            # The writer died (and exited) or was closed: cut back what it may have written of
            # this batch, and write the batch here.
            self._start_host()
            os.ftruncate(fd, start)
            data, _ = scalar_lines(parts)
            write_all(fd, data)
        return len(scalars) < len(parts)

    def _start_host(self) -> None:
        """Start a writer process in the background, unless one is starting or running, the
        sink is closing, or every start is spent."""
        with self._host_lock:
            if (self._starting or self._hosted or self._closing
                    or self._starts >= _HOST_STARTS):
                return
            if self.host is None:
                from steplog.host import Host

                st = os.fstat(self._scalars.fileno())
                self.host = Host("steplog.sinks.file:ScalarAppender",  # the path as bytes:
                                 [os.fsencode(self.output_dir / "scalars.jsonl"),  # maybe not UTF-8
                                  st.st_dev, st.st_ino],
                                 channels=("api",), start_timeout_s=60.0, call_timeout_s=60.0)
            self._starts += 1  # attempts, so that a failing fork is not tried for ever
            self._starting = True
            self._start_thread = threading.Thread(
                target=self._await_host, args=(self.host,), daemon=True,
                name="steplog-file-writer-start")
        self._start_thread.start()

    def _await_host(self, host: Host) -> None:
        """Start thread: spawn the writer process (the only place one is spawned)."""
        error: Exception | None = None
        try:
            host.call("api", "size")
        except Exception as exc:  # no process: this sink's worker thread writes
            error = exc
        with self._host_lock:
            self._starting = False
            closing = self._closing
            if error is None and not closing:
                self._hosted = True
        if closing:  # close() left the process to this thread
            host.close(_WRITER_EXIT_S)
        elif error is not None:
            with contextlib.suppress(Exception):  # warnings turned into errors (-W error)
                warnings.warn(f"steplog: the file sink's writer process for {self.output_dir} "
                              f"did not start ({error}); the worker thread writes the scalars",
                              SteplogWarning, stacklevel=1)

    def _stop_host(self) -> None:
        with self._host_lock:
            self._closing = True
            self._hosted = False
            host, starting, thread = self.host, self._starting, self._start_thread
        if host is not None and not starting:
            # Nothing is in flight at close (this sink's own lane calls it): a writer that
            # does not exit at once (stopped, say) holds nothing to lose and is killed.
            host.close(_WRITER_EXIT_S)
        elif thread is not None:  # a start in progress closes the process when it ends
            thread.join(_WRITER_START_WAIT_S)

    def release(self) -> None:
        self._stop_host()

    def _store_settings(self, records: Sequence[Any]) -> None:
        params = tags = None
        for r in records:
            if type(r) is Param:
                params = params if params is not None else dict(self._params)
                params[r.name] = r.value
            elif type(r) is Tag:
                tags = tags if tags is not None else dict(self._tags)
                tags[r.name] = r.value
        if params is not None:
            _dump_json_atomic(self.output_dir / "parameters.json", params)
            self._params = params
        if tags is not None:
            _dump_json_atomic(self.output_dir / "tags.json", tags)
            self._tags = tags

    def check_upload_name(self, name: str) -> None:
        """The run's own files, ``previous/`` and temporary names are not for uploads: one
        stored there would replace (or be moved with, or replaced by) what the sink writes
        itself."""
        parts = safe_relpath(name).split("/")
        if parts[0] in RUN_FILES or parts[0] == "previous":
            raise ValueError(f"a file run keeps its own {parts[0]!r} in {self.output_dir}: "
                             f"store the upload {name!r} under another name")
        if any(part.startswith(TEMP_PREFIX) for part in parts):
            raise ValueError(f"names starting with {TEMP_PREFIX!r} are the file sink's "
                             f"temporary files: store the upload {name!r} under another name")

    def upload(self, artifact: Artifact) -> None:
        name = safe_relpath(artifact.name)
        dest = self.output_dir / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if artifact.checkpoint and artifact.source and os.path.isdir(artifact.source):
            self._store_policy(Path(artifact.source), dest, artifact.step or 0)
        elif artifact.data is None and artifact.source is None:
            raise ValueError(f"artifact {artifact.name!r} has neither data nor a source")
        elif dest.is_dir() and not dest.is_symlink() and not self._replaceable(name):
            self._add_to_folder(artifact, name, dest)
        else:
            self._store(artifact, dest)
        entry = {
            "name": name,
            "kind": artifact.kind,
            "step": artifact.step,
            "metadata": artifact.metadata,
            "aliases": artifact.aliases,
            "timestamp": artifact.timestamp,
        }
        if artifact.checkpoint:
            entry["checkpoint"] = True
        _append_line(self.output_dir / "artifacts.jsonl", self._encoder.encode(entry) + b"\n")
        stored = self._stored_uploads()
        stored[name] = stored.get(name, False) or artifact.checkpoint

    def _replaceable(self, name: str) -> bool:
        """Whether the folder at ``name`` is an upload of that name with no other upload stored
        inside it since, and not a folder of ``save_policy`` snapshots (then a new upload of
        the name replaces it)."""
        stored = self._stored_uploads()
        if stored.get(name) is not False:
            return False  # never stored as an upload, or save_policy's snapshots
        inside = f"{name}/"
        return not any(s.startswith(inside) for s in stored)

    def _stored_uploads(self) -> dict[str, bool]:
        if self._stored is None:
            self._stored = {}
            for name, checkpoint in _manifest(self.output_dir / "artifacts.jsonl"):
                self._stored[name] = self._stored.get(name, False) or checkpoint
        return self._stored

    def _add_to_folder(self, artifact: Artifact, name: str, dest: Path) -> None:
        """A folder upload into a folder that holds other uploads (or files of the user's) is
        copied into it, file by file; a file cannot take such a folder's place."""
        src = Path(str(artifact.source))
        if artifact.data is not None or not src.is_dir():
            raise PermanentError(f"{name!r} in {self.output_dir} is a folder that holds other "
                                 "uploads: store this file under another name")
        shutil.copytree(src, dest, dirs_exist_ok=True)
        if artifact.move:
            discard(src)

    @staticmethod
    def _store(artifact: Artifact, dest: Path) -> None:
        """``dest`` holds the upload, in place of what was there; a source moved away and not
        stored is put back, so a retry (or a kept upload) finds it."""
        staged = sibling(dest, ".tmp")
        src = Path(str(artifact.source))
        moved = False
        old: Path | None = None
        try:
            if artifact.data is not None:
                staged.write_bytes(artifact.data)
            elif src.is_dir():
                shutil.copytree(src, staged)  # links followed, as for a copy
            elif artifact.move and not src.is_symlink():  # a link: what it names is stored
                shutil.move(src, staged)
                moved = True
            else:
                shutil.copy2(src, staged)
            old = put_in_place(staged, dest)
        except BaseException:
            if moved and staged.exists() and not src.exists():
                shutil.move(staged, src)
            else:
                discard(staged)
            raise
        # Stored: what the name held before goes, and a copied source given to move.
        if old is not None:
            discard(old)
        if artifact.move and artifact.data is None and not moved:
            discard(src)  # a link to a folder is unlinked

    @staticmethod
    def _store_policy(src: Path, dest: Path, step: int) -> None:
        """``<name>/step_<N>/`` holds the snapshot (written aside, then renamed into place, so
        a reader sees a whole snapshot or none); ``<name>/latest`` (``step_<N>``) and the hard
        links ``<name>/model.pth``, ``<name>/meta.json`` name the snapshot of the highest step,
        each replaced atomically."""
        version = f"step_{step}"
        final = dest / version
        dest.mkdir(parents=True, exist_ok=True)
        tmp = sibling(final, ".tmp")
        tmp.mkdir()
        try:
            for item in src.iterdir():  # a snapshot folder is flat; copy2 raises the OSError
                shutil.copy2(item, tmp / item.name)
            old = put_in_place(tmp, final)  # the same step saved again: the new one replaces it
        except BaseException:
            discard(tmp)
            raise
        if old is not None:
            discard(old)
        latest = dest / "latest"
        current = _step_of(latest.read_text().strip()) if latest.is_file() else None
        if current is not None and current > step:
            return  # an older snapshot stored late (by steplog sync): latest stays newer
        for fname in ("model.pth", "meta.json"):
            link = sibling(dest / fname, ".tmp")
            try:
                link_or_copy(final / fname, link)
                os.replace(link, dest / fname)
            except BaseException:
                discard(link)
                raise
        _write_atomic(latest, f"{version}\n".encode())

    def close(self, status: RunStatus) -> None:
        """Make ``scalars.jsonl`` durable, write ``scalars.json`` (the seed's format) from it,
        and record the run's status in ``run.json``."""
        self._stop_host()
        if self._scalars is not None:
            os.fsync(self._scalars.fileno())
            self._scalars.close()
            self._scalars = None
        _dump_json_atomic(self.output_dir / "run.json", {"status": status, "end_time": now_ms()})
        path = self.output_dir / "scalars.jsonl"
        if path.exists():
            _write_series(self.output_dir / "scalars.json", read_series(path))


def _step_of(version: str) -> int | None:
    """``N`` of a ``step_<N>`` folder name (``None`` for anything else)."""
    text = version.removeprefix("step_")
    try:
        return int(text) if version.startswith("step_") else None
    except ValueError:
        return None


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a crash left without its newline (appending continues a run);
    every whole line before it stays, however long the torn part is."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        end = size
        keep = 0
        while end > 0:  # back to the last newline, a block at a time
            start = max(0, end - (1 << 20))
            f.seek(start)
            block = f.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        f.truncate(keep)


def _ancestors(name: str) -> Iterator[str]:
    """The folders ``name`` lies in: ``a``, ``a/b`` for ``a/b/c``."""
    parts = name.split("/")
    return ("/".join(parts[:i]) for i in range(1, len(parts)))


def _append_line(path: Path, line: bytes) -> None:
    """Append ``line`` to ``path`` whole or not at all (a torn line a crash left is cut
    first; a failed write, a full disk say, is cut back)."""
    _drop_torn_tail(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            write_all(fd, line)
        except BaseException:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def read_series(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, value), ...]}`` from a ``scalars.jsonl``, in file order; a last line cut
    short by a crash is ignored."""
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    series: dict[str, list[tuple[int, float]]] = {}
    if b"NaN" in data or b"Infinity" in data:
        for line in data.splitlines():
            try:
                row = json.loads(line)
                series.setdefault(row["name"], []).append((row["step"], row["value"]))
            except (ValueError, KeyError, TypeError):
                continue  # an empty or damaged line
        return series
    try:
        rows = _LINE.decode_lines(data)
    except msgspec.DecodeError:  # a damaged line: read the others one by one
        for line in data.splitlines():
            try:
                r = _LINE.decode(line)
            except msgspec.DecodeError:
                continue
            series.setdefault(r.name, []).append((r.step, r.value))
        return series
    for r in rows:
        series.setdefault(r.name, []).append((r.step, r.value))
    return series


_LINE = msgspec.json.Decoder(Scalar)


def _write_series(path: Path, series: dict[str, list[tuple[int, float]]]) -> None:
    """The seed FileLogger's ``scalars.json``, written atomically (msgspec: about 50 ns a point;
    json with ``NaN``/``Infinity`` tokens only when a value is not finite)."""
    data = msgspec.json.encode(series)
    if b"null" in data:  # msgspec writes non-finite floats as null
        data = json.dumps(series, allow_nan=True, separators=(",", ":")).encode()
    _write_atomic(path, data)
