"""One HTTP/1.1 request and its answer over a kept-alive plain TCP socket: what the REST
transport needs for MLflow's JSON API calls, at about half the CPU of ``http.client`` per
request (which parses every answer's head through the ``email`` package, on the training
process's GIL). Bodies are bytes. Streamed uploads and TLS stay with ``http.client``.

A request whose target holds a space or a control character, or whose headers hold a line
break or a NUL character, is refused before anything is sent (``ValueError``, as
``http.client`` refuses it). An answer is read whole: its head (status line and headers, at
most 64 KiB; lines may end with CRLF or LF), then its body by ``Content-Length``, by chunks
(``Transfer-Encoding: chunked``, trailers at most 64 KiB), or up to the end of the connection.
Up to 10 interim ``1xx`` answers are skipped. Each wait is bounded by the socket's timeout and
the whole exchange by ``total_s``. The socket stays open for the next request unless the
server asked to close it, spoke HTTP/1.0, or ended the body by closing.
"""

from __future__ import annotations

import contextlib
import re
import socket
import string
import time
import urllib.parse

__all__ = ["Closed", "Http1Socket", "ResponseError", "host_header"]

_MAX_HEAD = 65536
_MAX_INTERIM = 10
_MAX_BODY = 1 << 30
_READ = 65536
_READ_MOST = 1 << 20
_BODYLESS_METHODS = frozenset({"HEAD"})
_BODYLESS_STATUS = frozenset({204, 304})
_BODY_EXPECTED = frozenset({"POST", "PUT", "PATCH"})
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_BAD_FIELD = re.compile(r"[\x00\r\n]")
_HEX = frozenset(string.hexdigits)


class ResponseError(Exception):
    """The server's answer is not HTTP/1.x as this client reads it, or it ended mid-answer."""


class Closed(ConnectionError):
    """The server closed the connection before sending any byte of the answer (as a server does
    with a kept-alive connection that stayed idle too long)."""


def host_header(parts: urllib.parse.SplitResult) -> str:
    """The ``Host`` header for a URL: its host in ASCII (IDNA for an international name, in
    brackets for an IPv6 literal) and its port when the URL names one. ``ValueError`` for a host
    IDNA cannot encode."""
    host = parts.hostname or ""
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"the host name {host!r} cannot be encoded (IDNA): {exc}") from None
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port is not None else host


class Http1Socket:
    """A TCP connection to ``address`` (host, port), naming ``host`` (see :func:`host_header`)
    in each request, with the bytes read past an answer kept for the next (there should be
    none). Every wait is bounded by ``timeout_s`` per read or write, and each exchange as a
    whole by ``total_s`` (a server that drips its answer a byte at a time)."""

    def __init__(self, address: tuple[str, int], host: str, timeout_s: float,
                 total_s: float) -> None:
        self._sock = socket.create_connection(address, timeout=timeout_s)
        with contextlib.suppress(OSError):  # a request is sent in one piece anyway
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._host = host
        self._buf = b""
        self._timeout = timeout_s
        self._total = total_s
        self._until = 0.0

    def close(self) -> None:
        self._sock.close()

    def exchange(self, method: str, target: str, headers: dict[str, str],
                 body: bytes | None) -> tuple[int, bytes, bool]:
        """Send one request and read its whole answer: ``(status, body, keep)``, where ``keep``
        says whether the connection can carry another request. Raises ``ValueError`` (nothing
        sent) for a target or header with a control character, :class:`Closed` when the server
        closed the connection before answering, :class:`ResponseError` for an answer it cannot
        read, ``OSError`` (a timeout included) for the socket's failures."""
        if _BAD_TARGET.search(target):
            raise ValueError(f"the request target {target[:80]!r} holds a space or a control "
                             "character")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host}",
                 "Accept-Encoding: identity"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None or method in _BODY_EXPECTED:
            lines.append(f"Content-Length: {len(body or b'')}")
        head = "\r\n".join(lines)
        if head.count("\n") >= len(lines) or head.count("\r") >= len(lines) or "\0" in head:
            bad = next((k for k, v in headers.items() if _BAD_FIELD.search(f"{k}{v}")), "?")
            raise ValueError(f"the header {bad!r} holds a line break or a NUL character (a "
                             "token or password read from a file with its newline?)")
        self._until = time.monotonic() + self._total
        self._sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + (body or b""))
        version, status, fields = self._read_head(True)
        interim = 0
        while status < 200:
            interim += 1
            if interim > _MAX_INTERIM:
                raise ResponseError(f"more than {_MAX_INTERIM} interim (1xx) answers")
            version, status, fields = self._read_head(False)
        keep = version == "HTTP/1.1" and "close" not in fields.get("connection", "").lower()
        coding = fields.get("transfer-encoding")
        if method in _BODYLESS_METHODS or status in _BODYLESS_STATUS:
            data = b""
        elif coding is not None:
            if coding.rsplit(",", 1)[-1].strip().lower() == "chunked":
                data = self._read_chunked()
            else:  # another coding last: the body ends with the connection
                data, keep = self._read_to_end(), False
        elif "content-length" in fields:
            data = self._take(_length(fields["content-length"]))
        else:  # the body ends with the connection
            data, keep = self._read_to_end(), False
        if self._buf:  # bytes past the answer: nothing this client asked for
            keep = False
        return status, data, keep

    def _recv(self, n: int = _READ) -> bytes:
        left = self._until - time.monotonic()
        if left < self._timeout:  # the exchange's own bound comes first
            if left <= 0:
                raise TimeoutError(f"the answer took longer than {self._total:g} s")
            self._sock.settimeout(left)
            try:
                return self._sock.recv(n)
            except TimeoutError:
                raise TimeoutError(f"the answer took longer than {self._total:g} s") from None
            finally:
                self._sock.settimeout(self._timeout)
        return self._sock.recv(n)

    def _read_head(self, first: bool) -> tuple[str, int, dict[str, str]]:
        """The next answer's version, status and headers (names in lower case; repeated ones
        joined with ``", "``)."""
        if first and not self._buf:
            chunk = self._recv()
            if not chunk:
                raise Closed("the server closed the connection without answering")
            self._buf = chunk
        status_line = self._line()
        size = len(status_line)
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if (not version.startswith("HTTP/1.") or len(code) != 3 or not code.isascii()
                or not code.isdigit() or rest[3:4] not in ("", " ")):
            raise ResponseError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        fields: dict[str, str] = {}
        name = ""
        while line := self._line():
            size += len(line) + 2
            if size > _MAX_HEAD:
                raise ResponseError("the answer's head is longer than 64 KiB")
            if line[:1] in (" ", "\t") and name:  # an obsolete folded continuation
                fields[name] = f"{fields[name]} {line.strip()}"
                continue
            key, sep, value = line.partition(":")
            if not sep:
                raise ResponseError(f"not a header line: {line[:80]!r}")
            name = key.strip().lower()
            value = value.strip()
            fields[name] = f"{fields[name]}, {value}" if name in fields else value
        return version, int(code), fields

    def _take(self, n: int) -> bytes:
        """The next ``n`` bytes of the answer."""
        if len(self._buf) >= n:
            data, self._buf = self._buf[:n], self._buf[n:]
            return data
        out = bytearray(self._buf)
        self._buf = b""
        while len(out) < n:
            chunk = self._recv(min(max(_READ, n - len(out)), _READ_MOST))
            if not chunk:
                raise ResponseError(f"the server closed the connection after {len(out)} of "
                                    f"{n} bytes of the body")
            out += chunk
        if len(out) > n:
            self._buf = bytes(out[n:])
            del out[n:]
        return bytes(out)

    def _line(self) -> str:
        """The next line of the answer (ended by CRLF or LF), without its end."""
        buf = self._buf
        while (end := buf.find(b"\n")) < 0:
            if len(buf) > _MAX_HEAD:
                raise ResponseError("a line of the answer is longer than 64 KiB")
            chunk = self._recv()
            if not chunk:
                raise ResponseError("the server closed the connection in the middle of an answer")
            buf += chunk
        self._buf = buf[end + 1:]
        return buf[:end].decode("latin-1").rstrip("\r")

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size_text = self._line().split(";", 1)[0].strip()
            if not size_text or not _HEX.issuperset(size_text) or len(size_text) > 8:
                raise ResponseError(f"bad chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                trailers = 0
                while line := self._line():  # trailers, up to the empty line
                    trailers += len(line) + 2
                    if trailers > _MAX_HEAD:
                        raise ResponseError("the answer's trailers are longer than 64 KiB")
                return bytes(out)
            if len(out) + size > _MAX_BODY:
                raise ResponseError("a chunked body longer than 1 GiB")
            out += self._take(size)
            if self._line():
                raise ResponseError("a chunk is longer than its size")

    def _read_to_end(self) -> bytes:
        out = bytearray(self._buf)
        self._buf = b""
        while chunk := self._recv():
            out += chunk
            if len(out) > _MAX_BODY:
                raise ResponseError("a body longer than 1 GiB")
        return bytes(out)


def _length(text: str) -> int:
    """A ``Content-Length`` value (identical repeats allowed, as RFC 9110 lets a client)."""
    values = {v.strip() for v in text.split(",")}
    value = values.pop() if len(values) == 1 else ""
    if not value or not value.isascii() or not value.isdigit() or len(value) > 10:
        raise ResponseError(f"bad Content-Length {text[:40]!r}")
    length = int(value)
    if length > _MAX_BODY:
        raise ResponseError(f"a body of {length} bytes (more than 1 GiB)")
    return length
