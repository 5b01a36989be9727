"""The REST transport's HTTP/1.1 exchange, against a loopback server that answers with scripted
bytes (split anywhere, chunked, closing early): every answer HTTP/1.1 allows is read whole, a
kept-alive connection the server closed is reopened once, and a broken answer is a retryable
error."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence

import pytest

from steplog.errors import PermanentError, RetryableError
from steplog.sinks.mlflow.http1 import Http1Socket, ResponseError, host_header
from steplog.sinks.mlflow.rest import _Connection

pytestmark = pytest.mark.timeout(60)

Answer = Sequence[bytes]
"""The pieces an answer is sent in (a short pause between them), then ``b"CLOSE"`` to close the
connection after it, or ``b"RESET"`` to abort it."""


class ScriptedServer:
    """Answers the n-th request with the n-th answer of ``script``, on whatever connection it
    came; records each request's bytes and counts connections. Bounded: it stops after the
    test, and each wait for a request lasts at most 10 s."""

    def __init__(self, script: Sequence[Answer]) -> None:
        self.script = list(script)
        self.requests: list[bytes] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(10)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self.script:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(10)
                while self.script:
                    request = self._read_request(conn)
                    if request is None:
                        break
                    self.requests.append(request)
                    closing = False
                    for piece in self.script.pop(0):
                        if piece == b"RESET":  # abort with a TCP RST once the answer is out
                            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                            struct.pack("ii", 1, 0))
                            closing = True
                            break
                        if piece == b"CLOSE":
                            closing = True
                            break
                        try:
                            conn.sendall(piece)
                        except OSError:  # the client gave up on the answer
                            closing = True
                            break
                        time.sleep(0.01)
                    if closing:
                        break

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes | None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                body += conn.recv(65536)
        except OSError:
            return None
        return data

    def stop(self) -> None:
        self.script.clear()
        self._listener.close()
        self._thread.join(10)


@pytest.fixture
def serve() -> Iterator[type[ScriptedServer]]:
    servers: list[ScriptedServer] = []

    class Started(ScriptedServer):
        def __init__(self, script: Sequence[Answer]) -> None:
            super().__init__(script)
            servers.append(self)

    yield Started
    for s in servers:
        s.stop()


def ok(body: bytes, *extra: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"".join(extra)
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def connection(server: ScriptedServer) -> _Connection:
    return _Connection(urllib.parse.urlsplit(f"http://127.0.0.1:{server.port}/base"), 5.0, None)


def test_an_answer_split_anywhere_is_read_whole_and_the_connection_kept(serve) -> None:
    whole = ok(b'{"run": {"info": {"run_id": "abc"}}}')
    server = serve([[whole[:5], whole[5:40], whole[40:-3], whole[-3:]], [ok(b"{}")]])
    wire = Http1Socket(("127.0.0.1", server.port), f"127.0.0.1:{server.port}", 5.0, 60.0)
    try:
        assert wire.exchange("POST", "/x", {}, b"{}") == (
            200, b'{"run": {"info": {"run_id": "abc"}}}', True)
        assert wire.exchange("GET", "/y?a=1", {}, None) == (200, b"{}", True)
    finally:
        wire.close()
    assert server.connections == 1


def test_the_request_carries_host_length_and_the_callers_headers(serve) -> None:
    server = serve([[ok(b"{}")], [ok(b"{}")]])
    conn = connection(server)
    conn.request("POST", "/base/api/2.0/mlflow/runs/log-batch", b'{"a": 1}',
                 {"Authorization": "Bearer t", "Content-Type": "application/json"})
    conn.request("GET", "/base/api/2.0/mlflow/runs/get?run_id=r", None, {})
    conn.close_connection()
    post, get = server.requests
    head = post.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /base/api/2.0/mlflow/runs/log-batch HTTP/1.1"
    assert {b"Host: 127.0.0.1:%d" % server.port, b"Authorization: Bearer t",
            b"Content-Length: 8", b"Content-Type: application/json"} <= set(head[1:])
    assert post.endswith(b'\r\n\r\n{"a": 1}')
    assert b"Content-Length" not in get  # a GET without a body, as http.client sends it


def test_a_chunked_answer_with_extensions_and_trailers_is_read_whole(serve) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
    server = serve([[chunked[:30], chunked[30:61], chunked[61:]], [ok(b"next")]])
    conn = connection(server)
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"hello world")
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"next")
    assert server.connections == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\n\r\n{}",  # no length: the body ends with the connection
], ids=["connection close", "HTTP/1.0", "body to the end"])
def test_an_answer_that_ends_the_connection_is_read_and_the_next_request_reconnects(
        serve, answer: bytes) -> None:
    server = serve([[answer, b"CLOSE"], [ok(b"again")]])
    conn = connection(server)
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"{}")
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"again")
    assert server.connections == 2


def test_interim_answers_are_skipped(serve) -> None:
    server = serve([[b"HTTP/1.1 100 Continue\r\n\r\n", ok(b"done")]])
    assert connection(server).request("POST", "/x", b"{}", {}) == (200, b"done")


def test_a_kept_alive_connection_the_server_closed_while_idle_is_reopened_once(serve) -> None:
    server = serve([[ok(b"first"), b"CLOSE"], [ok(b"second")]])
    conn = connection(server)
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"first")
    time.sleep(0.1)  # the server has closed its end meanwhile
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"second")
    assert server.connections == 2


def test_a_request_that_must_not_be_repeated_is_not_resent_on_a_closed_connection(
        serve) -> None:
    server = serve([[ok(b"first"), b"CLOSE"], [ok(b"never")]])
    conn = connection(server)
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"first")
    time.sleep(0.1)
    with pytest.raises(RetryableError):
        conn.request("POST", "/x", b"{}", {}, resend=False)
    assert len(server.requests) == 1


def test_a_kept_alive_connection_the_server_reset_while_idle_is_reopened_once(serve) -> None:
    server = serve([[ok(b"first"), b"RESET"], [ok(b"second")]])
    conn = connection(server)
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"first")
    time.sleep(0.1)
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"second")
    assert server.connections == 2


@pytest.mark.parametrize(("method", "answer"), [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"),
    ("POST", b"HTTP/1.1 204 No Content\r\n\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"),
], ids=["HEAD", "204", "304"])
def test_an_answer_without_a_body_ends_at_its_head(serve, method: str, answer: bytes) -> None:
    server = serve([[answer], [ok(b"next")]])
    conn = connection(server)
    assert conn.request(method, "/x", b"{}" if method == "POST" else None, {})[1] == b""
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"next")
    assert server.connections == 1


def test_an_answer_with_bare_line_feeds_and_repeated_equal_lengths_is_read(serve) -> None:
    server = serve([[b"HTTP/1.1 200 OK\nContent-Length: 2\nContent-Length: 2\n\n{}"]])
    assert connection(server).request("POST", "/x", b"{}", {}) == (200, b"{}")


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer tok\n"},
    {"Authorization": "Bearer abc\r\nX-Evil: 1"},
    {"X-Bad\r\nName": "v"},
    {"X-Nul": "a\0b"},
], ids=["trailing newline", "injected header", "bad name", "NUL"])
def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(
        serve, headers: dict[str, str]) -> None:
    server = serve([[ok(b"fine")]])
    conn = connection(server)
    with pytest.raises(ValueError, match="line break or a NUL"):
        conn.request("POST", "/x", b"{}", headers)
    with pytest.raises(ValueError, match="space or a control character"):
        conn.request("POST", "/x y", b"{}", {})
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"fine")
    assert len(server.requests) == 1


@pytest.mark.parametrize(("url", "host"), [
    ("http://127.0.0.1:5000/x", "127.0.0.1:5000"),
    ("http://user:p%40ss@example.com/", "example.com"),
    ("http://[::1]:5000", "[::1]:5000"),
    ("https://Bücher.example:8443", "xn--bcher-kva.example:8443"),
])
def test_the_host_header_names_the_host_in_ascii_with_the_urls_port(url: str, host: str) -> None:
    assert host_header(urllib.parse.urlsplit(url)) == host


@pytest.mark.parametrize("answer", [
    [b"SPDY/3 200 OK\r\n\r\n"],
    [b"HTTP/1.1 \xb200 OK\r\nContent-Length: 30\r\n\r\nHTTP/1.1 201 Fake\r\n\r\n"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 0_2\r\n\r\n{}"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n{}"],
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n"],
    [b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", b"CLOSE"],
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
    [b"HTTP/1.1 200 OK\r\nContent-Len", b"CLOSE"],
    [b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\n{}"],
], ids=["not HTTP", "non-ASCII digit", "bad length", "huge length", "negative chunk",
        "bad header", "body cut short", "bad chunk size", "head cut short",
        "four-digit status"])
def test_a_broken_answer_is_a_retryable_error_and_the_connection_is_dropped(
        serve, answer: list[bytes]) -> None:
    server = serve([answer, [ok(b"fine")]])
    conn = connection(server)
    with pytest.raises(RetryableError, match="POST /x"):
        conn.request("POST", "/x", b"{}", {})
    assert conn.request("POST", "/x", b"{}", {}) == (200, b"fine")
    assert server.connections == 2


def test_a_server_that_never_answers_is_a_retryable_error_within_the_timeout(serve) -> None:
    server = serve([[]])  # reads the request, answers nothing
    conn = _Connection(urllib.parse.urlsplit(f"http://127.0.0.1:{server.port}"), 0.3, None)
    start = time.monotonic()
    with pytest.raises(RetryableError):
        conn.request("POST", "/x", b"{}", {}, resend=False)
    assert time.monotonic() - start < 3


@contextlib.contextmanager
def wire_to(server: ScriptedServer, total_s: float = 60.0) -> Iterator[Http1Socket]:
    """An HTTP/1.1 connection to ``server`` (5 s per wait), closed when the block ends."""
    wire = Http1Socket(("127.0.0.1", server.port), "h", 5.0, total_s)
    try:
        yield wire
    finally:
        wire.close()


def test_a_head_longer_than_64_kib_is_refused(serve) -> None:
    server = serve([[b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"]])
    with wire_to(server) as wire, pytest.raises(ResponseError, match="64 KiB"):
        wire.exchange("POST", "/x", {}, b"{}")


def test_more_than_ten_interim_answers_are_refused(serve) -> None:
    server = serve([[b"HTTP/1.1 100 Continue\r\n\r\n"] * 11 + [ok(b"done")]])
    with wire_to(server) as wire, pytest.raises(ResponseError, match="interim"):
        wire.exchange("POST", "/x", {}, b"{}")


def test_trailers_longer_than_64_kib_are_refused(serve) -> None:
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
    server = serve([[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
                     + trailers + b"\r\n"]])
    with wire_to(server) as wire, pytest.raises(ResponseError, match="trailers"):
        wire.exchange("POST", "/x", {}, b"{}")


def test_an_answer_dripping_in_past_the_exchanges_bound_times_out(serve) -> None:
    whole = ok(b"x" * 200)
    server = serve([[whole[i:i + 1] for i in range(len(whole))]])  # a byte every 10 ms
    start = time.monotonic()
    with wire_to(server, total_s=0.5) as wire, pytest.raises(TimeoutError,
                                                             match=r"longer than 0\.5 s"):
        wire.exchange("POST", "/x", {}, b"{}")
    assert time.monotonic() - start < 1.5


def tls_server_context(tmp_path) -> tuple[ssl.SSLContext, str]:
    """A server's TLS context with a certificate for 127.0.0.1 that no authority signed, and
    that certificate's PEM file."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, str(cert_file)


class _OneShotServer:
    """Accepts one connection on loopback within 10 s and hands it to ``answer``."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(10)
        self.port = self._listener.getsockname()[1]
        self._answer = answer
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):  # the client gave up
                self._answer(conn)

    def stop(self) -> None:
        self._listener.close()
        self._thread.join(10)


def https_to(server: _OneShotServer, context: ssl.SSLContext) -> _Connection:
    """The REST transport's connection to ``server`` over TLS (5 s per wait)."""
    return _Connection(urllib.parse.urlsplit(f"https://127.0.0.1:{server.port}"), 5.0, context)


def request_over_tls(handle: Callable[[socket.socket], None], context: ssl.SSLContext,
                     resend: bool = True) -> None:
    """One REST transport request over TLS (5 s per wait) to a server that serves its
    connection with ``handle``; raises what the request raises."""
    server = _OneShotServer(handle)
    try:
        https_to(server, context).request("POST", "/x", b"{}", {}, resend=resend)
    finally:
        server.stop()


def test_a_server_certificate_that_fails_verification_is_a_permanent_error(tmp_path) -> None:
    server_side, _ = tls_server_context(tmp_path)

    def handshake(conn: socket.socket) -> None:
        server_side.wrap_socket(conn, server_side=True).close()

    with pytest.raises(PermanentError, match="CERTIFICATE_VERIFY_FAILED"):
        request_over_tls(handshake, ssl.create_default_context())


def test_https_to_a_plain_http_server_is_a_permanent_error() -> None:
    def plain(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    with pytest.raises(PermanentError, match="WRONG_VERSION_NUMBER"):
        request_over_tls(plain, ssl.create_default_context())


def test_a_tls_connection_the_server_cuts_mid_handshake_is_retryable(tmp_path) -> None:
    def cut(conn: socket.socket) -> None:
        conn.recv(65536)  # the client's hello, then nothing: the connection ends

    with pytest.raises(RetryableError):
        request_over_tls(cut, ssl.create_default_context())


def test_a_tls_stream_damaged_after_the_handshake_is_retryable(tmp_path) -> None:
    # OpenSSL names this WRONG_VERSION_NUMBER too, as for plain HTTP at the other end; only in
    # the handshake does it mean a setup that cannot work.
    server_side, cert = tls_server_context(tmp_path)

    def plaintext_after_handshake(conn: socket.socket) -> None:
        tls = server_side.wrap_socket(conn, server_side=True)
        tls.recv(65536)  # the request
        os.write(tls.fileno(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        time.sleep(0.5)

    with pytest.raises(RetryableError, match="WRONG_VERSION_NUMBER"):
        request_over_tls(plaintext_after_handshake, ssl.create_default_context(cafile=cert),
                         resend=False)


def test_a_certificate_failure_mlflows_client_reports_is_a_permanent_error(
    tmp_path, monkeypatch
) -> None:
    # MLflow's http_request raises its own MlflowException (HTTP 500) with requests' SSLError
    # only as its context: the sink host's transport still sees the certificate failure.
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    from steplog.sinks.mlflow.client import _mlflow_errors

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server_side, _ = tls_server_context(tmp_path)

    def handshake(conn: socket.socket) -> None:
        server_side.wrap_socket(conn, server_side=True).close()

    server = _OneShotServer(handshake)
    try:
        with pytest.raises(PermanentError, match="CERTIFICATE_VERIFY_FAILED"), _mlflow_errors():
            http_request(MlflowHostCreds(f"https://127.0.0.1:{server.port}"),
                         "/api/2.0/mlflow/experiments/get", "GET", timeout=5)
    finally:
        server.stop()
