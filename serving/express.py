"""The express lane: the common request, passed on as bytes without a handler chain.

Most requests to a model service are alike: HTTP/1.1, one head and a small body that arrive
in one read, nothing hop-by-hop, and a small answer with a Content-Length. For those a
handler chain (coroutines, a Request object, a parser callback per header, futures between
the two sides) costs more than the bytes themselves. The lane takes such a request in one
synchronous step: llhttp checks the whole message with no callback into Python (what the
lane passes on, the server's strict parser accepts), one scan finds the few headers that
matter (Host, Content-Length, Authorization, X-Forwarded-*, and any that send the request
to the chain; `scan_request` and `read_answer` below, in C from serving/_express.c where it
was built), the assembly's lane (serving/proxy.py's `Express` for `berth
boot`) decides and rewrites it, and it goes to an idle pooled connection as one write. The
answer is checked the same way and goes back as one write. Header lines pass as written.

Anything else never enters the lane, or leaves it: `Exchange.escalate()` builds the Request
the server would have built and runs the assembly's chain on it, with the upstream exchange
already in flight (`Request.sent`), so the chain keeps every uncommon case (an answer that
streams, 1xx, an upstream that broke off, the request timeout's 504, the keep-alive race).
tests/test_express.py holds the lane to the chain: the same requests reach the app, the same
answers come back.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Protocol

import httptools

from serving.upstream import BODY_METHODS, IDEMPOTENT

if TYPE_CHECKING:
    from serving.server import Connection
    from serving.upstream import UpstreamPool, _Connection

# Methods and target characters llhttp's strict mode always accepts (RFC 3986's characters).
REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE|OPTIONS|PATCH) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*) HTTP/1\.1\r\n")
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9]) ([\t -~]*)\r\n")
# The header lines the lane looks at, found in "\n" + the header block, as (line less its
# "\n", name, value): forwarding ones, framing, and any that sends the request to the chain.
REQUEST_NOTED = re.compile(rb"\n((host|content-length|authorization|x-forwarded-for|x-forwarded-proto|x-forwarded-host|connection|"
                           rb"keep-alive|proxy-[^:]*|te|trailers?|transfer-encoding|upgrade|expect):[ \t]*([^\r]*)\r)", re.I)
RESPONSE_NOTED = re.compile(rb"\n((content-length|connection|keep-alive|proxy-[^:]*|te|trailers?|transfer-encoding|upgrade):[ \t]*"
                            rb"([^\r]*)\r)", re.I)
# Request headers the lane passes on as the chain would, or cuts; any other noted one (hop-by-hop,
# Expect, Upgrade) sends the request to the chain, which answers or refuses it.
_FORWARDING = frozenset({b"content-length", b"authorization", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# Answers the chain streams: larger ones.
SMALL_ANSWER = 64 * 1024
# Statuses the chain answers: no body by status, and 503 (a refusal a gateway retries elsewhere).
_CHAIN_STATUSES = frozenset({204, 304, 503})
_BODY_METHODS = frozenset(method.encode() for method in BODY_METHODS)  # sent with a length even when empty
SILENT = object()  # a parser's protocol with no on_* method: llhttp checks a message and calls nothing


class Lane(Protocol):
    """An assembly's express form: what its chain would do with a plain request and answer."""

    timeout: float  # the request's deadline, as the chain's Timeout handler has it

    def take(self, exchange: Exchange) -> tuple[UpstreamPool, bytes] | None:
        """Accept the request (the pool to send it through, the bytes to send: `forwarded`) or decline it."""

    def finish(self, exchange: Exchange, status: int) -> bool:
        """The answer went out (`status`; 499: the client left): count it. True: close the connection."""

    def release(self, exchange: Exchange) -> None:
        """The request leaves the lane for the chain: undo what `take` counted (the chain counts it again)."""


class Exchange:
    """A client connection's request on the lane, from its head to its answer (or to the chain);
    one per connection, reused request after request."""

    __slots__ = ("client", "lane", "checker", "method", "target", "block", "body", "content_length", "host", "authorization",
                 "noted", "upstream", "started", "deadline", "received", "answer", "ticket")

    def __init__(self, client: Connection, lane: Lane) -> None:
        self.client, self.lane = client, lane
        # llhttp's verdict on each whole request, with no callback into Python: the lane passes
        # on only what the server's strict parser accepts.
        self.checker = httptools.HttpRequestParser(SILENT)
        self.upstream: _Connection | None = None
        self.ticket: object = None  # the lane's own note of the request, set by its take()

    def begin(self, data: bytes, max_url: int, max_header_size: int) -> bool:
        """Take `data`, one whole request, and send it upstream; False: the chain's (nothing sent, nothing counted)."""
        scanned = scan_request(data, max_url, max_header_size)
        if scanned is None:
            return False
        try:
            self.checker.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.checker = httptools.HttpRequestParser(SILENT)  # an error stops a parser
            return False
        self.method, self.target, self.block, self.body, self.content_length, self.host, self.authorization, self.noted = scanned
        self.received = self.answer = None
        self.started = time.perf_counter()
        plan = self.lane.take(self)
        if plan is None:
            return False
        pool, request = plan
        upstream = pool.take_idle()
        if upstream is None:  # connecting is the chain's (its timeout, its errors)
            self.lane.release(self)
            return False
        self.upstream = upstream
        upstream.express = self
        self.deadline = self.client.loop.time() + self.lane.timeout
        upstream.write(request)
        return True

    def forwarded(self, target: bytes, peer: bytes, drop: frozenset[bytes]) -> bytes:
        """The request as serving/proxy.py's `forwarded_headers` and the upstream pool would send
        it: Content-Length and `drop` cut, X-Forwarded-For gaining `peer`, X-Forwarded-Proto set,
        X-Forwarded-Host added unless passed on, then the body."""
        block = self.block
        prior = None
        forwarded_host = False
        for line, name, value in self.noted:
            if name == b"x-forwarded-for" and name not in drop:
                prior = value
            elif name == b"x-forwarded-host" and name not in drop:
                forwarded_host = True
                continue
            elif name == b"authorization" and name not in drop:
                continue
            block = block.replace(b"\n" + line + b"\n", b"\n")  # (each noted name once: no other line can match)
        parts = [self.method, b" ", target, b" HTTP/1.1\r", block, b"X-Forwarded-For: ", prior + b", " + peer if prior else peer,
                 b"\r\nX-Forwarded-Proto: http\r\n"]
        if not forwarded_host:
            parts += (b"X-Forwarded-Host: ", self.host, b"\r\n")
        body = self.body
        if body or self.method in _BODY_METHODS:
            parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
            parts.append(body)
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The request's headers as the server's parser lists them (for the chain, taking it over)."""
        pairs = []
        for line in self.block[1:].split(b"\r\n")[:-1]:
            name, _, value = line.partition(b":")
            pairs.append((name, value.strip(b" \t")))
        return pairs

    # --- the upstream's side ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        received = self.received
        if received is not None:
            received += data
            data = bytes(received)
        answer = self.answer or self._read_answer(data)
        if answer is None:
            return
        status, start, length, head = answer
        end = start + length
        if len(data) < end:  # more of the body to come
            if received is None:
                self.received = bytearray(data)
            return
        upstream = self.upstream
        try:
            if len(data) > end:
                raise httptools.HttpParserError("bytes after the answer")
            upstream.checker.feed_data(data)  # type: ignore[union-attr]
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            upstream.checker = httptools.HttpResponseParser(SILENT)  # type: ignore[union-attr]
            self.escalate(data)  # the chain's parser says what is wrong (502)
            return
        self.upstream = None
        upstream.express = None  # type: ignore[union-attr]
        upstream.finished(reusable=True)  # type: ignore[union-attr]
        close = self.lane.finish(self, status)
        self.client.express_answered(head, data[start:], close)

    def _read_answer(self, data: bytes) -> tuple[int, int, int, bytes] | None:
        answer = read_answer(data)
        if answer.__class__ is int:
            if answer:
                self.escalate(data)  # a head the chain's parser reads (or refuses), or an answer it streams
            elif self.received is None:
                self.received = bytearray(data)  # the head is still coming
            return None
        status, start, length, head, keep_alive = answer
        upstream = self.upstream
        upstream.keep_alive = keep_alive  # type: ignore[union-attr]
        if upstream.checker is None:  # type: ignore[union-attr]
            upstream.checker = httptools.HttpResponseParser(SILENT)  # type: ignore[union-attr]
        self.answer = answer = (status, start, length, head)
        return answer

    def upstream_lost(self) -> None:
        """The upstream connection closed before the whole answer (its connection_lost goes on
        to fail the answer the chain now waits for)."""
        if self.received is None and self.method.decode() in IDEMPOTENT and not self.body:
            # The keep-alive race, as the upstream pool handles it: sent again by the chain.
            self.upstream.express = None  # type: ignore[union-attr]
            self.upstream = None
            self.escalate(None)
        else:
            self.escalate(bytes(self.received or b""))

    # --- the client's side --------------------------------------------------------------

    def client_lost(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.express = None
            upstream.abort()  # the service sees the client go, as through the chain
        self.lane.finish(self, 499)

    def expire(self) -> None:
        """Its deadline passed: the chain's Timeout answers 504 (or cuts an answer under way)."""
        self.escalate(bytes(self.received or b""))

    def escalate(self, received: bytes | None) -> None:
        """Hand the request to the chain: with the upstream exchange in flight and what it
        received so far, or (`received` None, no upstream) to be sent again."""
        upstream, self.upstream = self.upstream, None
        self.lane.release(self)
        sent = upstream.resume(received or b"") if upstream is not None else None
        self.client.express_escalated(self, sent)


def scan_request(data: bytes, max_url: int, max_header_size: int
                 ) -> tuple[bytes, bytes, bytes, bytes, int | None, bytes, bytes | None, list[tuple[bytes, bytes, bytes]]] | None:
    """A whole plain request's parts: (method, target, "\n" + its header lines, body, Content-Length,
    Host, Authorization, the forwarding lines as (line, lower-case name, value)); None: the chain's."""
    line = REQUEST_LINE.match(data)
    if line is None:
        return None
    start = line.end()
    end = data.find(b"\r\n\r\n", start - 2)
    target = line.group(2)
    if end < 0 or len(target) > max_url or end - start > max_header_size:
        return None  # the chain answers 414 and 431
    block = data[start - 1:end + 2]  # "\n" + the header lines
    body = data[end + 4:]
    host = length = authorization = None
    noted: list[tuple[bytes, bytes, bytes]] = []
    for found in REQUEST_NOTED.findall(block):
        name = found[1].lower()
        value = found[2].rstrip(b" \t")
        if name == b"host":
            if host is not None:
                return None  # two: the chain refuses them
            host = value
        elif name not in _FORWARDING or any(name == other[1] for other in noted):
            return None
        else:
            noted.append((found[0], name, value))
            if name == b"content-length":
                if not value.isdigit():
                    return None
                length = int(value)
            elif name == b"authorization":
                authorization = value
    if host is None or len(body) != (length or 0):
        return None  # no Host (400), or a body not all here, or a pipelined request after it
    return line.group(1), target, block, body, length, host, authorization, noted


def read_answer(data: bytes) -> tuple[int, int, int, bytes, bool] | int:
    """An answer's (status, where its body starts, Content-Length, its head as the chain writes
    it less the Connection line, keep-alive); 0: its head is still coming; 1: the chain's."""
    line = STATUS_LINE.match(data)
    end = data.find(b"\r\n\r\n")
    if line is None or end < 0:
        if end >= 0 or len(data) > 8192 or (line is None and not b"HTTP/1.1 ".startswith(data[:9])):
            return 1  # a head the chain's parser reads (or refuses)
        return 0
    if line.end() - line.start(2) == 2:
        return 1  # no reason phrase: the chain writes the standard one
    status = int(line.group(1))
    if status in _CHAIN_STATUSES:
        return 1
    head = data[line.end() - 1:end + 2]  # "\n" + the header lines
    length = None
    keep_alive = True
    for whole, name, value in RESPONSE_NOTED.findall(head):
        name, value = name.lower(), value.rstrip(b" \t")
        if name == b"content-length" and length is None and value.isdigit():
            length = int(value)
        elif name == b"connection" and value.lower() in (b"keep-alive", b"close"):
            keep_alive = value.lower() == b"keep-alive"
        elif name != b"keep-alive":
            return 1  # framing or hop-by-hop headers the chain handles
        head = head.replace(b"\n" + whole + b"\n", b"\n")
    if length is None or length > SMALL_ANSWER:
        return 1  # streamed, unsized or large: the chain's
    # The head as the chain writes it (end-to-end headers, then the length), less the
    # Connection line the client's side adds.
    return status, end + 4, length, b"".join((data[:line.end() - 1], head, b"Content-Length: %d\r\n" % length)), keep_alive


PYTHON_SCANS = scan_request, read_answer  # the fallback, and what tests/test_express_scans.py holds the C to
# Which form runs, for the start-up logs of berth boot and the gateway.
SCANS = "Python (BERTH_NO_EXTENSIONS is set)"
if not os.environ.get("BERTH_NO_EXTENSIONS"):
    try:  # the same two scans in C (serving/_express.c), where a compiler built them at install
        from serving._express import read_answer, scan_request  # type: ignore[no-redef]  # noqa: F811
        SCANS = "C"
    except ImportError:
        SCANS = "Python (serving._express was not built: no C compiler when berth was installed)"
