"""Pooled HTTP/1.1 keep-alive connections to the child: the proxy's upstream client.

A reverse proxy needs little of a general HTTP client (no cookies, redirects, URL objects,
automatic headers or per-request timeouts), and aiohttp's client spent most of the proxy's
CPU per request on exactly those. This is what nginx's upstream keepalive does: one request
at a time per connection, the response parsed by httptools (llhttp, Node.js's parser, as
uvicorn uses it), its body handed on as it arrives, with back-pressure toward the child.

Keep-alive race: the child may close an idle connection just as a request is sent on it.
Connections idle for `idle_timeout` (kept below the child's own) are never reused, and a
request on a reused connection that closes before a byte of answer is sent again once on a
new connection, if sending it twice is harmless: an idempotent method without a body (the
child may have read a POST before closing: nginx does not resend one either).

A 101 answer (`upgrade=True`) takes the connection out of the pool: `Response.upgraded()` is
then one end of a byte tunnel (serving/http.py's `Upgraded`).
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, AsyncIterator

import httptools

from serving.http import HOP_BY_HOP, TunnelEnd, without_named

if TYPE_CHECKING:
    from serving.express import Exchange

Headers = list[tuple[bytes, bytes]]

# Stop reading from the child while this much of a body waits for a slow client.
HIGH_WATER = 256 * 1024
# Methods whose requests may carry a body: always sent with a length (never chunked), even 0.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Sent again after the keep-alive race only these, and only without a body (RFC 9110 9.2.2).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class UpstreamError(ConnectionError):
    """The child could not be reached or broke off its answer."""


class NotReachable(UpstreamError):
    """No connection to the child (refused, timed out)."""


class ClosedEarly(UpstreamError):
    """The child closed or reset the connection (or answered something that is not HTTP)."""

    def __init__(self, message: str, *, before_answer: bool) -> None:
        super().__init__(message)
        self.before_answer = before_answer


class Response:
    """The child's answer: status and headers at once, the body as it arrives.

    `headers` are the end-to-end ones, as a proxy passes them on; the hop-by-hop ones
    (Connection, Content-Length, Transfer-Encoding, Upgrade, ...) are in `hop_headers`,
    names in lower case.
    """

    def __init__(self, connection: _Connection, status: int, reason: bytes, headers: Headers, content_length: int | None) -> None:
        self.status, self.reason, self.headers, self.content_length = status, reason, headers, content_length
        self._connection = connection
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self._error: Exception | None = None
        self.hop_headers: Headers = []

    async def read(self) -> bytes:
        if self.complete and self._error is None:  # most small answers arrive with their head
            body = b"".join(self._chunks)
            self._chunks.clear()
            return body
        return b"".join([chunk async for chunk in self.chunks()])

    def upgraded(self) -> _Connection:
        """After a 101: the connection, as one end of a byte tunnel (never pooled again)."""
        assert self.status == 101
        return self._connection

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as produced: whatever has arrived since the last step, in one piece."""
        while True:
            if self._chunks:
                chunk = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
                self._chunks.clear()
                self._buffered = 0
                self._connection.resume_reading()
                yield chunk
            elif self._error is not None:
                raise self._error
            elif self.complete:
                return
            else:
                self._waiter = self._connection.loop.create_future()
                await self._waiter

    def release(self) -> None:
        """Done with it: the connection goes back to the pool if the answer was whole."""
        self._connection.finished(reusable=self.complete and self._error is None)

    def close(self) -> None:
        """Abandon the answer (the client went away): drop the connection, so the child sees it."""
        self._connection.abort()

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER:
            self._connection.pause_reading()
        self._wake()

    def _end(self, error: Exception | None = None) -> None:
        if error is None:
            self.complete = True
        else:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the httptools parser calls its on_* methods."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.keep_alive = False
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._head_only = False  # an answer to HEAD: no body follows its head
        self._answered = False  # a byte of the current answer has arrived
        self._paused = False
        self._reason = b""
        self._headers: Headers = []
        self._content_length: int | None = None
        self._hop: Headers = []
        self._chunked = False
        self._upgraded: list[bytes] | None = None  # after a 101: bytes that came before the tunnel started
        self._peer: TunnelEnd | None = None  # the tunnel's other end
        self.express: Exchange | None = None  # an express lane's request under way (serving/express.py)
        self.checker: httptools.HttpResponseParser | None = None  # the lane's strict parser, for whole answers

    async def exchange(self, method: str, data: bytes) -> Response:
        """Send one request (head and body in `data`) and wait for the answer's head."""
        assert self.transport is not None
        if self._head_only:  # the parser still expects the body a HEAD answer announced
            self._parser = httptools.HttpResponseParser(self)
        self._head_only = method == "HEAD"
        self._head = self.loop.create_future()
        self._answered = False
        self._response = None
        self.transport.write(data)
        try:
            return await self._head
        except BaseException:
            self.abort()  # cancelled (client gone, timeout) or failed: the child must see it
            raise

    def resume(self, received: bytes) -> asyncio.Future[Response]:
        """Take over a request the express lane sent: parse what it received so far, as
        exchange() would have; the answer's head comes in the returned future, and cancelling
        it drops the connection, as a cancelled exchange() does."""
        self.express = None
        self._head = head = self.loop.create_future()
        head.add_done_callback(self._abandoned)
        self._answered = False
        self._response = None
        if received:
            self.data_received(received)
        return head

    def _abandoned(self, head: asyncio.Future[Response]) -> None:
        if head.cancelled():
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def finished(self, *, reusable: bool) -> None:
        if reusable and self.keep_alive and self.transport is not None and not self.transport.is_closing():
            self.pool._put_back(self)
        else:
            self.abort()

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.express is not None:
            self.express.data_received(data)
            return
        if self._peer is not None:
            self._peer.write(data)
            return
        if self._upgraded is not None:
            self._upgraded.append(data)
            return
        self._answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._response is None or self._response.status != 101:
                self._fail(ClosedEarly("the service switched protocols unasked", before_answer=False))
                self.abort()
                return
            self.keep_alive = False
            self._upgraded = [data[exc.args[0]:]]
            self._response._end()
        except httptools.HttpParserError as exc:
            self._fail(ClosedEarly(f"the service sent an invalid answer: {exc}", before_answer=False))
            self.abort()

    # one end of a byte tunnel, after a 101 (serving.http.Upgraded)

    def start(self, peer: TunnelEnd) -> None:
        self._peer = peer
        pending, self._upgraded = self._upgraded or [], None
        for data in pending:
            if data:
                peer.write(data)
        if self.transport is None:
            peer.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        if self._peer is not None:
            self._peer.pause_reading()

    def resume_writing(self) -> None:
        if self._peer is not None:
            self._peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool._forget(self)
        if self.express is not None:
            self.express.upstream_lost()  # the chain takes it; what follows fails or ends its answer
        if self._peer is not None:
            self._peer.close()
            return
        response = self._response
        if response is not None and not response.complete and not self._chunked and self._content_length is None:
            response._end()  # a body without length or chunks ends when the connection does
        else:
            self._fail(ClosedEarly(f"the service closed the connection{f': {exc}' if exc else ''}", before_answer=not self._answered))

    def _fail(self, error: ClosedEarly) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        elif self._response is not None and not self._response.complete:
            self._response._end(error)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._reason, self._headers, self._hop, self._content_length, self._chunked = b"", [], [], None, False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered not in HOP_BY_HOP:
            self._headers.append((name, value))
            return
        self._hop.append((lowered, value))
        if lowered == b"content-length":
            self._content_length = int(value)
        elif lowered == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 and status != 101:
            return  # an interim answer (100 Continue): the final one follows
        self.keep_alive = self._parser.should_keep_alive()
        headers = self._headers
        for name, value in self._hop:
            if name == b"connection" and value.lower() not in (b"keep-alive", b"close"):
                headers = without_named(headers, value)
        self._response = Response(self, status, self._reason, headers, self._content_length)
        self._response.hop_headers = self._hop
        if self._head_only:
            self._response._end()
        if self._head is not None and not self._head.done():
            self._head.set_result(self._response)

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._response.complete:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._response is not None and not self._response.complete:
            self.keep_alive = self._parser.should_keep_alive()
            self._response._end()


class UpstreamPool:
    """Keep-alive connections to one host:port, reused most-recent first."""

    def __init__(self, host: str, port: int, *, idle_timeout: float, connect_timeout: float = 5.0) -> None:
        self.host, self.port = host, port
        self.idle_timeout, self.connect_timeout = idle_timeout, connect_timeout
        self._idle: collections.deque[_Connection] = collections.deque()  # oldest first
        self._open: set[_Connection] = set()

    async def request(self, method: str, target: str, headers: Headers, body: bytes | None) -> Response:
        """Send a request (`target`: the path and query exactly as the client sent them)."""
        if body is None and method in BODY_METHODS:
            body = b""
        head = [f"{method} {target} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")]
        head += [b"%s: %s\r\n" % pair for pair in headers]
        if body is not None:
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        if body:
            head.append(body)
        data = b"".join(head)
        connection = self.take_idle()
        if connection is not None:
            try:
                return await connection.exchange(method, data)
            except ClosedEarly as exc:
                if not exc.before_answer or method not in IDEMPOTENT or body:
                    raise
                # The keep-alive race: nothing was answered and sending again is harmless.
        return await (await self._connect()).exchange(method, data)

    async def close(self) -> None:
        for connection in list(self._open):
            connection.abort()
        self._idle.clear()

    def take_idle(self) -> _Connection | None:
        """The most recently used idle connection still safe to reuse, or None."""
        idle = self._idle
        if not idle:
            return None
        now = idle[-1].loop.time()  # not asyncio.get_running_loop(): a getpid() system call each time
        while idle and now - idle[0].idle_since >= self.idle_timeout:
            idle.popleft().abort()  # the child may be closing it right now
        while idle:
            connection = idle.pop()
            if connection.transport is not None:
                return connection
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port), self.connect_timeout
            )
        except asyncio.TimeoutError as exc:
            raise NotReachable(f"no connection within {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise NotReachable(exc.strerror or str(exc)) from exc
        self._open.add(connection)
        return connection

    def _put_back(self, connection: _Connection) -> None:
        connection.idle_since = connection.loop.time()
        self._idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
