"""berth's small HTTP/1.1 request and response types, shared by every handler chain.

Headers stay as the client sent them: a list of (name, value) byte pairs, names in their
own case (`Request.header(b"host")` looks one up case-insensitively). A handler answers by
returning a `Response` (the server writes it), or, to stream, by calling
`request.send_stream()` itself; either way the server then serves the connection's next
request. Bodies are read with `await request.body()`, which answers `Expect: 100-continue`
on first use and stops at `request.body_limit` (BodyTooLarge); a handler may leave a
BodyError to the server, which answers its status (413, 400, 408) and closes.
"""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, AsyncIterable, Iterable, Protocol

if TYPE_CHECKING:
    from serving.server import Connection

Headers = list[tuple[bytes, bytes]]

# Headers for one connection only (RFC 9110 7.6.1), never passed on by a proxy (its own
# framing replaces Content-Length), with those the Connection header names.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te", b"trailer",
    b"trailers", b"transfer-encoding", b"upgrade", b"content-length",
})
REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
REASONS[499] = b"Client Closed Request"


class BodyError(Exception):
    """The request body cannot be had; the server answers `status` and closes the connection."""

    status = 400


class BodyTooLarge(BodyError):
    """The request body grew past `request.body_limit` while being read."""

    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over the limit of {limit} bytes")


class BodyIncomplete(BodyError):
    """The body broke off: invalid chunked framing (400), too slow (408), the client gone."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Response:
    """A whole answer: status, headers (byte pairs), body bytes.

    `length` is for HEAD answers, which announce the length of a body they do not carry;
    `close` ends the connection after this answer.
    """

    __slots__ = ("status", "headers", "body", "reason", "length", "close")

    def __init__(self, status: int, body: bytes = b"", headers: Headers | None = None, *, reason: bytes | None = None,
                 length: int | None = None, close: bool = False) -> None:
        self.status, self.body, self.headers = status, body, headers if headers is not None else []
        self.reason, self.length, self.close = reason, length, close


class Request:
    """One request as parsed; the body arrives after the head, read through `body()`."""

    __slots__ = (
        "method", "target", "version", "headers", "peer", "scheme", "content_length", "chunked", "keep_alive",
        "upgrade", "hop_by_hop", "expect_continue", "body_limit", "deadline", "expired", "response_started", "close",
        "started", "sent", "ticket", "_connection", "_parts", "_size", "_complete", "_waiter", "_failed", "_continued",
    )

    def __init__(self, connection: Connection, method: str, target: str, version: str, headers: Headers) -> None:
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.peer = connection.peer
        self.scheme = "http"
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.upgrade = False  # a WebSocket upgrade: answered by a tunnel
        self.hop_by_hop: frozenset[bytes] = frozenset()  # header names the Connection header lists
        self.expect_continue = False
        self.body_limit: int | None = None
        self.deadline: float | None = None  # loop time past which the server cancels the handler
        self.expired = False  # the server cancelled the handler at `deadline`
        self.response_started: float | None = None  # perf_counter at the answer's first byte
        self.close = False  # end the connection after this answer
        self.started = time.perf_counter()
        self.sent: asyncio.Future | None = None  # an upstream exchange the express lane started, for the handler to pick up
        self.ticket: object = None  # what the lane noted when it took the request (serving/express.py's Lane.take)
        self._connection = connection
        self._parts: list[bytes] = []
        self._size = 0
        self._complete = False
        self._waiter: asyncio.Future[None] | None = None
        self._failed: BaseException | None = None
        self._continued = False

    def header(self, lowered_name: bytes) -> bytes | None:
        """The first value of a header (name given in lower case), or None."""
        for name, value in self.headers:
            if name.lower() == lowered_name:
                return value
        return None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def expire_in(self, seconds: float) -> None:
        """Cancel the handler after `seconds` (the server checks deadlines; no timer per request)."""
        self.deadline = self._connection.server.deadline_after(seconds)

    async def body(self) -> bytes:
        """The whole body; BodyTooLarge past `body_limit`, BodyIncomplete if it broke off."""
        if self.expect_continue and not self._continued and not self._complete:
            self._continued = True
            self._connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.body_limit is not None and self._size > self.body_limit:
            raise BodyTooLarge(self.body_limit)  # arrived whole before the limit was set
        while not self._complete:
            if self._failed is not None:
                raise self._failed
            self._waiter = asyncio.get_running_loop().create_future()
            self._connection.resume_body()
            await self._waiter
        if self._failed is not None:
            raise self._failed
        if len(self._parts) != 1:
            self._parts = [b"".join(self._parts)]
        return self._parts[0]

    def send(self, response: Response) -> None:
        self._connection.send(self, response)

    async def send_stream(self, response: Response, chunks: AsyncIterable[bytes], length: int | None = None) -> None:
        """The head now, then each chunk as it comes, waiting while the client reads slowly."""
        await self._connection.send_stream(self, response, chunks, length)

    async def tunnel(self, response: Response, upstream: Upgraded) -> None:
        """Answer 101 and relay bytes both ways until either side closes (WebSocket)."""
        await self._connection.tunnel(self, response, upstream)

    def abort(self) -> None:
        """Cut the client's connection (an answer already started cannot change its status)."""
        self._connection.abort()

    # the server's side

    def _feed(self, data: bytes) -> None:
        self._size += len(data)
        if self.body_limit is not None and self._size > self.body_limit:
            self._fail(BodyTooLarge(self.body_limit))
            return
        self._parts.append(data)
        self._wake()

    def _end(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._failed is None and not self._complete:
            self._failed = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class TunnelEnd(Protocol):
    """One side of a byte tunnel, as the other side sees it."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Upgraded(TunnelEnd, Protocol):
    """The upstream side of a tunnel, before it starts."""

    def start(self, peer: TunnelEnd) -> None:
        """From now on hand every byte (and those already received) to `peer.write`, pause
        and resume `peer`'s reading with this side's write buffer, `peer.close()` at the end."""


def without_named(headers: Headers, connection: bytes) -> Headers:
    """`headers` without those a Connection header's value names."""
    named = {token.strip().lower() for token in connection.split(b",")}
    return [(name, value) for name, value in headers if name.lower() not in named]


def encode_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join([b"%s: %s\r\n" % pair for pair in headers])
