"""The sink host: a child process that runs Python-heavy backend code off the training GIL.

The worker threads of a logger share the training process's GIL, so a backend client that costs
milliseconds per batch (MLflow's SQLAlchemy store, a cloud SDK) slows the step loop. A
:class:`Host` runs such an object in a fresh interpreter instead (``python -m steplog.host``,
never a fork of the training process: a fork would copy its threads' locks and its CUDA state,
and ``multiprocessing``'s spawn re-imports the user's ``__main__``). The parent calls its
methods by name; arguments and results travel as msgpack frames over a Unix socket per
*channel*, so two lanes (metrics and uploads) never wait for each other.

Guarantees:

* **Start-up is off the caller's thread** and bounded by ``start_timeout_s``: the first
  :meth:`Host.call` spawns the process (on a lane thread), later calls reuse it.
* **Errors keep their meaning.** An exception in the host comes back as the same class of
  error: :class:`~steplog.errors.RetryableError` or :class:`~steplog.errors.PermanentError`
  (``whole_batch`` kept), classified in the host by :func:`steplog.retry.is_retryable`.
* **Death is survived.** A host that dies, or stays silent for ``call_timeout_s`` (a busy host
  sends a heartbeat every few seconds, so a long upload is not cut short), is killed and the
  call raises ``RetryableError``; the next call starts a new host. Backends
  hosted this way must be safe to retry (MLflow stores identical metric rows once).
* **The host exits when the training process dies**: its sockets reach EOF (inherited copies
  are closed in forked children), and it checks its parent every second as a backstop.
* **Its own process group**: a Ctrl-C meant for training does not kill it mid-batch.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import typing
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from steplog.errors import PermanentError, RetryableError

__all__ = ["Host", "main"]

_LENGTH = struct.Struct("<Q")
_TIMEVAL = struct.Struct("@ll")
_READ_SIZE = 1 << 16
_MAX_READ = 1 << 20
_OK, _RETRYABLE, _PERMANENT, _HEARTBEAT = 0, 1, 2, 3
_HEARTBEAT_S = 5.0
"""How often a busy host says it is alive (less when ``call_timeout_s`` is short)."""
_EXIT_GRACE_S = 30.0
"""Longest the host spends ending runs and closing its object before it exits anyway."""
_SHUTDOWN = "__shutdown__"
_PARENT_POLL_S = 1.0


class _Config(msgspec.Struct):
    target: str
    args: list[Any]
    channels: list[str]
    path: list[bytes]
    """The parent's ``sys.path``, as the file system's bytes (a name need not be UTF-8)."""
    parent: int
    heartbeat_s: float


class _Reply(msgspec.Struct, array_like=True):
    status: int
    value: Any = None
    whole_batch: bool = False


class _Wire:
    """Length-prefixed frames over one connected socket, with as few system calls as a frame
    allows: each frame leaves in one ``send`` and is read in as few ``recv`` calls as it
    arrived in (bytes of the next frame are kept for it). Every system call releases the GIL,
    and on the training process's side the training thread has to give it back afterwards.

    The socket is put in blocking mode (whatever ``socket.setdefaulttimeout`` says);
    :meth:`set_timeout` bounds each read and write in the kernel (``SO_RCVTIMEO``/
    ``SO_SNDTIMEO``) instead of a ``poll`` before every call, and an expired wait raises
    :class:`TimeoutError`. The bound is per system call: a frame that keeps trickling in is
    read for as long as it does."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._rest = bytearray()
        self._timeout_s: float | None = None

    def set_timeout(self, seconds: float | None) -> None:
        """Bound each read and write by ``seconds`` (``None``: wait as long as it takes)."""
        if seconds == self._timeout_s:
            return
        whole, micro = 0, 0  # zero: no bound
        if seconds is not None:
            whole, micro = divmod(max(round(seconds * 1e6), 1), 1_000_000)
        value = _TIMEVAL.pack(whole, micro)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        self._timeout_s = seconds

    def _timed_out(self, what: str, exc: BlockingIOError) -> TimeoutError:
        bound = "" if self._timeout_s is None else f" within {self._timeout_s:g} s"
        return TimeoutError(f"{what}{bound}: {exc}")

    def send(self, payload: bytes) -> None:
        try:
            self.sock.sendall(_LENGTH.pack(len(payload)) + payload)
        except BlockingIOError as exc:
            raise self._timed_out("the other side took no data", exc) from exc

    def recv(self) -> bytes:
        """The next frame; ``EOFError`` when the other side closed the connection."""
        buf = self._rest
        while True:
            if len(buf) >= _LENGTH.size:
                end = _LENGTH.size + _LENGTH.unpack_from(buf)[0]
                if len(buf) >= end:
                    with memoryview(buf) as view:
                        frame = bytes(view[_LENGTH.size:end])
                    del buf[:end]
                    return frame
                need = end - len(buf)
            else:
                need = _LENGTH.size - len(buf)
            try:
                data = self.sock.recv(min(max(need, _READ_SIZE), _MAX_READ))
            except BlockingIOError as exc:
                raise self._timed_out("no answer", exc) from exc
            if not data:
                raise EOFError("the other side closed the connection")
            buf += data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- parent side --------------------------------------------------------------------------------

_hosts: weakref.WeakSet[Host] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) must not keep the parent's host sockets open: the
    # host would then never see EOF when the parent dies. It must not stop the host either.
    for host in list(_hosts):
        host._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Process:
    """One running host: the child process and one wire per channel."""

    def __init__(self, proc: subprocess.Popen[bytes], wires: dict[str, _Wire]) -> None:
        self.proc = proc
        self.wires = wires
        self.locks = {name: threading.Lock() for name in wires}
        self.dead = False

    def hang_up(self) -> None:
        """Mark the host dead and close its channels; the process itself is left alone."""
        self.dead = True
        for wire in self.wires.values():
            wire.close()

    def kill(self) -> None:
        self.hang_up()
        if self.proc.poll() is None:  # not reaped yet: the group id is still its own
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its group: what it started too
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


class Host:
    """A backend object (``target(*args)``, ``target`` given as ``"module:name"``) living in a
    child process; :meth:`call` runs one of its methods there.

    ``start_timeout_s`` bounds the start (interpreter, imports, the object's constructor);
    ``call_timeout_s`` bounds how long a call may go without a sign of life from the host.
    Every failure to start, answer or stay alive raises :class:`RetryableError`, and the next
    call starts a new process.
    """

    def __init__(
        self,
        target: str,
        args: Sequence[Any] = (),
        *,
        channels: Sequence[str] = ("api", "files"),
        start_timeout_s: float = 120.0,
        call_timeout_s: float = 60.0,
    ) -> None:
        module, _, name = target.partition(":")
        if not module or not name or module == "__main__":
            raise ValueError(f"host target must be 'module:name' of an importable module, "
                             f"got {target!r}")
        self.target = target
        self.args = list(args)
        self.channels = tuple(channels)
        self.start_timeout_s = start_timeout_s
        self.call_timeout_s = call_timeout_s
        self.starts = 0
        """How many host processes were started (1 + restarts)."""
        self._current: _Process | None = None
        self._unreaped: list[subprocess.Popen[bytes]] = []
        self._spawning: list[socket.socket] = []
        self._spawn_lock = threading.Lock()
        self._closed = False
        _hosts.add(self)

    @property
    def pid(self) -> int | None:
        """The running host's process id, ``None`` when none runs."""
        current = self._current
        return None if current is None or current.dead else current.proc.pid

    def call(self, channel: str, method: str, *args: Any, returns: Any = None,
             spawn: bool = True) -> Any:
        """``target.method(*args)`` in the host, its result converted to ``returns`` (a type)
        when given. Raises what the host raised, or ``RetryableError`` when it died (or, with
        ``spawn=False``, when none is running: then no process is started)."""
        current = self._running(spawn)
        wire = current.wires[channel]
        request = msgspec.msgpack.encode([method, list(args)])  # two lanes may call at once
        with current.locks[channel]:
            try:
                wire.send(request)
                reply = msgspec.msgpack.decode(wire.recv(), type=_Reply)
                while reply.status == _HEARTBEAT:  # still working: wait for the next frame
                    reply = msgspec.msgpack.decode(wire.recv(), type=_Reply)
            except (OSError, EOFError) as exc:
                self._lost(current)
                raise RetryableError(f"the sink host stopped answering ({exc!r}); a new one "
                                     "is started for the next attempt") from exc
        if reply.status == _OK:
            if returns is None:
                return reply.value
            return msgspec.convert(reply.value, returns)
        if reply.status == _RETRYABLE:
            raise RetryableError(str(reply.value))
        raise PermanentError(str(reply.value), whole_batch=reply.whole_batch)

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the host to exit after the calls it is running, then wait up to ``timeout_s``
        (it is killed after that)."""
        with self._spawn_lock:
            self._closed = True
            current, self._current = self._current, None
        if current is None or current.dead:
            return
        for name, wire in current.wires.items():
            lock = current.locks[name]
            if lock.acquire(timeout=timeout_s):  # a call still running keeps its channel
                try:
                    with contextlib.suppress(OSError):
                        wire.set_timeout(1.0)
                        wire.send(msgspec.msgpack.encode([_SHUTDOWN, []]))
                finally:
                    lock.release()
        with contextlib.suppress(subprocess.TimeoutExpired):
            current.proc.wait(timeout_s)
        current.kill()

    def _lost(self, current: _Process) -> None:
        with self._spawn_lock:
            if self._current is current:
                self._current = None
        self._discard(current)

    def _discard(self, current: _Process) -> None:
        """Kill ``current``; until it has exited, :meth:`settled` is False."""
        current.kill()
        if current.proc.poll() is None:
            self._unreaped.append(current.proc)

    def settled(self) -> bool:
        """True when every host process that was killed has exited (one stuck in the kernel,
        on a hung network file system say, may still run for a while)."""
        self._unreaped = [p for p in self._unreaped if p.poll() is None]
        return not self._unreaped

    def _forget(self) -> None:
        current, self._current = self._current, None
        self._closed = True
        for s in self._spawning:  # forked while a host was starting
            with contextlib.suppress(OSError):
                s.close()
        if current is not None:
            current.hang_up()

    def _running(self, spawn: bool = True) -> _Process:
        with self._spawn_lock:
            if self._closed:
                raise PermanentError("the sink host was closed")
            current = self._current
            if current is None or current.dead or current.proc.poll() is not None:
                if current is not None:
                    self._current = None
                    self._discard(current)
                if not spawn:
                    raise RetryableError("the sink host is not running")
                self._current = current = self._spawn()
            return current

    def _spawn(self) -> _Process:
        parents: dict[str, socket.socket] = {}
        children: list[socket.socket] = []
        for name in self.channels:
            mine, theirs = socket.socketpair()
            parents[name] = mine
            children.append(theirs)
        # A child forked from here on (a DataLoader worker) closes these in _forget: a copy of
        # either end kept there would hide the death of the host, or of this process, from the
        # other side.
        self._spawning = [*parents.values(), *children]
        try:
            return self._start(parents, children)
        finally:
            self._spawning = []

    def _start(self, parents: dict[str, socket.socket], children: list[socket.socket]
               ) -> _Process:
        fds = [s.fileno() for s in children]
        path = [os.fsencode(p) for p in sys.path]
        env = dict(os.environb)
        env[b"PYTHONPATH"] = _import_path(env.get(b"PYTHONPATH"))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "steplog.host", *map(str, fds)],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: Ctrl-C is for training
            )
        except OSError as exc:
            for s in (*parents.values(), *children):
                s.close()
            raise RetryableError(f"could not start the sink host: {exc}") from exc
        finally:
            for s in children:
                s.close()
        self.starts += 1
        current = _Process(proc, {name: _Wire(sock) for name, sock in parents.items()})
        config = _Config(self.target, self.args, list(self.channels), path,
                         os.getpid(), min(_HEARTBEAT_S, self.call_timeout_s / 3))
        first = current.wires[self.channels[0]]
        try:
            first.set_timeout(self.start_timeout_s)
            first.send(msgspec.msgpack.encode(config))
            reply = msgspec.msgpack.decode(first.recv(), type=_Reply)
            for wire in current.wires.values():
                wire.set_timeout(self.call_timeout_s)
        except (OSError, EOFError) as exc:
            code = proc.poll()  # read before the kill below ends it
            current.kill()
            if code is not None:  # it ended at once (its stderr says why)
                raise RetryableError(f"the sink host exited with status {code} as it started "
                                     "(its error is on stderr)") from exc
            raise RetryableError(f"the sink host did not start within "
                                 f"{self.start_timeout_s:g} s ({exc!r})") from exc
        except BaseException:  # a start that cannot be sent, say: never left running
            current.kill()
            raise
        if reply.status != _OK:
            current.kill()
            if reply.status == _RETRYABLE:
                raise RetryableError(f"the sink host could not start: {reply.value}")
            raise PermanentError(f"the sink host could not start: {reply.value}")
        return current


_NEEDED_FIRST = ("steplog", "msgspec", "tenacity", "typing_extensions")
"""What ``python -m steplog.host`` imports before it reads the parent's ``sys.path``."""


def _import_path(existing: bytes | None) -> bytes:
    """``PYTHONPATH`` for a host: the folders this process imported :data:`_NEEDED_FIRST` from
    (a script may have put them on ``sys.path`` itself: vendored, a notebook), then
    ``existing``. Only those folders: the whole ``sys.path`` could pass the kernel's limit
    for one variable, and would run a ``sitecustomize`` of the script's folder there."""
    folders: list[bytes] = []
    for name in _NEEDED_FIRST:
        where = getattr(sys.modules.get(name), "__file__", None)
        if not where:
            continue
        folder = os.path.dirname(where)
        if os.path.basename(where).startswith("__init__."):  # a package: the folder above it
            folder = os.path.dirname(folder)
        encoded = os.fsencode(folder)
        if encoded not in folders:
            folders.append(encoded)
    if existing:
        folders.append(existing)
    return os.pathsep.encode().join(folders)


# -- host side ----------------------------------------------------------------------------------


def _error_reply(exc: BaseException) -> _Reply:
    from steplog.retry import is_retryable

    status = _RETRYABLE if is_retryable(exc) else _PERMANENT
    text = str(exc) or repr(exc)
    if not isinstance(exc, (PermanentError, RetryableError)):
        text = f"{type(exc).__name__}: {text}"
    return _Reply(status, text, bool(getattr(exc, "whole_batch", False)))


def _load(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return typing.cast("Callable[..., Any]", obj)


def _converter(obj: Any, method: str) -> Callable[[list[Any]], list[Any]]:
    """Turn msgpack builtins back into the types the method's annotations name."""
    fn = getattr(obj, method)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    hints.pop("return", None)
    types = list(hints.values())

    def convert(args: list[Any]) -> list[Any]:
        return [msgspec.convert(a, types[i], strict=False) if i < len(types) else a
                for i, a in enumerate(args)]

    return convert


def _heartbeat(wire: _Wire, busy: threading.Event, send_lock: threading.Lock,
               period_s: float) -> None:
    """While a call runs, tell the parent every ``period_s`` that the host is alive."""
    frame = msgspec.msgpack.encode(_Reply(_HEARTBEAT))
    while True:
        time.sleep(period_s)
        if busy.is_set():
            with send_lock:
                if busy.is_set():
                    try:
                        wire.send(frame)
                    except OSError:
                        return


def _serve(wire: _Wire, obj: Any, done: Callable[[bool], None], heartbeat_s: float
           ) -> None:
    """Answer the calls of one channel until shutdown (``done(True)``) or EOF (``done(False)``)."""
    encoder = msgspec.msgpack.Encoder()
    converters: dict[str, Callable[[list[Any]], list[Any]]] = {}
    busy = threading.Event()
    send_lock = threading.Lock()
    threading.Thread(target=_heartbeat, args=(wire, busy, send_lock, heartbeat_s),
                     daemon=True).start()
    while True:
        try:
            method, args = msgspec.msgpack.decode(wire.recv())
        except (OSError, EOFError):
            done(False)
            return
        if method == _SHUTDOWN:
            done(True)
            return
        busy.set()
        try:
            if method.startswith("_"):
                raise PermanentError(f"{method!r} is not a public method of the host's object")
            if method not in converters:
                converters[method] = _converter(obj, method)
            value = getattr(obj, method)(*converters[method](args))
            reply = _Reply(_OK, value)
        except BaseException as exc:
            reply = _error_reply(exc)
        with send_lock:
            busy.clear()
            try:
                wire.send(encoder.encode(reply))
            except (OSError, TypeError, msgspec.EncodeError) as exc:
                with contextlib.suppress(OSError):
                    wire.send(encoder.encode(_error_reply(exc)))


def main(argv: Sequence[str]) -> int:
    """Run a host: build the object the first frame names, then serve every channel."""
    sockets = [socket.socket(fileno=int(fd)) for fd in argv]
    for sock in sockets:
        sock.set_inheritable(False)  # nothing the object starts keeps the parent's channels
    wires = [_Wire(sock) for sock in sockets]
    first = wires[0]
    try:
        config = msgspec.msgpack.decode(first.recv(), type=_Config)
    except (OSError, EOFError):
        return 0
    wanted = [os.fsdecode(p) for p in config.path]
    sys.path[:0] = [p for p in wanted if p not in sys.path]
    try:
        obj = _load(config.target)(*config.args)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # the parent may have given up on this start
            first.send(msgspec.msgpack.encode(_error_reply(exc)))
        return 1
    try:
        first.send(msgspec.msgpack.encode(_Reply(_OK)))
    except OSError:  # the parent gave up on this start (a timeout, a close)
        return 0

    ended = threading.Event()
    lock = threading.Lock()
    open_channels = [len(wires)]
    orderly = [True]

    def done(clean: bool) -> None:
        with lock:
            orderly[0] = orderly[0] and clean
            open_channels[0] -= 1
            if open_channels[0] == 0:
                ended.set()

    for wire in wires:
        threading.Thread(target=_serve, args=(wire, obj, done, config.heartbeat_s),
                         daemon=True).start()
    while not ended.wait(_PARENT_POLL_S):
        if os.getppid() != config.parent:  # the parent died and its sockets were inherited
            orderly[0] = False
            break
    # Whatever the object does now, the host is gone within the grace period.
    watchdog = threading.Timer(_EXIT_GRACE_S, os._exit, (0,))
    watchdog.daemon = True
    watchdog.start()
    if not orderly[0]:
        on_death = getattr(obj, "on_parent_death", None)
        if callable(on_death):
            with contextlib.suppress(BaseException):
                on_death()
    closer = getattr(obj, "close", None)
    if callable(closer):
        with contextlib.suppress(BaseException):
            closer()
    return 0


if __name__ == "__main__":
    # Leave at once, without waiting for daemon threads or running the object's atexit hooks
    # twice: the work is done or the parent is gone.
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
