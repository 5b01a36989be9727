"""A loopback TCP proxy with switchable faults, for testing sinks against real network failures.

``FaultProxy(target_port)`` listens on a free 127.0.0.1 port and forwards to
``127.0.0.1:target_port``. Its :attr:`~FaultProxy.mode` can be switched at any time from the test
thread and applies to every chunk a client sends, so connections kept alive from before the
switch are affected too:

* ``"pass"``   forward both ways unchanged;
* ``"reset"``  abort the client's connection with a TCP RST (SO_LINGER 0) when it sends;
* ``"delay"``  hold each chunk for :attr:`~FaultProxy.delay_s` seconds before forwarding it (the
  late request still reaches the server, like a slow network: the server may apply it after
  the client gave up);
* ``"503"``    read the HTTP request and answer ``503 Service Unavailable`` itself.

``set(mode, only=b"/runs/create")`` limits the fault to chunks that contain those bytes (for
HTTP: requests to that endpoint); other chunks pass. When a client closes its connection with a
request unanswered, the proxy keeps the server's side open until the answer comes (at most 10 s),
so a request the client gave up on is processed by the server, as a late request would be.

The proxy runs an anyio event loop in a background thread (a blocking portal). It is bounded:
it stops by itself after ``lifetime_s`` seconds, and :meth:`~FaultProxy.stop` (or leaving the
``with`` block) closes every connection and joins the thread.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
from anyio.from_thread import BlockingPortal, start_blocking_portal

__all__ = ["FaultProxy", "Mode"]

Mode = Literal["pass", "reset", "delay", "503"]

_CHUNK = 65536
_REQUEST_READ_S = 5.0
_DRAIN_S = 10.0
_BODY_503 = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "fault proxy: 503"}'


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``, faults on demand."""

    def __init__(self, target_port: int, *, lifetime_s: float = 300.0) -> None:
        self.target_port = target_port
        self.lifetime_s = lifetime_s
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.only: bytes | None = None
        self.port = 0
        self.connections = 0
        """Client connections accepted so far."""
        self.faults = 0
        """Chunks (requests) that met a fault instead of being forwarded promptly."""
        self._stack: contextlib.ExitStack | None = None
        self._portal: BlockingPortal | None = None
        self._scope: anyio.CancelScope | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: Mode, delay_s: float = 0.0, only: bytes | None = None) -> None:
        """From now on, treat every chunk a client sends (or only those containing ``only``)
        according to ``mode``; ``delay_s`` is the hold time of ``"delay"`` (seconds)."""
        if mode not in ("pass", "reset", "delay", "503"):
            raise ValueError(f"unknown mode {mode!r}")
        self.delay_s = delay_s
        self.only = only
        self.mode = mode

    def start(self) -> FaultProxy:
        """Return once the proxy listens on :attr:`port`."""
        if self._portal is not None:
            return self
        stack = contextlib.ExitStack()
        portal = stack.enter_context(start_blocking_portal(name="fault-proxy"))
        try:
            _, self.port = portal.start_task(self._serve)
        except BaseException:
            stack.close()
            raise
        self._stack, self._portal = stack, portal
        return self

    def stop(self) -> None:
        """Return once every connection is closed and the proxy's thread has ended."""
        portal, stack = self._portal, self._stack
        self._portal = self._stack = None
        if portal is None or stack is None:
            return
        scope = self._scope
        if scope is not None:
            with contextlib.suppress(RuntimeError):  # the loop may have stopped by itself
                portal.call(scope.cancel)
        stack.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- event loop side ---------------------------------------------------------------------

    async def _serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        with anyio.move_on_after(self.lifetime_s) as scope:
            self._scope = scope
            task_status.started(port)
            async with listener:
                await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        upstream: anyio.abc.SocketStream | None = None
        # True while the client sent data that the server has not answered yet.
        awaiting = False
        answered = anyio.Event()

        async def pump(src: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
            """Relay the server's answers to the client until the server closes."""
            nonlocal awaiting
            try:
                async for chunk in src:
                    awaiting = False
                    answered.set()
                    await client.send(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
            finally:
                scope.cancel()

        try:
            async with client, anyio.create_task_group() as tg:
                faulted = False
                while not faulted:
                    try:
                        data = await client.receive(_CHUNK)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
                    mode = self.mode
                    if self.only is not None and self.only not in data:
                        mode = "pass"
                    if mode == "reset":
                        self.faults += 1
                        _abort(client)
                        faulted = True
                    elif mode == "503":
                        self.faults += 1
                        await _answer_503(client, data)
                        faulted = True
                    else:
                        if mode == "delay":
                            self.faults += 1
                            await anyio.sleep(self.delay_s)
                        if upstream is None:
                            upstream = await anyio.connect_tcp("127.0.0.1", self.target_port)
                            tg.start_soon(pump, upstream, tg.cancel_scope)
                        awaiting = True
                        answered = anyio.Event()
                        await upstream.send(data)
                if awaiting and not faulted:
                    # The client gave up on its request; keep the server's side open until it
                    # answers, as a real network would (uvicorn drops a half-closed request).
                    with anyio.move_on_after(_DRAIN_S):
                        await answered.wait()
                tg.cancel_scope.cancel()
        except Exception:  # one broken connection must never stop the listener
            pass
        finally:
            if upstream is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await upstream.aclose()


def _abort(stream: anyio.abc.SocketStream) -> None:
    """Make the coming close send a TCP RST instead of a FIN."""
    sock: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _answer_503(client: anyio.abc.SocketStream, first: bytes) -> None:
    """Read the rest of the HTTP request (so closing sends no RST), then answer 503."""
    data = first
    with anyio.move_on_after(_REQUEST_READ_S):
        while b"\r\n\r\n" not in data:
            data += await client.receive(_CHUNK)
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            body += await client.receive(_CHUNK)
    await client.send(
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(_BODY_503)).encode() + b"\r\n"
        b"Connection: close\r\n\r\n" + _BODY_503
    )
