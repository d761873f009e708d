"""berth's HTTP/1.1 server side over raw sockets: each strictness rule, framing, keep-alive,
pipelining, timeouts and back-pressure, against a real port and a small echo handler."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from serving.http import Request, Response
from serving.server import Server, ServerLimits


class Echo:
    """Answers with the request as JSON; /slow?s waits first; /stream sends many chunks."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.cancelled = 0
        self.chunks_made = 0

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request.target)
        if request.target.startswith("/slow"):
            try:
                await asyncio.sleep(float(request.target.split("=")[1]))
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if request.target == "/stream":
            await request.send_stream(Response(200, headers=[(b"Content-Type", b"application/octet-stream")]), self._chunks())
            return Response(200)
        body = await request.body() if request.has_body else b""
        echoed = {"method": request.method, "target": request.target, "version": request.version,
                  "headers": [[name.decode(), value.decode()] for name, value in request.headers], "body": body.decode()}
        return Response(200, json.dumps(echoed).encode(), [(b"Content-Type", b"application/json")])

    async def _chunks(self):
        for _ in range(4096):  # 256 MiB if nobody stopped it
            self.chunks_made += 1
            yield b"x" * 65536


class Serving:
    """The server on a free port in a thread of its own, so tests talk to it with plain sockets."""

    def __init__(self, limits: ServerLimits) -> None:
        self.handler = Echo()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def main() -> None:
            self.server = Server(self.handler, limits)
            self.listener = await self.server.listen("127.0.0.1", 0)
            self.port = self.listener.sockets[0].getsockname()[1]
            started.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(main()), self.loop.run_forever()), daemon=True)
        self.thread.start()
        assert started.wait(5)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return sock

    def __enter__(self) -> Serving:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        async def stop() -> None:
            self.listener.close()
            await self.server.shutdown(0.5)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def serving():
    with Serving(ServerLimits()) as serving:
        yield serving


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


_readers: dict[socket.socket, object] = {}


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length (the echo handler's), read no further."""
    reader = _readers.setdefault(sock, sock.makefile("rb"))
    status_line = reader.readline()
    assert status_line, "closed before a response"
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    return int(status_line.split()[1]), headers, reader.read(int(headers.get("content-length", "0")))


def exchange(serving: Serving, raw: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """Send `raw`; the response, and whether the server then closed the connection."""
    with serving.connect() as sock:
        sock.sendall(raw)
        status, headers, body = read_response(sock)
        sock.settimeout(1)
        try:
            closed = sock.recv(1) == b""
        except socket.timeout:
            closed = False
    return status, headers, body, closed


@pytest.mark.parametrize("raw, status", [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: something-else\r\n\r\n", 417),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n", 405),
    (b"GET /\r\n\r\n", 400),  # HTTP/0.9
])
def test_ambiguous_or_unsupported_requests_are_refused_and_never_handled(serving, raw, status):
    assert exchange(serving, raw)[0::3] == (status, True)
    assert serving.handler.seen == []


def test_an_invalid_chunk_size_is_400_and_the_body_never_reaches_a_handler(serving):
    raw = b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\nabc\r\n0\r\n\r\n"
    status, _, body, closed = exchange(serving, raw)
    assert (status, closed) == (400, True), body  # the handler's body read failed: nothing echoed


def test_oversized_headers_get_431_and_long_urls_414():
    with Serving(ServerLimits(max_header_size=1024)) as serving:
        assert exchange(serving, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 2000 + b"\r\n\r\n")[0::3] == (431, True)
        assert exchange(serving, b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")[0::3] == (414, True)
        assert exchange(serving, b"GET /" + b"u" * 8000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")[0] == 200


def test_http2_preface_is_closed_and_h2c_upgrade_served_as_http11(serving):
    with serving.connect() as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert read_all(sock) == b""
    raw = (b"GET /first HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
           b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
    with serving.connect() as sock:
        sock.sendall(raw)
        first, second = read_response(sock), read_response(sock)
    assert first[0] == 200 and "upgrade" not in first[1]
    assert json.loads(second[2])["target"] == "/second"


def test_pipelined_requests_are_answered_in_order(serving):
    with serving.connect() as sock:
        sock.sendall(b"GET /slow?s=0.3 HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
                     b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n")
        targets = [json.loads(read_response(sock)[2])["target"] for _ in range(3)]
    assert targets == ["/slow?s=0.3", "/b", "/c"]


def test_http10_closes_unless_keep_alive_is_asked(serving):
    status, headers, _, closed = exchange(serving, b"GET / HTTP/1.0\r\n\r\n")
    assert (status, closed, headers.get("connection")) == (200, True, "close")
    status, headers, _, closed = exchange(serving, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert (status, closed, headers.get("connection")) == (200, False, "keep-alive")


def test_absolute_form_target_becomes_a_path_and_its_host_the_host(serving):
    body = exchange(serving, b"GET http://other.example:81/p?q=1 HTTP/1.1\r\nHost: a\r\n\r\n")[2]
    echoed = json.loads(body)
    assert echoed["target"] == "/p?q=1"
    assert [value for name, value in echoed["headers"] if name.lower() == "host"] == ["other.example:81"]


def test_chunked_request_body_is_read_whole(serving):
    raw = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    assert json.loads(exchange(serving, raw)[2])["body"] == "abcdefg"


def test_expect_100_continue_is_answered_when_the_body_is_read(serving):
    with serving.connect() as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        status, _, body = read_response(sock)
    assert status == 200 and json.loads(body)["body"] == "hello"


def test_header_timeout_is_a_total_deadline_for_every_request_head():
    with Serving(ServerLimits(header_timeout=0.5)) as serving:
        """A trickled head is cut after header_timeout however steadily it trickles, first or later request."""
        for first in (True, False):
            with serving.connect() as sock:
                if not first:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                    assert read_response(sock)[0] == 200
                started = time.monotonic()
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    for byte in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"z" * 100:
                        sock.sendall(bytes([byte]))
                        time.sleep(0.05)
                        if time.monotonic() - started > 3:
                            break
                assert time.monotonic() - started < 1.5


def test_a_stalled_body_gets_408_within_the_body_timeout():
    with Serving(ServerLimits(body_timeout=0.4)) as serving:
        with serving.connect() as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhalf ")
            started = time.monotonic()
            status = read_response(sock)[0]
            assert read_all(sock) == b""
        assert status == 408 and time.monotonic() - started < 1.5


def test_idle_keep_alive_connections_are_closed():
    with Serving(ServerLimits(keepalive_timeout=0.4)) as serving:
        with serving.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(sock)[0] == 200
            started = time.monotonic()
            assert read_all(sock) == b""
        assert 0.3 < time.monotonic() - started < 1.5


def test_a_client_that_goes_away_cancels_its_handler(serving):
    with serving.connect() as sock:
        sock.sendall(b"GET /slow?s=5 HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.2)
    deadline = time.monotonic() + 3
    while serving.handler.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert serving.handler.cancelled == 1


def test_a_streamed_response_waits_for_a_slow_reader(serving):
    """Back-pressure: a client that reads nothing stops the producer after a few buffers."""
    with serving.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.5)
        made = serving.handler.chunks_made
        time.sleep(0.3)
        assert serving.handler.chunks_made == made  # stopped, not buffering the whole 256 MiB
        assert made < 200
        data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked" in data
