"""One HTTP/1.1 request and its answer over a kept-alive plain TCP socket: what the REST
transport needs for MLflow's JSON API calls, at about half the CPU of ``http.client`` per
request (which parses every answer's head through the ``email`` package, on the training
process's GIL). Bodies are bytes. Streamed uploads and TLS stay with ``http.client``.

An answer is read whole: its head (status line and headers, at most 64 KiB), then its body by
``Content-Length``, by chunks (``Transfer-Encoding: chunked``), or up to the end of the
connection. Interim ``1xx`` answers are skipped. The socket stays open for the next request
unless the server asked to close it, spoke HTTP/1.0, or ended the body by closing.
"""

from __future__ import annotations

import contextlib
import socket

__all__ = ["Closed", "Http1Socket", "ResponseError"]

_MAX_HEAD = 65536
_READ = 65536
_BODYLESS_METHODS = frozenset({"HEAD"})
_BODYLESS_STATUS = frozenset({204, 304})
_BODY_EXPECTED = frozenset({"POST", "PUT", "PATCH"})


class ResponseError(Exception):
    """The server's answer is not HTTP/1.x as this client reads it, or it ended mid-answer."""


class Closed(ConnectionError):
    """The server closed the connection before sending any byte of the answer (as a server does
    with a kept-alive connection that stayed idle too long)."""


class Http1Socket:
    """A TCP connection to ``host:port`` (``host_header`` names it in each request), with the
    bytes read past the answer kept for the next (there should be none)."""

    def __init__(self, host: str, port: int, host_header: str, timeout_s: float) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        with contextlib.suppress(OSError):  # a request is sent in one piece anyway
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._host = host_header
        self._buf = b""

    def close(self) -> None:
        self._sock.close()

    def exchange(self, method: str, target: str, headers: dict[str, str],
                 body: bytes | None) -> tuple[int, bytes, bool]:
        """Send one request and read its whole answer: ``(status, body, keep)``, where ``keep``
        says whether the connection can carry another request. Raises :class:`Closed` when the
        server closed the connection before answering, :class:`ResponseError` for an answer it
        cannot read, ``OSError`` (a timeout included) for the socket's failures."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host}",
                 "Accept-Encoding: identity"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None or method in _BODY_EXPECTED:
            lines.append(f"Content-Length: {len(body or b'')}")
        self._sock.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b""))
        first = True
        while True:
            version, status, fields = self._read_head(first)
            first = False
            if status >= 200:
                break
        keep = version == "HTTP/1.1" and "close" not in fields.get("connection", "").lower()
        if method in _BODYLESS_METHODS or status in _BODYLESS_STATUS:
            data = b""
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            data = self._read_chunked()
        elif "content-length" in fields:
            try:
                length = int(fields["content-length"])
            except ValueError:
                raise ResponseError(f"bad Content-Length {fields['content-length']!r}") from None
            if length < 0:
                raise ResponseError(f"bad Content-Length {length}")
            data = self._take(length)
        else:  # the body ends with the connection
            data = self._buf + self._read_to_end()
            self._buf = b""
            keep = False
        if self._buf:  # bytes past the answer: nothing this client asked for
            keep = False
        return status, data, keep

    def _recv(self) -> bytes:
        return self._sock.recv(_READ)

    def _read_head(self, first: bool) -> tuple[str, int, dict[str, str]]:
        """The next answer's version, status and headers (names in lower case; repeated ones
        joined with ``", "``)."""
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEAD:
                raise ResponseError("the answer's head is longer than 64 KiB")
            chunk = self._recv()
            if not chunk:
                if first and not buf:
                    raise Closed("the server closed the connection without answering")
                raise ResponseError("the server closed the connection in the middle of an answer")
            buf += chunk
        if end > _MAX_HEAD:
            raise ResponseError("the answer's head is longer than 64 KiB")
        self._buf = buf[end + 4:]
        status_line, *lines = buf[:end].decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise ResponseError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        fields: dict[str, str] = {}
        name = ""
        for line in lines:
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
            chunk = self._sock.recv(max(_READ, n - len(out)))
            if not chunk:
                raise ResponseError(f"the server closed the connection after {len(out)} of "
                                    f"{n} bytes of the body")
            out += chunk
        if len(out) > n:
            self._buf = bytes(out[n:])
            del out[n:]
        return bytes(out)

    def _line(self) -> bytes:
        """The next CRLF-terminated line of the answer, without its CRLF."""
        buf = self._buf
        while (end := buf.find(b"\r\n")) < 0:
            if len(buf) > _MAX_HEAD:
                raise ResponseError("a chunk-size or trailer line is longer than 64 KiB")
            chunk = self._recv()
            if not chunk:
                raise ResponseError("the server closed the connection inside a chunked body")
            buf += chunk
        self._buf = buf[end + 2:]
        return buf[:end]

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ResponseError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return bytes(out)
            out += self._take(size)
            if self._take(2) != b"\r\n":
                raise ResponseError("a chunk is not followed by CRLF")

    def _read_to_end(self) -> bytes:
        out = bytearray()
        while chunk := self._sock.recv(_READ):
            out += chunk
        return bytes(out)
