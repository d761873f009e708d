"""The data path: port 8080 -> the child on 127.0.0.1:<port>.

A short chain of small handlers on berth's own server side (serving/server.py), each
testable alone (the shape of Knative's queue-proxy):

    Drain -> Measure -> Timeout -> Limits -> Auth -> Forward

Drain counts requests in flight and refuses them outside READY/quiet period; Measure records
metrics of every answer past Drain (berth's own 504, 413, 401, 502 too); Timeout turns a slow
answer into 504; Limits enforce the body size (413) and the concurrency limit with its
bounded queue (503); Auth checks the service token (401); Forward relays to the child,
streaming the response as it is produced, and tunnels WebSockets. The chain's express form
(`Express`, serving/express.py) serves plain requests without it, answering as it would.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import time
from dataclasses import dataclass

from serving.express import Exchange, Lane
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
# Read per request: an Enum class's member lookup costs four times a module global's.
READY, DRAINING = State.READY, State.DRAINING


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


def reject(metrics: Metrics | None, status: int, reason: str, *, close: bool = False, retry_after: int | None = None,
           headers: Headers | None = None) -> Response:
    """An answer berth gives itself (not the child's), explained in the body; counted in
    `metrics` (None inside Measure, which counts what passes through it)."""
    extra = [TEXT, *(headers or ())]
    if retry_after is not None:
        extra.append((b"Retry-After", b"%d" % retry_after))
    if metrics is not None:
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
        if request.sent is not None:
            pass  # taken in by the express lane and already sent: it is served whatever the state now
        elif state.refusing:
            return reject(self.metrics, 503, "the service is shutting down", close=True, headers=[(b"X-Berth-Reject", b"draining")])
        elif state.state is not READY and state.state is not DRAINING:
            if self.config.wait_ready <= 0 or not await self._wait_ready():
                return reject(self.metrics, 503, f"the service is not ready ({state.state.value})", retry_after=self.config.retry_after,
                              headers=[(b"X-Berth-Reject", b"not-ready")])
        state.inflight.add(1)
        try:
            response = await self.next(request)
        finally:
            state.inflight.add(-1)
        if state.state is DRAINING:
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

    def __init__(self, seconds: float, next_handler: Handler) -> None:
        self.seconds, self.next = seconds, next_handler

    async def __call__(self, request: Request) -> Response:
        request.expire_in(self.seconds - (time.perf_counter() - request.started))  # (started earlier on the express lane)
        try:
            return await self.next(request)
        except asyncio.CancelledError:
            if not request.expired or request.response_started is not None:
                raise  # the client left, or the answer had started: the server cuts the connection
            task = asyncio.current_task()
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancel is handled, not pending
                task.uncancel()
            return reject(None, 504, f"the service did not answer within {self.seconds:g} s")


class Limits:
    """Request body size (413: by Content-Length before reading, by counting while a chunked
    body arrives) and the optional concurrency limit with a bounded queue (503)."""

    def __init__(self, config: ProxyConfig, state: BootState, next_handler: Handler) -> None:
        self.config, self.state, self.next = config, state, next_handler
        self._slots = asyncio.Semaphore(config.concurrency) if config.concurrency > 0 else None

    async def __call__(self, request: Request) -> Response:
        if request.has_body:
            limit = self.config.max_body
            if request.content_length is not None and request.content_length > limit:
                return reject(None, 413, f"request body over the limit of {limit} bytes", close=True)
            request.body_limit = limit  # a chunked body over it: the server answers 413 (BodyTooLarge)
            await request.body()  # read before queueing: a slot is for the child's work (100 Continue goes now)
        if self._slots is None:
            return await self.next(request)
        if self._slots.locked() and self.state.queued >= self.config.queue_limit:
            return reject(None, 503, "too many requests queued", retry_after=self.config.retry_after)
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

    def __init__(self, token: str, next_handler: Handler) -> None:
        self.token, self.next = token.encode(), next_handler

    async def __call__(self, request: Request) -> Response:
        given = [value for name, value in request.headers if name.lower() == b"authorization"]
        if len(given) > 1:
            return reject(None, 400, "more than one Authorization header", close=True)
        if not token_matches(given[0] if given else None, self.token):
            return reject(None, 401, "missing or wrong token in the Authorization header", headers=[(b"WWW-Authenticate", b"Bearer")])
        request.headers = [pair for pair in request.headers if pair[0].lower() != b"authorization"]
        return await self.next(request)


def token_matches(value: bytes | None, token: bytes) -> bool:
    """`Authorization: <token>` or `Bearer <token>`, compared in constant time as bytes."""
    value = value.strip() if value else b""
    if value[:7].lower() == b"bearer ":
        value = value[7:].strip()
    return hmac.compare_digest(value, token)


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

    def __init__(self, pool: UpstreamPool, config: ProxyConfig) -> None:
        self.pool = pool
        self.host = f"{config.upstream_host}:{config.upstream_port}".encode()

    async def __call__(self, request: Request) -> Response:
        body = await request.body() if request.has_body else None
        try:
            if request.sent is not None:
                upstream = await request.sent
            else:
                upstream = await self.pool.request(request.method, request.target, forwarded_headers(request, self.host), body)
        except UpstreamError as exc:
            return reject(None, 502, f"the service is not reachable: {exc}")
        try:
            if request.upgrade and upstream.status != 101 and upstream.status < 400:
                await upstream.read()
                response = reject(None, 502, f"the service answered the WebSocket upgrade with {upstream.status}, not 101")
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


class Express:
    """The chain's express form (serving/express.py): what Drain, Timeout, Limits, Auth,
    Measure and Forward do with a plain request when the service is READY; anything else goes
    through the chain (every request, under a concurrency limit: `start_proxy` sets no lane)."""

    def __init__(self, state: BootState, config: ProxyConfig, metrics: Metrics, pool: UpstreamPool) -> None:
        self.state, self.config, self.metrics, self.pool = state, config, metrics, pool
        self.timeout = config.request_timeout
        self.token = config.token.encode() if config.token else None
        # Auth's: the checked token never reaches the child.
        self.drop = REQUEST_HOP_BY_HOP | {b"authorization"} if self.token is not None else REQUEST_HOP_BY_HOP

    def take(self, exchange: Exchange) -> tuple[UpstreamPool, bytes] | None:
        state = self.state
        if state.state is not READY:
            return None
        if exchange.content_length is not None and exchange.content_length > self.config.max_body:
            return None  # Limits answers 413
        if self.token is not None and not token_matches(exchange.authorization, self.token):
            return None  # Auth answers 401
        state.inflight.add(1)
        return self.pool, exchange.forwarded(exchange.target, exchange.client.peer.encode(), self.drop)

    def finish(self, exchange: Exchange, status: int) -> bool:
        self.state.inflight.add(-1)
        seconds = time.perf_counter() - exchange.started
        self.metrics.observe(status, seconds, seconds)  # its first byte went with its last
        return self.state.state is DRAINING  # as Drain: keep-alive clients move on

    def release(self, exchange: Exchange) -> None:
        self.state.inflight.add(-1)


def build_chain(state: BootState, config: ProxyConfig, metrics: Metrics, pool: UpstreamPool) -> Handler:
    chain: Handler = Forward(pool, config)
    if config.token:
        chain = Auth(config.token, chain)
    chain = Limits(config, state, chain)
    chain = Timeout(config.request_timeout, chain)
    return Drain(state, config, metrics, Measure(metrics, chain))


async def start_proxy(state: BootState, config: ProxyConfig, metrics: Metrics, pool: UpstreamPool, host: str, port: int
                      ) -> tuple[Server, asyncio.AbstractServer]:
    """`berth boot`'s data path on `host:port`: the chain, and its express form for plain requests."""
    express = Express(state, config, metrics, pool) if config.concurrency == 0 else None  # Limits' queue is the chain's
    return await start_server(build_chain(state, config, metrics, pool), host, port, config.server_limits, metrics, express)


def upstream_pool(config: ProxyConfig) -> UpstreamPool:
    return UpstreamPool(config.upstream_host, config.upstream_port, idle_timeout=config.upstream_idle)


async def start_server(handler: Handler, host: str, port: int, limits: ServerLimits, metrics: Metrics | None = None,
                       express: Lane | None = None) -> tuple[Server, asyncio.AbstractServer]:
    """Bind at once and serve `handler` (and its `express` form); the server's own refusals
    (400, 431, ...) counted in `metrics`."""
    server = Server(handler, limits, on_refuse=metrics.count if metrics is not None else None, express=express)
    listener = await server.listen(host, port)
    gc.freeze()  # what exists now lives as long as the process: later collections skip it
    return server, listener
