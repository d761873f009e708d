"""The data path: port 8080 -> the child on 127.0.0.1:<port>.

A short chain of small handlers on berth's own server side (serving/server.py), each
testable alone (the shape of Knative's queue-proxy):

    Drain -> Timeout -> Limits -> Auth -> Measure -> Forward

Drain counts requests in flight and refuses them outside READY/quiet period; Timeout turns a
slow answer into 504; Limits enforce the body size (413) and the concurrency limit with its
bounded queue (503); Auth checks the service token (401); Measure records metrics; Forward
relays to the child, streaming the response as it is produced, and tunnels WebSockets.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import time
from dataclasses import dataclass

from serving.http import HOP_BY_HOP, Headers, Request, Response
from serving.metrics import Metrics
from serving.server import Handler, Server, ServerLimits
from serving.state import BootState, State
from serving.upstream import Response as UpstreamResponse
from serving.upstream import UpstreamError, UpstreamPool

# Expect is answered here (100-continue); the body goes on with its length.
REQUEST_HOP_BY_HOP = HOP_BY_HOP | {b"expect"}
# Responses up to this size are read whole and sent in one write; larger or unsized ones stream.
SMALL_BODY = 64 * 1024
MiB = 1024 * 1024
KiB = 1024
TEXT = (b"Content-Type", b"text/plain; charset=utf-8")


@dataclass
class ProxyConfig:
    upstream_port: int
    upstream_host: str = "127.0.0.1"
    max_body: int = 1 * MiB  # as EAS's gateway
    request_timeout: float = 600.0
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_header_size: int = 64 * KiB
    concurrency: int = 0  # 0: no limit
    queue: int | None = None  # None: 10 x concurrency, as Knative's breaker
    token: str | None = None
    wait_ready: float = 0.0  # before READY: 0 answers 503 at once, else wait up to this long
    upstream_idle: float = 4.0  # below uvicorn's (and so vLLM's) 5 s keep-alive
    retry_after: int = 1

    @property
    def queue_limit(self) -> int:
        return self.queue if self.queue is not None else 10 * self.concurrency

    @property
    def server_limits(self) -> ServerLimits:
        return ServerLimits(max_header_size=self.max_header_size, header_timeout=self.header_timeout,
                            body_timeout=self.body_timeout, keepalive_timeout=self.keepalive_timeout)


def reject(metrics: Metrics, status: int, reason: str, *, close: bool = False, retry_after: int | None = None,
           headers: Headers | None = None) -> Response:
    """An answer berth gives itself (not the child's): counted, explained in the body."""
    extra = [TEXT, *(headers or ())]
    if retry_after is not None:
        extra.append((b"Retry-After", b"%d" % retry_after))
    metrics.count(status)
    return Response(status, reason.encode() + b"\n", extra, close=close)


class Drain:
    """Outermost: counts in-flight requests (the drain waits on them) and gates by state.

    Before READY: 503 with Retry-After, or wait for READY up to `wait_ready`. DRAINING, during
    the quiet period: served as usual, so load balancers have time to notice. Past it: 503
    with `Connection: close`. berth's own 503s say why in `X-Berth-Reject` (draining or
    not-ready), so a gateway can tell them from the app's.
    """

    def __init__(self, state: BootState, config: ProxyConfig, metrics: Metrics, next_handler: Handler) -> None:
        self.state, self.config, self.metrics, self.next = state, config, metrics, next_handler

    async def __call__(self, request: Request) -> Response:
        state = self.state
        if state.refusing:
            return reject(self.metrics, 503, "the service is shutting down", close=True, headers=[(b"X-Berth-Reject", b"draining")])
        if state.state is not State.READY and state.state is not State.DRAINING:
            if self.config.wait_ready <= 0 or not await self._wait_ready():
                return reject(self.metrics, 503, f"the service is not ready ({state.state.value})", retry_after=self.config.retry_after,
                              headers=[(b"X-Berth-Reject", b"not-ready")])
        state.inflight.add(1)
        try:
            response = await self.next(request)
        finally:
            state.inflight.add(-1)
        if state.state is State.DRAINING:
            request.close = True  # move keep-alive clients to another instance
        return response

    async def _wait_ready(self) -> bool:
        try:
            await asyncio.wait_for(self.state.ready_event.wait(), self.config.wait_ready)
            return True
        except asyncio.TimeoutError:
            return False


class Timeout:
    """504 when the child has not answered within the request timeout (EAS's rpc.keepalive).

    A deadline on the request, which the server checks (no timer per request). Once the
    response has started the status is gone: the connection is cut instead, so the client
    sees a truncated response rather than a whole one.
    """

    def __init__(self, seconds: float, metrics: Metrics, next_handler: Handler) -> None:
        self.seconds, self.metrics, self.next = seconds, metrics, next_handler

    async def __call__(self, request: Request) -> Response:
        request.expire_in(self.seconds)
        try:
            return await self.next(request)
        except asyncio.CancelledError:
            if not request.expired or request.response_started is not None:
                raise  # the client left, or the answer had started: the server cuts the connection
            task = asyncio.current_task()
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancel is handled, not pending
                task.uncancel()
            return reject(self.metrics, 504, f"the service did not answer within {self.seconds:g} s")


class Limits:
    """Request body size (413: by Content-Length before reading, by counting while a chunked
    body arrives) and the optional concurrency limit with a bounded queue (503)."""

    def __init__(self, config: ProxyConfig, state: BootState, metrics: Metrics, next_handler: Handler) -> None:
        self.config, self.state, self.metrics, self.next = config, state, metrics, next_handler
        self._slots = asyncio.Semaphore(config.concurrency) if config.concurrency > 0 else None

    async def __call__(self, request: Request) -> Response:
        if request.has_body:
            limit = self.config.max_body
            if request.content_length is not None and request.content_length > limit:
                return reject(self.metrics, 413, f"request body over the limit of {limit} bytes", close=True)
            request.body_limit = limit  # a chunked body over it: the server answers 413 (BodyTooLarge)
            await request.body()  # read before queueing: a slot is for the child's work (100 Continue goes now)
        if self._slots is None:
            return await self.next(request)
        if self._slots.locked() and self.state.queued >= self.config.queue_limit:
            return reject(self.metrics, 503, "too many requests queued", retry_after=self.config.retry_after)
        self.state.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.state.queued -= 1
        try:
            return await self.next(request)
        finally:
            self._slots.release()


class Auth:
    """The service token: `Authorization: <token>` or `Bearer <token>`, else 401 (in the
    chain only when a token is set).

    Exactly one Authorization header (two: 400), compared as bytes (any encoding is a wrong
    token, not an error); the checked header is not passed on to the child.
    """

    def __init__(self, token: str, metrics: Metrics, next_handler: Handler) -> None:
        self.token = token.encode()
        self.metrics, self.next = metrics, next_handler

    async def __call__(self, request: Request) -> Response:
        given = [value for name, value in request.headers if name.lower() == b"authorization"]
        if len(given) > 1:
            return reject(self.metrics, 400, "more than one Authorization header", close=True)
        value = given[0].strip() if given else b""
        if value[:7].lower() == b"bearer ":
            value = value[7:].strip()
        if not hmac.compare_digest(value, self.token):
            return reject(self.metrics, 401, "missing or wrong token in the Authorization header", headers=[(b"WWW-Authenticate", b"Bearer")])
        request.headers = [pair for pair in request.headers if pair[0].lower() != b"authorization"]
        return await self.next(request)


class Measure:
    """Requests by status code, latency and time to first byte."""

    def __init__(self, metrics: Metrics, next_handler: Handler) -> None:
        self.metrics, self.next = metrics, next_handler

    async def __call__(self, request: Request) -> Response:
        status = 499  # nginx's code for a client that went away, unless we learn otherwise
        try:
            response = await self.next(request)
            status = response.status
            return response
        finally:
            ended = time.perf_counter()
            first_byte = request.response_started
            self.metrics.observe(status, ended - request.started, (first_byte or ended) - request.started)


class Forward:
    """Relay to the child over pooled keep-alive connections; stream what it produces.

    A WebSocket upgrade is passed on; the child's 101 turns both connections into one byte
    tunnel. An upgrade the child refuses with its own 4xx or 5xx goes back as it is (as
    nginx does); any other answer (an upgrade neither made nor refused) is a 502.
    """

    def __init__(self, pool: UpstreamPool, config: ProxyConfig, metrics: Metrics) -> None:
        self.pool, self.metrics = pool, metrics
        self.host = f"{config.upstream_host}:{config.upstream_port}".encode()

    async def __call__(self, request: Request) -> Response:
        body = await request.body() if request.has_body else None
        try:
            upstream = await self.pool.request(request.method, request.target, forwarded_headers(request, self.host), body)
        except UpstreamError as exc:
            return reject(self.metrics, 502, f"the service is not reachable: {exc}")
        try:
            if request.upgrade and upstream.status != 101 and upstream.status < 400:
                await upstream.read()
                response = reject(self.metrics, 502, f"the service answered the WebSocket upgrade with {upstream.status}, not 101")
            else:
                response = await relay(request, upstream)
        except BaseException:
            upstream.close()  # a client gone mid-stream: drop the upstream request too
            raise
        upstream.release()
        return response


async def relay(request: Request, upstream: UpstreamResponse, extra: Headers | None = None) -> Response:
    """An upstream's answer to the client (the bootstrap's child, or the gateway's instance):
    small ones whole in one write, larger or unsized ones as produced, a 101 to an upgrade
    tunnelled; `extra` headers are added to the answer's own."""
    headers = upstream.headers + extra if extra else upstream.headers
    if upstream.status == 101 and request.upgrade:
        upgrade = [pair for pair in upstream.hop_headers if pair[0] in (b"upgrade", b"connection")]
        response = Response(101, headers=headers + upgrade, reason=upstream.reason)
        await request.tunnel(response, upstream.upgraded())
        return response
    length = upstream.content_length
    if request.method == "HEAD":
        await upstream.read()
        return Response(upstream.status, b"", headers, reason=upstream.reason, length=length)
    if length is not None and length <= SMALL_BODY:
        return Response(upstream.status, await upstream.read(), headers, reason=upstream.reason)
    response = Response(upstream.status, headers=headers, reason=upstream.reason)
    await request.send_stream(response, upstream.chunks(), length)  # as produced: no buffering
    return response


def forwarded_headers(request: Request, default_host: bytes, drop: frozenset[bytes] = REQUEST_HOP_BY_HOP) -> Headers:
    """The client's headers minus `drop` (lower-case names: the hop-by-hop ones, and what a
    caller adds to them) and those its Connection header names.

    X-Forwarded-For gains the client's address; X-Forwarded-Proto is set from the connection
    (a client's own claim is dropped); X-Forwarded-Host is the client's Host unless a proxy
    before us set it; Host is ours if the client sent none. A WebSocket upgrade keeps
    `Upgrade` and `Connection: upgrade`.
    """
    dropped = drop | request.hop_by_hop if request.hop_by_hop else drop
    headers: Headers = []
    prior: list[bytes] = []
    host = None
    forwarded_host = False
    for pair in request.headers:
        lowered = pair[0].lower()
        if lowered in dropped:
            continue
        if lowered in FORWARDING:
            if lowered == b"x-forwarded-for":
                prior.append(pair[1])
                continue
            if lowered == b"x-forwarded-proto":
                continue
            if lowered == b"host":
                host = pair[1]
            else:
                forwarded_host = True
        headers.append(pair)
    peer = request.peer.encode()
    headers.append((b"X-Forwarded-For", b", ".join([*prior, peer]) if prior else peer))
    headers.append((b"X-Forwarded-Proto", b"http"))
    if host is None:
        headers.append((b"Host", default_host))
    elif not forwarded_host:
        headers.append((b"X-Forwarded-Host", host))
    if request.upgrade:
        headers += [(b"Upgrade", b"websocket"), (b"Connection", b"upgrade")]
    return headers


FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"host"})


def build_chain(state: BootState, config: ProxyConfig, metrics: Metrics, pool: UpstreamPool) -> Handler:
    forward = Forward(pool, config, metrics)
    chain: Handler = Measure(metrics, forward)
    if config.token:
        chain = Auth(config.token, metrics, chain)
    chain = Limits(config, state, metrics, chain)
    chain = Timeout(config.request_timeout, metrics, chain)
    return Drain(state, config, metrics, chain)


def upstream_pool(config: ProxyConfig) -> UpstreamPool:
    return UpstreamPool(config.upstream_host, config.upstream_port, idle_timeout=config.upstream_idle)


async def start_server(handler: Handler, host: str, port: int, limits: ServerLimits, metrics: Metrics | None = None
                       ) -> tuple[Server, asyncio.AbstractServer]:
    """Bind at once and serve `handler`; the server's own refusals (400, 431, ...) counted in `metrics`."""
    server = Server(handler, limits, on_refuse=metrics.count if metrics is not None else None)
    listener = await server.listen(host, port)
    gc.freeze()  # what exists now lives as long as the process: later collections skip it
    return server, listener
