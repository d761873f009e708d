"""The data path: port 8080 -> the child on 127.0.0.1:<port>.

A short chain of small handlers, each testable alone (the shape of Knative's queue-proxy):

    Drain -> Timeout -> Limits -> Auth -> Measure -> Forward

Drain counts requests in flight and refuses them outside READY/quiet period; Timeout turns a
slow answer into 504; Limits enforce the body size (413) and the concurrency limit with its
bounded queue (503); Auth checks the service token (401); Measure records metrics; Forward
relays to the child, streaming the response as it is produced.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from serving.metrics import Metrics
from serving import timeouts
from serving.state import BootState, State
from serving.upstream import Headers, NotReachable, Response, UpstreamError, UpstreamPool

log = logging.getLogger("berth.proxy")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# Per-request notes shared along the chain (aiohttp requests are mutable mappings).
BODY = web.RequestKey("berth.body", bytes)
RESPONSE_STARTED = web.RequestKey("berth.response_started", float)  # perf_counter at the first byte sent

HOP_BY_HOP = frozenset(
    h.lower().encode() for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
        "TE", "Trailer", "Trailers", "Transfer-Encoding", "Upgrade", "Content-Length",
    )
)
# Responses up to this size are read whole and sent in one write; larger or unsized ones stream.
SMALL_BODY = 64 * 1024
MiB = 1024 * 1024


@dataclass
class ProxyConfig:
    upstream_port: int
    upstream_host: str = "127.0.0.1"
    max_body: int = 1 * MiB  # as EAS's gateway
    request_timeout: float = 600.0
    header_timeout: float = 30.0
    concurrency: int = 0  # 0: no limit
    queue: int | None = None  # None: 10 x concurrency, as Knative's breaker
    token: str | None = None
    wait_ready: float = 0.0  # before READY: 0 answers 503 at once, else wait up to this long
    upstream_idle: float = 4.0  # below uvicorn's (and so vLLM's) 5 s keep-alive
    retry_after: int = 1

    @property
    def queue_limit(self) -> int:
        return self.queue if self.queue is not None else 10 * self.concurrency


def reject(metrics: Metrics, status: int, reason: str, *, close: bool = False, retry_after: int | None = None) -> web.Response:
    """An answer berth gives itself (not the child's): counted, explained in the body."""
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    response = web.Response(status=status, text=reason + "\n", headers=headers)
    if close:
        headers["Connection"] = "close"
        response.force_close()
    metrics.count(status)
    return response


class Drain:
    """Outermost: counts in-flight requests (the drain waits on them) and gates by state.

    Before READY: 503 with Retry-After, or wait for READY up to `wait_ready`. DRAINING, during
    the quiet period: served as usual, so load balancers have time to notice. Past it: 503
    with `Connection: close`.
    """

    def __init__(self, state: BootState, config: ProxyConfig, metrics: Metrics, next_handler: Handler) -> None:
        self.state, self.config, self.metrics, self.next = state, config, metrics, next_handler

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        state = self.state
        if state.refusing:
            return reject(self.metrics, 503, "the service is shutting down", close=True)
        if state.state not in (State.READY, State.DRAINING):
            if self.config.wait_ready <= 0 or not await self._wait_ready():
                return reject(self.metrics, 503, f"the service is not ready ({state.state.value})", retry_after=self.config.retry_after)
        state.inflight.add(1)
        try:
            response = await self.next(request)
        finally:
            state.inflight.add(-1)
        if state.state is State.DRAINING:
            response.force_close()  # move keep-alive clients to another instance
        return response

    async def _wait_ready(self) -> bool:
        try:
            await asyncio.wait_for(self.state.ready_event.wait(), self.config.wait_ready)
            return True
        except asyncio.TimeoutError:
            return False


class Timeout:
    """504 when the child has not answered within the request timeout (EAS's rpc.keepalive).

    Once the response has started the status is gone: the connection is cut instead, so the
    client sees a truncated response rather than a whole one.
    """

    def __init__(self, seconds: float, metrics: Metrics, next_handler: Handler) -> None:
        self.seconds, self.metrics, self.next = seconds, metrics, next_handler

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            async with timeouts.timeout(self.seconds):
                return await self.next(request)
        except TimeoutError:
            if RESPONSE_STARTED in request:
                if request.transport is not None:
                    request.transport.abort()
                raise
            return reject(self.metrics, 504, f"the service did not answer within {self.seconds:g} s")


class Limits:
    """Request body size (413) and the optional concurrency limit with a bounded queue (503)."""

    def __init__(self, config: ProxyConfig, state: BootState, metrics: Metrics, next_handler: Handler) -> None:
        self.config, self.state, self.metrics, self.next = config, state, metrics, next_handler
        self._slots = asyncio.Semaphore(config.concurrency) if config.concurrency > 0 else None

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        limit = self.config.max_body
        too_large = request.content_length is not None and request.content_length > limit
        if not too_large and request.body_exists:
            body = await _read_body(request, limit)  # chunked bodies have no length to check first
            if body is None:
                too_large = True
            else:
                request[BODY] = body
        if too_large:
            return reject(self.metrics, 413, f"request body over the limit of {limit} bytes", close=True)
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


async def _read_body(request: web.BaseRequest, limit: int) -> bytes | None:
    """The whole body, or None past `limit` (chunked bodies have no Content-Length to check)."""
    parts, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


class Auth:
    """With a service token: `Authorization: <token>` or `Bearer <token>`, else 401."""

    def __init__(self, token: str | None, metrics: Metrics, next_handler: Handler) -> None:
        self.token = token.encode() if token else None
        self.metrics, self.next = metrics, next_handler

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.token is not None:
            given = request.headers.get("Authorization", "")
            if given[:7].lower() == "bearer ":
                given = given[7:]
            if not hmac.compare_digest(given.strip().encode(), self.token):
                response = reject(self.metrics, 401, "missing or wrong token in the Authorization header")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return await self.next(request)


class Measure:
    """Requests by status code, latency and time to first byte."""

    def __init__(self, metrics: Metrics, next_handler: Handler) -> None:
        self.metrics, self.next = metrics, next_handler

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()  # not loop.time(): uvloop's clock ticks in whole milliseconds
        status = 499  # nginx's code for a client that went away, unless we learn otherwise
        try:
            response = await self.next(request)
            status = response.status
            return response
        finally:
            ended = time.perf_counter()
            self.metrics.count(status)
            self.metrics.latency.observe(ended - started)
            self.metrics.ttfb.observe(request.get(RESPONSE_STARTED, ended) - started)


class Forward:
    """Relay to the child over pooled keep-alive connections; stream what it produces."""

    def __init__(self, upstream: Upstream, config: ProxyConfig, metrics: Metrics) -> None:
        self.pool, self.websockets, self.metrics = upstream.pool, upstream.websockets, metrics
        self.origin = f"http://{config.upstream_host}:{config.upstream_port}"
        self.host = f"{config.upstream_host}:{config.upstream_port}".encode()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        try:
            upstream = await self.pool.request(request.method, request.raw_path, forwarded_headers(request, self.host), request.get(BODY))
        except NotReachable as exc:
            return reject(self.metrics, 502, f"the service is not reachable: {exc}")
        except UpstreamError as exc:
            return reject(self.metrics, 502, str(exc))
        try:
            response = await self._relay(request, upstream)
        except BaseException:
            upstream.close()  # a client gone mid-stream: drop the upstream request too
            raise
        upstream.release()
        return response

    async def _relay(self, request: web.BaseRequest, upstream: Response) -> web.StreamResponse:
        headers = _decoded(_without_hop_by_hop(upstream.headers))
        length = upstream.content_length
        if length is not None and length <= SMALL_BODY and request.method != "HEAD":
            body = await upstream.read()
            request[RESPONSE_STARTED] = time.perf_counter()
            return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=body)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        request[RESPONSE_STARTED] = time.perf_counter()
        async for chunk in upstream.chunks():  # as produced: no buffering
            await response.write(chunk)
        return response

    async def _websocket(self, request: web.BaseRequest) -> web.StreamResponse:
        # aiohttp's client makes its own handshake: the client's key, version and offers stay here.
        headers = CIMultiDict(_decoded((name, value) for name, value in forwarded_headers(request, self.host) if not name.lower().startswith(b"sec-websocket-")))
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        url = URL(self.origin + request.raw_path, encoded=True)  # the path and query exactly as sent
        try:
            upstream = await self.websockets.ws_connect(url, headers=headers, protocols=protocols, autoping=False)
        except aiohttp.WSServerHandshakeError as exc:
            return reject(self.metrics, exc.status or 502, f"the service refused the WebSocket: {exc.message}")
        except aiohttp.ClientError as exc:
            return reject(self.metrics, 502, f"the service is not reachable: {exc}")
        client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (), autoping=False)
        await client.prepare(request)
        request[RESPONSE_STARTED] = time.perf_counter()
        async with upstream:
            pumps = [asyncio.ensure_future(_pump_ws(client, upstream)), asyncio.ensure_future(_pump_ws(upstream, client))]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
        await client.close()
        return client


async def _pump_ws(source, sink) -> None:
    async for message in source:
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type == aiohttp.WSMsgType.PING:
            await sink.ping(message.data)
        elif message.type == aiohttp.WSMsgType.PONG:
            await sink.pong(message.data)
    await sink.close()


def _without_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    headers = list(headers)
    dropped = HOP_BY_HOP
    for name, value in headers:
        if name.lower() == b"connection":  # headers the Connection header names are hop-by-hop too
            dropped = dropped | {token.strip().lower() for token in value.split(b",")}
    return [(name, value) for name, value in headers if name.lower() not in dropped]


def _decoded(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    # As aiohttp's own parser decodes them, so its writer sends the same bytes on.
    return [(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")) for name, value in headers]


def forwarded_headers(request: web.BaseRequest, default_host: bytes) -> Headers:
    """The client's headers minus hop-by-hop ones; X-Forwarded-For gains the client's
    address, X-Forwarded-Proto is set unless a proxy before us did; Host if the client sent none."""
    headers, prior, has_host, has_proto = [], [], False, False
    for name, value in _without_hop_by_hop(request.raw_headers):
        lowered = name.lower()
        if lowered == b"x-forwarded-for":
            prior.append(value)
            continue
        has_host = has_host or lowered == b"host"
        has_proto = has_proto or lowered == b"x-forwarded-proto"
        headers.append((name, value))
    peer = (request.remote or "").encode()
    headers.append((b"X-Forwarded-For", b", ".join([*prior, peer]) if prior else peer))
    if not has_proto:
        headers.append((b"X-Forwarded-Proto", request.scheme.encode()))
    if not has_host:
        headers.append((b"Host", default_host))
    return headers


class Upstream:
    """The connections to the child: berth's own keep-alive pool for HTTP, aiohttp's client for WebSockets."""

    def __init__(self, config: ProxyConfig) -> None:
        self.pool = UpstreamPool(config.upstream_host, config.upstream_port, idle_timeout=config.upstream_idle)
        self.websockets = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
            timeout=aiohttp.ClientTimeout(total=None, connect=5),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def close(self) -> None:
        await self.pool.close()
        await self.websockets.close()


def upstream_session(config: ProxyConfig) -> Upstream:
    return Upstream(config)


def build_chain(state: BootState, config: ProxyConfig, metrics: Metrics, upstream: Upstream) -> Handler:
    forward = Forward(upstream, config, metrics)
    chain: Handler = Measure(metrics, forward)
    chain = Auth(config.token, metrics, chain)
    chain = Limits(config, state, metrics, chain)
    chain = Timeout(config.request_timeout, metrics, chain)
    return Drain(state, config, metrics, chain)


class HeaderTimeout:
    """Closes connections that send no complete request head within `seconds` (slowloris)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._answered: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()

    def wrap(self, handler: Handler) -> Handler:
        async def noting(request: web.BaseRequest) -> web.StreamResponse:
            if request.transport is not None:
                self._answered.add(request.transport)
            return await handler(request)

        return noting

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        loop = asyncio.get_running_loop()

        def make() -> asyncio.Protocol:
            protocol = server()
            loop.call_later(self.seconds, self._close_if_silent, protocol)
            return protocol

        return make

    def _close_if_silent(self, protocol) -> None:
        transport = protocol.transport
        if transport is not None and not transport.is_closing() and transport not in self._answered:
            log.debug("closing a connection that sent no request head within %.0f s", self.seconds)
            transport.close()


async def start_server(handler: Handler, host: str, port: int, *, header_timeout: float | None = None) -> tuple[web.Server, asyncio.AbstractServer]:
    """Bind at once; aiohttp's low-level server (no router: one handler chain)."""
    loop = asyncio.get_running_loop()
    guard = HeaderTimeout(header_timeout) if header_timeout else None
    server = web.Server(
        guard.wrap(handler) if guard else handler,
        handler_cancellation=True,  # a client that disconnects cancels its upstream request
        auto_decompress=False,
        access_log=None,
        keepalive_timeout=75.0,  # nginx's default for clients
    )
    factory = guard.protocol_factory(server) if guard else server
    listener = await loop.create_server(factory, host, port, reuse_address=True, backlog=1024)
    return server, listener
