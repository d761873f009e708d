"""berth's HTTP/1.1 server side: an asyncio protocol on httptools (llhttp, strict parsing),
built as uvicorn's `httptools_impl` is, running one handler chain for every request.

Assembling a chain on it (serving/proxy.py does this for `berth boot`; the gateway likewise):

    from serving.http import Request, Response
    from serving.server import Server, ServerLimits

    async def hello(request: Request) -> Response:          # a handler: Request -> Response
        return Response(200, b"ok\\n", [(b"Content-Type", b"text/plain")])

    server = Server(hello, ServerLimits(header_timeout=30.0))  # a chain is handlers calling the next
    listener = await server.listen("127.0.0.1", 8080)
    ...
    listener.close(); await server.shutdown(grace=1.0)

A handler of a chain holds the next one and awaits it (serving/proxy.py's Drain, Timeout, ...).
To pass a request on upstream, serving/upstream.py's UpstreamPool: its answer's status,
end-to-end headers and body (`read()` or `chunks()`) go back as a `Response` or through
`request.send_stream()`; a 101 answer's `upgraded()` goes to `request.tunnel()`. Set
`request.body_limit` before `request.body()` (413 past it); `Server(on_refuse=...)` hears
the status of every answer the server gives itself (metrics).

The server owns the protocol: parsing, keep-alive, pipelined requests answered in order,
chunked bodies both ways with back-pressure, `Expect: 100-continue`, Upgrade as a byte tunnel
(`Request.tunnel`), the limits (431, 414, 400, 501, 417, 405) and the timeouts. Deadlines are
plain numbers checked by one sweep per server (no timer per request): the head's total time
(`header_timeout`, from its first byte: slowloris is cut), the gap between body chunks
(`body_timeout`), keep-alive idle (`keepalive_timeout`), and a handler's own deadline
(`Request.expire_in`, which cancels the handler). A client that goes away cancels its handler.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterable, Awaitable, Callable

import httptools

from serving.express import Exchange, Lane
from serving.http import REASONS, BodyError, BodyIncomplete, Request, Response, TunnelEnd, Upgraded, encode_headers

log = logging.getLogger("berth.server")

Handler = Callable[[Request], Awaitable[Response]]
KiB = 1024

# Stop reading a request body this large that no handler is reading yet (a pipelined one).
BODY_HIGH_WATER = 256 * KiB
NO_BODY_STATUSES = frozenset({204, 304})
_HOST, _LENGTH, _ENCODING, _EXPECT, _CONNECTION, _UPGRADE = range(6)
_NOTED = {b"host": _HOST, b"content-length": _LENGTH, b"transfer-encoding": _ENCODING, b"expect": _EXPECT,
          b"connection": _CONNECTION, b"upgrade": _UPGRADE}
_HEAD, _BODY, _IDLE = "a request head", "the request body", "keep-alive idle"


@dataclass(frozen=True)
class ServerLimits:
    max_header_size: int = 64 * KiB  # 431 beyond (nginx: large_client_header_buffers 4 x 8k; this fits LLM clients' headers)
    max_url: int = 8 * KiB  # 414 beyond, as nginx
    header_timeout: float = 30.0  # total time for one request head
    body_timeout: float = 60.0  # between two pieces of a request body (nginx: client_body_timeout 60 s)
    keepalive_timeout: float = 75.0  # nginx's; longer than any upstream pool's idle time


class Refused(Exception):
    """A request the server answers itself, then closes the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class Server:
    """Runs `handler` for each request on every connection it accepts."""

    def __init__(self, handler: Handler, limits: ServerLimits = ServerLimits(), *,
                 on_refuse: Callable[[int], None] | None = None, express: Lane | None = None) -> None:
        self.handler, self.limits, self.on_refuse = handler, limits, on_refuse
        self.express = express  # the handler's express form (serving/express.py), for plain requests
        self.connections: set[Connection] = set()
        self._tick = min(1.0, limits.header_timeout / 4, limits.body_timeout / 4, limits.keepalive_timeout / 4)
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def listen(self, host: str, port: int) -> asyncio.AbstractServer:
        """Bind now and serve; close the returned listener to stop accepting."""
        self._loop = loop = asyncio.get_running_loop()
        listener = await loop.create_server(lambda: Connection(self), host, port, reuse_address=True, backlog=1024)
        self._sweeper = loop.call_later(self._tick, self._sweep)
        if self.express is not None:
            self.deadline_after(self.express.timeout)  # the sweep runs often enough for the lane's deadlines
        return listener

    def deadline_after(self, seconds: float) -> float:
        """The loop time `seconds` from now; the sweep runs often enough to honour it."""
        assert self._loop is not None
        if 0 < seconds / 4 < self._tick:  # (a deadline already past: the next sweep finds it)
            self._tick = max(0.005, seconds / 4)
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = self._loop.call_later(self._tick, self._sweep)
        return self._loop.time() + seconds

    async def shutdown(self, grace: float) -> None:
        """Close idle connections now, let answers in progress finish within `grace`, cut the rest."""
        for connection in list(self.connections):
            connection.close_when_idle()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()

    def _sweep(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        for connection in list(self.connections):
            connection.check_deadlines(now)
        self._sweeper = self._loop.call_later(self._tick, self._sweep)


class Connection(asyncio.Protocol):
    """One client connection: the parser's callbacks build requests; one handler runs at a time."""

    def __init__(self, server: Server) -> None:
        self.server, self.limits = server, server.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.parser = httptools.HttpRequestParser(self)
        self.deadline: float | None = None
        self.deadline_for = _HEAD
        self.parsing: Request | None = None  # the request whose body the parser is on
        self.active: Request | None = None  # the request whose handler runs
        self.task: asyncio.Task | None = None  # serves the connection's requests one after another
        self._waiting: asyncio.Future[None] | None = None  # the task's wait for the next request
        self.pipeline: collections.deque[Request] = collections.deque()
        self.refusal: Refused | None = None  # to answer once the requests before it are answered
        self.closing = False  # the server is shutting down: close after the current answer
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._noted: list[tuple[int, bytes]] = []  # the headers _check_head looks at
        self._head_size = 0
        self._fresh = True  # no byte parsed yet: the head deadline runs from the connection's start
        self._reading = True
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._upgrade_pending: bytearray | None = None  # bytes after an upgrade request's head
        self._tunnel: TunnelEnd | None = None
        self._tunnel_done: asyncio.Future[None] | None = None
        self.exchange: Exchange | None = None  # a request on the express lane
        self._held: list[bytes] = []  # what arrived while it was under way
        self._in_message = False  # the parser is inside a request
        self._lane: Exchange | None = None  # this connection's place on the lane, made on first use

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.deadline = self.loop.time() + self.limits.header_timeout
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.exchange is not None:
            self._hold(data)
            return
        lane = self.server.express
        if (lane is not None and self.active is None and not self._in_message and not self.pipeline and self.refusal is None
                and self._tunnel is None and self._upgrade_pending is None):
            exchange = self._lane
            if exchange is None:
                exchange = self._lane = Exchange(self, lane)
            if exchange.begin(data, self.limits.max_url, self.limits.max_header_size):
                self.exchange, self.deadline, self._fresh = exchange, None, False
                return
        if self._tunnel is not None:
            self._tunnel.write(data)
            return
        if self._upgrade_pending is not None:
            self._upgrade_pending += data
            return
        if self.refusal is not None:
            return  # the parser stopped at an error: nothing after it is read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if not isinstance(refused, Refused):
                log.error("the server failed on a request from %s", self.peer, exc_info=refused)
                refused = Refused(500, "the server failed on this request")
            self._refuse(refused)
        except httptools.HttpParserError as exc:
            if data.startswith(b"PRI * HTTP/2.0") and self.active is None and not self.pipeline:
                self.abort()  # HTTP/2's preface: this server speaks HTTP/1.1 only
                return
            self._refuse(Refused(400, f"invalid request: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        if self.exchange is not None:
            self.exchange.client_lost()
            self.exchange = None
        if self.task is not None:
            self.task.cancel()  # the client went away: so does its request upstream
        gone = BodyIncomplete("the client closed the connection")
        for request in (self.parsing, *self.pipeline):
            if request is not None:
                request._fail(gone)
        self._wake_drained()
        if self._tunnel is not None:
            self._tunnel.close()
        if self._tunnel_done is not None and not self._tunnel_done.done():
            self._tunnel_done.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._tunnel is not None:
            self._tunnel.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drained()
        if self._tunnel is not None:
            self._tunnel.resume_reading()

    # --- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url, self._headers, self._noted, self._head_size = b"", [], [], 0
        self._in_message = True
        if self._fresh:
            self._fresh = False
        else:  # the head's total deadline runs from its first byte
            self.deadline, self.deadline_for = self.loop.time() + self.limits.header_timeout, _HEAD

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_url:
            raise Refused(414, f"the URL is longer than {self.limits.max_url} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        kind = _NOTED.get(name.lower())
        if kind is not None:
            self._noted.append((kind, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.limits.max_header_size:
            raise Refused(431, f"the request's headers are larger than {self.limits.max_header_size} bytes")

    def on_headers_complete(self) -> None:
        parser = self.parser
        request = Request(self, parser.get_method().decode(), self._url.decode("utf-8", "surrogateescape"),
                          parser.get_http_version(), self._headers)
        _check_head(request, self._noted, parser.should_upgrade())
        request.keep_alive = parser.should_keep_alive()
        if request.has_body:
            self.deadline, self.deadline_for = self.loop.time() + self.limits.body_timeout, _BODY
            self.parsing = request
        else:
            self.deadline = None
            request._end()
        self._start(request)

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None:
            return
        self.deadline = self.loop.time() + self.limits.body_timeout
        request._feed(body)
        if request is not self.active and request._size > BODY_HIGH_WATER:
            self.pause_reading()  # resumed when its handler reads it

    def on_message_complete(self) -> None:
        self._in_message = False
        request = self.parsing
        if request is not None:
            self.parsing = None
            self.deadline = None
            request._end()

    # --- handling ----------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        """Queue a request whose head is whole; the connection's one task answers them in order
        (one task per connection, not per request: a task costs more than the chain's work)."""
        self.pipeline.append(request)
        if self.task is None:
            self.task = self.loop.create_task(self._serve())
        elif self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    async def _serve(self) -> None:
        while True:
            if not self.pipeline:
                self._waiting = self.loop.create_future()
                await self._waiting  # cancelled when the client leaves
                continue
            request = self.active = self.pipeline.popleft()
            try:
                response = await self.server.handler(request)
            except asyncio.CancelledError:
                self.abort()  # the client left, or the handler's deadline passed with no one to answer
                return
            except BodyError as exc:  # left to the server by the handler: answered as nginx does
                if request.response_started is not None:
                    self.abort()
                    return
                if self.server.on_refuse is not None:
                    self.server.on_refuse(exc.status)
                response = Response(exc.status, str(exc).encode() + b"\n", [(b"Content-Type", b"text/plain; charset=utf-8")], close=True)
            except Exception:
                log.exception("the handler failed on %s %s", request.method, request.target)
                if request.response_started is not None:
                    self.abort()
                    return
                response = Response(500, b"the server failed on this request\n", [(b"Content-Type", b"text/plain; charset=utf-8")],
                                    close=True)
            if request.response_started is None:
                self.send(request, response)
            if not self._finished(request):
                return

    def _finished(self, request: Request) -> bool:
        """After an answer: whether the connection serves on."""
        self.active = None
        if self.transport is None:
            return False
        unread = request.expect_continue and not request._continued and not request._complete
        if request.close or unread or self.closing:
            self.transport.close()
            return False
        if not request._complete:
            request._fail(BodyIncomplete("answered before the body was read"))  # read on, keep none of it
        if not self.pipeline:
            if self.refusal is not None:
                self._send_refusal(self.refusal)
                return False
            if self.parsing is None and self.deadline is None:
                self.deadline, self.deadline_for = self.loop.time() + self.limits.keepalive_timeout, _IDLE
        self.resume_reading()
        return True

    # --- the express lane (serving/express.py) ---------------------------------------------

    def express_answered(self, head: bytes, body: bytes, close: bool) -> None:
        """The lane's answer (its head without the Connection line) in one write."""
        self.exchange = None
        if self.transport is None:
            return
        close = close or self.closing
        self.transport.write(b"".join((head, b"Connection: close\r\n\r\n" if close else b"\r\n", body)))
        if close:
            self.transport.close()
            return
        self.deadline, self.deadline_for = self.loop.time() + self.limits.keepalive_timeout, _IDLE
        if self._held or not self._reading:
            self._replay()

    def express_escalated(self, exchange: Exchange, sent: asyncio.Future | None) -> None:
        """The lane hands its request to the handler, as the parser would have built it; `sent`:
        the upstream exchange already under way, which the handler picks up (`Request.sent`)."""
        self.exchange = None
        request = _express_request(self, exchange)
        request.sent, request.ticket = sent, exchange.ticket
        self._start(request)
        self._replay()

    def _hold(self, data: bytes) -> None:
        """Bytes after a request on the lane (a pipelined one): read once it is answered, in order."""
        self._held.append(data)
        if sum(map(len, self._held)) > BODY_HIGH_WATER:
            self.pause_reading()

    def _replay(self) -> None:
        held, self._held = self._held, []
        self.resume_reading()
        for data in held:
            self.data_received(data)

    def _refuse(self, refused: Refused) -> None:
        """A protocol error: answered after the requests before it, then the connection closes.
        An error inside a body fails that request's body read instead (400, never passed on)."""
        self.pause_reading()
        if self.parsing is not None:
            self.parsing.close = True
            self.parsing._fail(BodyIncomplete(str(refused), refused.status))
            self.refusal = refused  # read no further; answered by the body's reader
            return
        if self.active is None and not self.pipeline:
            self._send_refusal(refused)
        else:
            self.refusal = refused

    def _send_refusal(self, refused: Refused) -> None:
        if self.server.on_refuse is not None:
            self.server.on_refuse(refused.status)
        log.debug("refused a request from %s: %d %s", self.peer, refused.status, refused)
        body = str(refused).encode() + b"\n"
        self.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                   % (refused.status, REASONS.get(refused.status, b"Error"), len(body), body))
        if self.transport is not None:
            self.transport.close()

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request's head: a WebSocket's bytes follow, to be
        tunnelled; any other upgrade (h2c) is ignored and parsing goes on in HTTP/1.1."""
        request = self.pipeline[-1] if self.pipeline else self.active
        if request is not None and request.upgrade:
            request.close = True  # after a refused upgrade the connection's bytes are not HTTP
            self._upgrade_pending = bytearray(rest)
            return
        self.parser = httptools.HttpRequestParser(self)
        self._fresh = False
        if rest:
            self.data_received(rest)

    # --- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def send(self, request: Request, response: Response) -> None:
        """A whole answer in one write."""
        status, body = response.status, response.body
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, response.reason or REASONS.get(status, b"Unknown"))]
        if response.headers:
            parts.append(encode_headers(response.headers))
        if status < 200 or status in NO_BODY_STATUSES:
            body = b""
        elif request.method == "HEAD":
            if response.length is not None:
                parts.append(b"Content-Length: %d\r\n" % response.length)
            body = b""
        else:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(self._connection_header(request, response.close))
        parts.append(body)
        request.response_started = time.perf_counter()
        self.write(b"".join(parts))

    async def send_stream(self, request: Request, response: Response, chunks: AsyncIterable[bytes], length: int | None) -> None:
        status = response.status
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, response.reason or REASONS.get(status, b"Unknown"))]
        if response.headers:
            parts.append(encode_headers(response.headers))
        bodiless = request.method == "HEAD" or status < 200 or status in NO_BODY_STATUSES
        chunked = False
        if length is not None:
            if status >= 200 and status not in NO_BODY_STATUSES:
                parts.append(b"Content-Length: %d\r\n" % length)
        elif not bodiless:
            if request.version == "1.1":
                chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                request.close = True  # HTTP/1.0: the body ends when the connection does
        parts.append(self._connection_header(request, response.close))
        request.response_started = time.perf_counter()
        self.write(b"".join(parts))
        if bodiless:
            return
        transport = self.transport
        async for chunk in chunks:
            if transport is None or transport.is_closing():
                raise BodyIncomplete("the client closed the connection")
            if chunked:
                if chunk:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if self._write_paused:
                await self._drain()
        if chunked and transport is not None:
            transport.write(b"0\r\n\r\n")

    async def tunnel(self, request: Request, response: Response, upstream: Upgraded) -> None:
        parts = [b"HTTP/1.1 101 %s\r\n" % (response.reason or b"Switching Protocols"), encode_headers(response.headers), b"\r\n"]
        request.response_started = time.perf_counter()
        self.write(b"".join(parts))
        self._tunnel_done = done = self.loop.create_future()
        pending, self._upgrade_pending = self._upgrade_pending, None
        self._tunnel = upstream
        if pending:
            upstream.write(bytes(pending))
        upstream.start(self)
        if self.transport is None:
            upstream.close()
            return
        try:
            await done
        finally:
            upstream.close()
            self.close()

    def _connection_header(self, request: Request, close: bool) -> bytes:
        if close or request.close or not request.keep_alive or self.closing:
            request.close = True
            return b"Connection: close\r\n\r\n"
        return b"Connection: keep-alive\r\n\r\n" if request.version == "1.0" else b"\r\n"

    async def _drain(self) -> None:
        if self.transport is None:
            raise BodyIncomplete("the client closed the connection")
        self._drained = self.loop.create_future()
        await self._drained
        if self.transport is None:
            raise BodyIncomplete("the client closed the connection")

    def _wake_drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # --- flow, deadlines, closing (TunnelEnd for the upstream side of a tunnel) ---------

    def pause_reading(self) -> None:
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading and self.transport is not None and self.refusal is None:
            self._reading = True
            self.transport.resume_reading()

    def resume_body(self) -> None:
        """A handler waits for its body: read on."""
        self.resume_reading()

    def check_deadlines(self, now: float) -> None:
        if self.exchange is not None and now >= self.exchange.deadline:
            self.exchange.expire()
        if self.deadline is not None and now >= self.deadline:
            log.debug("closing a connection from %s: no progress on %s in time", self.peer, self.deadline_for)
            self.deadline = None
            if self.parsing is not None and self.parsing is self.active:  # its handler answers 408, then we close
                self.refusal = Refused(408, "the request body stalled")
                self.pause_reading()
                self.parsing.close = True
                self.parsing._fail(BodyIncomplete(f"the request body stalled for {self.limits.body_timeout:g} s", 408))
                return
            self.abort()
        request = self.active
        if request is not None and request.deadline is not None and now >= request.deadline and not request.expired:
            request.expired = True
            if self.task is not None:
                self.task.cancel()

    def close_when_idle(self) -> None:
        self.closing = True
        if self.active is None and not self.pipeline and self.exchange is None and self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _express_request(connection: Connection, exchange: Exchange) -> Request:
    """The Request the parser and _check_head would have made of a request the express lane took."""
    request = Request(connection, exchange.method.decode(), exchange.target.decode(), "1.1", exchange.headers())
    request.started = exchange.started
    request.content_length = exchange.content_length
    if exchange.body:
        request._feed(exchange.body)
    request._end()
    return request


def _check_head(request: Request, noted: list[tuple[int, bytes]], upgrade: bool) -> None:
    """What a strict server checks in a head before any handler sees it (as nginx does);
    `noted`: the headers it looks at, by kind, as on_header found them."""
    if request.version not in ("1.1", "1.0"):
        raise Refused(400, f"HTTP/{request.version} is not served; use HTTP/1.1")
    hosts = 0
    upgrade_to = None
    for kind, value in noted:
        if kind == _HOST:
            hosts += 1
        elif kind == _LENGTH:
            request.content_length = int(value)  # llhttp let only digits through, one header
        elif kind == _ENCODING:
            if value.strip().lower() != b"chunked":  # llhttp accepts "identity, chunked"; nginx answers 501
                raise Refused(501, "only Transfer-Encoding: chunked is supported")
            request.chunked = True
        elif kind == _EXPECT:
            if value.strip().lower() != b"100-continue":
                raise Refused(417, "only Expect: 100-continue is supported")
            request.expect_continue = request.version == "1.1"
        elif kind == _CONNECTION:
            if value.lower() not in (b"keep-alive", b"close"):  # both hop-by-hop already
                request.hop_by_hop = request.hop_by_hop | {token.strip().lower() for token in value.split(b",")}
        else:
            upgrade_to = value.strip().lower()
    if request.method == "CONNECT":
        raise Refused(405, "CONNECT is not served")
    if hosts > 1 or (hosts == 0 and request.version == "1.1"):
        raise Refused(400, "a request needs exactly one Host header")
    target = request.target
    if target[:1] != "/" and not (target == "*" and request.method == "OPTIONS"):
        _absolute_form(request)
    request.upgrade = upgrade and upgrade_to == b"websocket" and request.method == "GET"


def _absolute_form(request: Request) -> None:
    """`GET http://host/path`: the path goes on, and the URL's host replaces the Host header (RFC 9112 3.2.2)."""
    target = request.target
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise Refused(400, f"the request target {target[:100]!r} is neither a path nor an http URL")
    authority, slash, path = rest.partition("/")
    authority = authority.rpartition("@")[2]
    if not authority:
        raise Refused(400, "the request URL has no host")
    request.target = "/" + path if slash else "/"
    if request.target == "/" and "?" in authority:
        authority, _, query = authority.partition("?")
        request.target = "/?" + query
    request.headers = [(name, value) for name, value in request.headers if name.lower() != b"host"]
    request.headers.append((b"Host", authority.encode()))
