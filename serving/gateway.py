"""`berth gateway`: one address per service and service group, on berth's own server side.

    /api/predict/<name>[/<rest>][?query]  ->  an instance's proxy, as /<rest>[?query]

Each request: look the name up (404 naming it), check the token (401), read the body (up to
1 MB, as EAS's gateway), let a group choose its member (header match, weight, mirror), wait
for a Ready instance if the name has none (the hold), pick one by two random choices on the
gateway's own in-flight counts, and forward, streaming the answer as it is produced. What
cannot have reached the app (a connection that failed to open, berth boot's own 503 with
`X-Berth-Reject`) is retried once on another instance; nothing else is.

Routes come from the agent's `GET /v1/routes?watch=1` (each table acknowledged once applied:
the agent waits for that before stopping an instance) or from `--routes-file`, polled. The
last table keeps serving while the agent is away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent.gateway_process import ADDRESSES, PIDFILE
from bootstrap.jsonfile import read_json_object
from serving.http import Request, Response
from serving.metrics import LoopHistogram
from serving.express import SCANS, Exchange
from serving.proxy import FORWARDING, REQUEST_HOP_BY_HOP, forwarded_headers, relay, token_matches
from serving.routing import Backend, Hold, RouteTable, Service, TableError, choose, parse_table, pick, redacted, waiting_requests
from serving.server import Server, ServerLimits
from serving.upstream import NotReachable, UpstreamError, UpstreamPool

log = logging.getLogger("berth.gateway")

MiB = 1024 * 1024
PREFIX = "/api/predict/"
_PREFIX = PREFIX.encode()
JSON = (b"Content-Type", b"application/json")
MIRROR_HEADER = (b"X-Berth-Mirror", b"1")
SLICE_S, SLICES = 10, 6  # a group's observed split: the last minute, in 10 s slices
UNTRUSTED = FORWARDING - {b"host"}  # a client's X-Forwarded-*: replaced unless --trust-forwarded


@dataclass
class GatewayConfig:
    listen: tuple[str, int] = ("127.0.0.1", 7080)
    admin: tuple[str, int] = ("127.0.0.1", 7081)
    agent_url: str | None = None
    agent_token: str | None = None
    routes_file: Path | None = None
    state_dir: Path | None = None  # where gateway.pid and gateway.json (its addresses) are written
    hold_timeout: float = 300.0  # Knative's request timeout
    hold_queue: int = 1000
    trust_forwarded: bool = False
    access_log: Path | None = None
    max_body: int = 1 * MiB  # as EAS's gateway
    mirror_inflight: int = 100  # copies in flight at once; beyond, dropped and counted
    vllm_poll_s: float = 0.1


class Stats:
    """Counters per name, service and instance, kept by the loop's one thread (no locks)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, int], int] = {}  # (name, service, instance, code)
        self.latency: dict[tuple[str, str], LoopHistogram] = {}  # (name, service)
        self.requests_total: dict[str, int] = {}  # per service, mirror copies excluded (the autoscaler's)
        self.inflight: dict[str, int] = {}
        self.retries: dict[str, int] = {}
        self.mirror: dict[tuple[str, str], int] = {}  # (service, sent|failed|dropped)
        self.recent: dict[tuple[str, int], dict[str, int]] = {}  # (group, 10 s slice) -> answers per member

    def last_minute(self) -> dict[str, dict[str, int]]:
        """Per group, the requests each member answered in the last minute (six 10 s slices)."""
        now = int(time.time() // SLICE_S)
        split: dict[str, dict[str, int]] = {}
        for (name, slice_), counts in self.recent.items():
            if slice_ > now - SLICES:
                for service, count in counts.items():
                    self.add(split.setdefault(name, {}), service, count)
        return split

    def add(self, table: dict, key: Any, amount: int = 1) -> None:
        table[key] = table.get(key, 0) + amount

    def observe(self, name: str, service: str, instance: str, status: int, seconds: float) -> None:
        self.add(self.requests, (name, service, instance, status))
        if name != service and service != "-":  # through a group: its observed split
            key = (name, int(time.time() // SLICE_S))
            if key not in self.recent:
                self.recent = {k: v for k, v in self.recent.items() if k[1] > key[1] - SLICES}
                self.recent[key] = {}
            self.add(self.recent[key], service)
        histogram = self.latency.get((name, service))
        if histogram is None:
            histogram = self.latency[(name, service)] = LoopHistogram()
        histogram.observe(seconds)


class Trace:
    """What one request met, for its metrics and access log line."""

    __slots__ = ("name", "service", "instance", "status", "held", "retried")

    def __init__(self) -> None:
        self.name = self.service = self.instance = "-"
        self.status = 499  # nginx's code for a client that went away, unless we learn otherwise
        self.held = 0.0
        self.retried = False


class Gateway:
    """The request handler, the route table it reads, and the admin port's views."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.table = RouteTable(0, {}, {})
        self.raw: dict[str, Any] = {"version": 0, "services": {}, "groups": {}}
        self.hold = Hold(config.hold_queue)
        self.stats = Stats()
        self.applied_at = 0.0
        self.agent: AgentLink | None = None
        self._mirrors = 0
        self._tasks: set[asyncio.Task] = set()
        self._access = open(config.access_log, "a", buffering=1) if config.access_log else None
        # Headers never passed to an instance: the hop-by-hop ones, a client's forwarded ones
        # unless trusted, and through a group its token (each member is called with its own).
        self._drop = REQUEST_HOP_BY_HOP if config.trust_forwarded else REQUEST_HOP_BY_HOP | UNTRUSTED
        self._drop_via_group = self._drop | {b"authorization"}

    # --- the table ---------------------------------------------------------------------------

    def apply(self, raw: dict[str, Any]) -> None:
        """Use this table for new requests now; requests in flight finish where they are."""
        known = {backend.key: backend for backend in self.table.backends()}
        table = parse_table(raw, known)
        kept = {backend.key for backend in table.backends()}
        for key, backend in known.items():
            if key not in kept:
                backend.retired = True
                self._close_when_idle(backend)
        self.table, self.raw, self.applied_at = table, raw, time.time()
        self.hold.table_changed()
        log.info("routes version %d: %d service(s), %d group(s), %d instance(s)", table.version, len(table.services),
                 len(table.groups), sum(len(svc.backends) for svc in table.services.values()))

    def _close_when_idle(self, backend: Backend) -> None:
        async def close() -> None:
            while backend.inflight and backend.retired:
                await asyncio.sleep(0.5)
            if backend.retired:
                await backend.pool.close()

        self._spawn(close())

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one request -------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        started = request.started  # (earlier than now for a request from the express lane)
        trace = Trace()
        try:
            response = await self._route(request, trace)
            trace.status = response.status
            return response
        finally:
            if trace.service != "-":
                self.stats.add(self.stats.inflight, trace.service, -1)
            seconds = time.perf_counter() - started
            self.stats.observe(trace.name, trace.service, trace.instance, trace.status, seconds)
            if self._access is not None:
                self._access.write(json.dumps({
                    "time": round(time.time(), 3), "name": trace.name, "service": trace.service, "instance": trace.instance,
                    "method": request.method, "path": request.target.split("?")[0], "status": trace.status,
                    "seconds": round(seconds, 6), "held_s": round(trace.held, 3), "retried": trace.retried,
                    "client": request.peer}) + "\n")

    async def _route(self, request: Request, trace: Trace) -> Response:
        target = request.target
        if not target.startswith(PREFIX):
            return _json(404, f"no route for {target.split('?')[0]!r}: the gateway serves /api/predict/<service or group>/...")
        name, path = _name_and_path(target)
        if request.sent is not None:  # sent by the express lane, which checked what follows
            name, backend = request.ticket  # type: ignore[misc]
            trace.name = trace.service = name
            self.stats.add(self.stats.requests_total, trace.service)
            self.stats.add(self.stats.inflight, trace.service)
            body = await request.body() if request.has_body else None
            return await self._forward(request, trace.service, path, body, False, trace, (backend, request.sent))
        table = self.table
        group = table.groups.get(name)
        service = table.services.get(name)
        if group is None and service is None:
            return _json(404, f"no service or group named {name!r} on this gateway")
        trace.name = name
        token = group.token if group is not None else service.token
        if token is not None and not token_matches(request.header(b"authorization"), token):
            return _json(401, f"missing or wrong token for {name!r} in the Authorization header",
                         [(b"WWW-Authenticate", b"Bearer")])
        if request.has_body:
            if request.content_length is not None and request.content_length > self.config.max_body:
                return _json(413, f"request body over the limit of {self.config.max_body} bytes", close=True)
            request.body_limit = self.config.max_body
        body = await request.body() if request.has_body else None
        service_name = name
        if group is not None:
            choice = choose(group, request.headers, table.services)
            if choice is None:
                return _json(503, f"group {name!r} has no member service on this node", [(b"Retry-After", b"1")])
            for mirrored in choice.mirrors:
                self._mirror(request, mirrored, path, body)
            service_name = choice.service
        trace.service = service_name
        self.stats.add(self.stats.requests_total, service_name)
        self.stats.add(self.stats.inflight, service_name)
        return await self._forward(request, service_name, path, body, group is not None, trace)

    async def _forward(self, request: Request, name: str, path: str, body: bytes | None, via_group: bool,
                       trace: Trace, sent: tuple[Backend, asyncio.Future] | None = None) -> Response:
        """Hold until `name` has a Ready instance, forward, retry once what never reached the app;
        `sent`: the instance the express lane sent the request to, and its answer to come."""
        if sent is None:
            held_since = time.monotonic()
            backend, service, cold = await self._ready_backend(name)
            held = trace.held = time.monotonic() - held_since
            if backend is None:
                return service  # the hold's own answer (503, 404)
        else:
            (backend, answer), held, cold = sent, 0.0, False
            service = self.table.services.get(name) or Service(name, None, None, None, [])
        headers = self._headers(request, service, via_group)
        while True:
            trace.instance = backend.id
            backend.inflight += 1
            try:
                if sent is not None:
                    sent = None
                    upstream = await answer
                else:
                    upstream = await backend.pool.request(request.method, path, headers, body)
            except NotReachable as exc:
                backend.inflight -= 1
                other = pick(service.backends, exclude=backend) if not trace.retried else None
                if other is None:
                    return _json(502, f"instance {backend.id} of {name!r} is not reachable: {exc}")
                trace.retried, backend = True, other
                self.stats.add(self.stats.retries, name)
                continue
            except UpstreamError as exc:
                backend.inflight -= 1
                return _json(502, f"instance {backend.id} of {name!r} broke off: {exc}")
            except BaseException:
                backend.inflight -= 1
                raise
            if upstream.status == 503 and not trace.retried and any(key.lower() == b"x-berth-reject" for key, _ in upstream.headers):
                other = pick(service.backends, exclude=backend)
                if other is not None:
                    await upstream.read()
                    upstream.release()
                    backend.inflight -= 1
                    trace.retried, backend = True, other
                    self.stats.add(self.stats.retries, name)
                    continue
            trace.status = upstream.status  # a tunnel or stream the client ends keeps the status it started with
            try:
                extra = [(b"X-Berth-Cold-Start", b"%.3f" % held)] if cold else []
                response = await relay(request, upstream, extra)
            except BaseException:
                upstream.close()
                raise
            finally:
                backend.inflight -= 1
            upstream.release()
            return response

    async def _ready_backend(self, name: str) -> tuple[Backend | None, Any, bool]:
        """(backend, service, cold start?) or, when none turns Ready in time, (None, the answer, False)."""
        service = self.table.services.get(name)
        backend = pick(service.backends) if service is not None else None
        if backend is not None:
            return backend, service, False
        if self.hold.full():
            return None, _json(503, f"{name!r} has no Ready instance and {self.hold.limit} requests are held already",
                               [(b"Retry-After", b"1")]), False
        timeout = self.config.hold_timeout
        if service is not None and service.timeout_s is not None:
            timeout = min(timeout, service.timeout_s)
        deadline = time.monotonic() + timeout
        self.hold.enter(name)
        cold = False
        try:
            if self.agent is not None:
                cold = await self.agent.wake(name, self.hold.by_service.get(name, 0))
            while True:
                service = self.table.services.get(name)
                if service is None:
                    return None, _json(404, f"{name!r} was removed while its request waited"), False
                backend = pick(service.backends)
                if backend is not None:
                    return backend, service, cold
                left = deadline - time.monotonic()
                if left <= 0 or not await self.hold.next_table(left):
                    return None, _json(503, f"{name!r} has no Ready instance after {timeout:g} s of waiting",
                                       [(b"Retry-After", b"%d" % max(1, math.ceil(timeout / 10)))]), False
        finally:
            self.hold.leave(name)

    def _headers(self, request: Request, service: Service, via_group: bool) -> list[tuple[bytes, bytes]]:
        """The client's headers as an instance should see them: forwarded ones set, and through a
        group the member's own token instead of the group's."""
        headers = forwarded_headers(request, b"localhost", self._drop_via_group if via_group else self._drop)
        if via_group and service.token is not None:
            headers.append((b"Authorization", b"Bearer " + service.token))
        return headers

    # --- mirror copies -----------------------------------------------------------------------

    def _mirror(self, request: Request, name: str, path: str, body: bytes | None) -> None:
        """Send a copy to `name`; its answer is discarded, its fate counted, the client never waits."""
        service = self.table.services.get(name)
        backend = pick(service.backends) if service is not None else None
        if backend is None or self._mirrors >= self.config.mirror_inflight:
            self.stats.add(self.stats.mirror, (name, "dropped"))
            return
        headers = [*self._headers(request, service, True), MIRROR_HEADER]
        self._mirrors += 1
        backend.inflight += 1

        async def copy() -> None:
            outcome = "failed"
            try:
                upstream = await backend.pool.request(request.method, path, headers, body)
                await upstream.read()
                upstream.release()
                outcome = "sent" if upstream.status < 500 else "failed"
            except (UpstreamError, OSError):
                pass
            finally:
                self._mirrors -= 1
                backend.inflight -= 1
                self.stats.add(self.stats.mirror, (name, outcome))

        self._spawn(copy())

    # --- the admin port ----------------------------------------------------------------------

    async def admin(self, request: Request) -> Response:
        path = request.target.split("?")[0]
        if path == "/healthz":
            return _body(200, {"status": "ok", "version": self.table.version, "applied_at": self.applied_at})
        if path == "/routes":
            return _body(200, redacted(self.raw))
        if path == "/v1/stats":
            return _body(200, self.service_stats())
        if path == "/metrics":
            return Response(200, generate_latest(_Collector(self)), [(b"Content-Type", CONTENT_TYPE_LATEST.encode())])
        return _json(404, f"no {path!r} here: /metrics, /healthz, /routes, /v1/stats")

    def service_stats(self) -> dict[str, Any]:
        """What the autoscaler reads: per service, requests (mirror copies excluded), in flight, held."""
        names = set(self.table.services) | set(self.stats.requests_total)
        return {"services": {name: {"requests_total": self.stats.requests_total.get(name, 0),
                                    "inflight": self.stats.inflight.get(name, 0),
                                    "held": self.hold.by_service.get(name, 0)} for name in sorted(names)},
                "groups_last_minute": self.stats.last_minute()}

    async def poll_vllm(self) -> None:
        """Read `vllm:num_requests_waiting` from each vLLM instance's admin port, every 100 ms."""
        timeout = aiohttp.ClientTimeout(total=max(0.5, self.config.vllm_poll_s * 5))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await asyncio.sleep(self.config.vllm_poll_s)
                backends = [backend for svc in self.table.services.values() if svc.engine == "vllm"
                            for backend in svc.backends if backend.admin]
                await asyncio.gather(*(self._read_waiting(session, backend) for backend in backends))

    @staticmethod
    async def _read_waiting(session: aiohttp.ClientSession, backend: Backend) -> None:
        try:
            async with session.get(f"{backend.admin}/metrics") as response:
                backend.waiting = waiting_requests(await response.read()) if response.status == 200 else 0.0
        except (aiohttp.ClientError, asyncio.TimeoutError):
            backend.waiting = 0.0


class _Collector:
    """The gateway's Prometheus families, made from its plain counters at scrape time."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self):
        stats = self.gateway.stats
        requests = CounterMetricFamily("berth_gateway_requests", "Requests answered, by name, service, instance and code",
                                       labels=["name", "service", "instance", "code"])
        for (name, service, instance, code), count in sorted(stats.requests.items()):
            requests.add_metric([name, service, instance, str(code)], count)
        yield requests
        latency = HistogramMetricFamily("berth_gateway_request_duration_seconds", "Time from request to the end of the answer",
                                        labels=["name", "service"])
        for (name, service), histogram in sorted(stats.latency.items()):
            latency.add_metric([name, service], histogram.cumulative(), histogram.sum)
        yield latency
        inflight = GaugeMetricFamily("berth_gateway_inflight_requests", "Client requests in flight, by service", labels=["service"])
        held = GaugeMetricFamily("berth_gateway_held_requests", "Requests waiting for a Ready instance, by service", labels=["service"])
        backends = GaugeMetricFamily("berth_gateway_instance_inflight_requests", "Requests in flight, by instance",
                                     labels=["service", "instance"])
        for name, view in self.gateway.service_stats()["services"].items():
            inflight.add_metric([name], view["inflight"])
            held.add_metric([name], view["held"])
        for service in self.gateway.table.services.values():
            for backend in service.backends:
                backends.add_metric([service.name, backend.id], backend.inflight)
        yield inflight
        yield held
        yield backends
        retries = CounterMetricFamily("berth_gateway_retries", "Requests retried on another instance", labels=["service"])
        for name, count in sorted(stats.retries.items()):
            retries.add_metric([name], count)
        yield retries
        mirror = CounterMetricFamily("berth_gateway_mirror_requests", "Mirror copies, by outcome (sent, failed, dropped)",
                                     labels=["service", "outcome"])
        for (name, outcome), count in sorted(stats.mirror.items()):
            mirror.add_metric([name, outcome], count)
        yield mirror


def _name_and_path(target: str) -> tuple[str, str]:
    """`/api/predict/<name>[/<rest>][?query]` -> (name, "/<rest>[?query]")."""
    rest = target[len(PREFIX):]
    name = rest.split("/", 1)[0].split("?", 1)[0]  # up to the first "/" or "?"
    path = rest[len(name):]
    return name, path if path.startswith("/") else "/" + path


class Express:
    """The gateway's express form (serving/express.py) for a plain request to a service (not a
    group: its header routes and mirrors are the chain's) that has a Ready instance and a
    connection idle to it: what the chain does, its lookup, token, pick and metrics, in one step."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.timeout = gateway.config.hold_timeout  # the chain's only deadline is the hold's

    def take(self, exchange: Exchange) -> tuple[UpstreamPool, bytes] | None:
        target = exchange.target
        if not target.startswith(_PREFIX):
            return None
        gateway = self.gateway
        name, path = _name_and_path(target.decode())
        service = gateway.table.services.get(name)
        if service is None or (service.token is not None and not token_matches(exchange.authorization, service.token)):
            return None  # a group, an unknown name (404) or a wrong token (401): the chain's
        if exchange.content_length is not None and exchange.content_length > gateway.config.max_body:
            return None
        backend = pick(service.backends)
        if backend is None:
            return None  # the hold is the chain's
        backend.inflight += 1
        stats = gateway.stats
        stats.add(stats.requests_total, name)
        stats.add(stats.inflight, name)
        exchange.ticket = (name, backend)
        return backend.pool, exchange.forwarded(path.encode(), exchange.client.peer.encode(), gateway._drop)

    def finish(self, exchange: Exchange, status: int) -> bool:
        name, backend = self._leave(exchange)
        self.gateway.stats.observe(name, name, backend.id, status, time.perf_counter() - exchange.started)
        return False

    def release(self, exchange: Exchange) -> None:
        name, _ = self._leave(exchange)
        self.gateway.stats.add(self.gateway.stats.requests_total, name, -1)  # the chain counts it

    def _leave(self, exchange: Exchange) -> tuple[str, Backend]:
        """Take the request out of its instance's and its service's in-flight counts."""
        name, backend = exchange.ticket  # type: ignore[misc]
        backend.inflight -= 1
        self.gateway.stats.add(self.gateway.stats.inflight, name, -1)
        return name, backend


def _json(status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None, *, close: bool = False) -> Response:
    return Response(status, json.dumps({"error": message}).encode() + b"\n", [JSON, *(headers or ())], close=close)


def _body(status: int, value: Any) -> Response:
    return Response(status, json.dumps(value, indent=1).encode() + b"\n", [JSON])


# --- where the routes come from --------------------------------------------------------------


@dataclass
class AgentLink:
    """The agent's route stream, acknowledged table by table, and its wake endpoint.

    Each acknowledgement carries the gateway's own addresses: an agent started before its
    gateway (`--gateway external`, systemd's order) learns them from it, not from a pidfile."""

    url: str
    token: str
    apply: Callable[[dict[str, Any]], None]
    addresses: dict[str, str] = field(default_factory=dict)  # {"url": ..., "admin_url": ...}
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)
    _base: str = ""

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            if self.url.startswith("unix:"):
                connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=self.url[5:])
                self._base = "http://agent"
            else:
                connector, self._base = aiohttp.TCPConnector(), self.url.rstrip("/")
            self._session = aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {self.token}"})
        return self._session

    async def follow(self) -> None:
        """Apply each table the agent sends; reconnect when it goes away (the last table serves on)."""
        delay = 0.1
        while True:
            session = self._open()
            try:
                async with session.get(f"{self._base}/v1/routes?watch=1", timeout=aiohttp.ClientTimeout(total=None, sock_connect=2)) as response:
                    if response.status != 200:
                        raise aiohttp.ClientResponseError(response.request_info, (), status=response.status,
                                                          message=(await response.text())[:200])
                    delay = 0.1
                    async for line in response.content:
                        if line.strip():
                            await self._apply(json.loads(line))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, TableError) as exc:
                log.warning("route stream from the agent at %s: %s; serving the last table, reconnecting in %.1f s",
                            self.url, _safe(exc), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _apply(self, table: dict[str, Any]) -> None:
        self.apply(table)
        session = self._open()
        async with session.post(f"{self._base}/v1/gateway/ack", json={"version": table.get("version", 0), **self.addresses},
                                timeout=aiohttp.ClientTimeout(total=2)) as response:
            await response.read()

    async def wake(self, service: str, held: int) -> bool:
        """Tell the agent a request waits for `service`; True when it says a cold start began."""
        session = self._open()
        try:
            async with session.post(f"{self._base}/v1/services/{service}/wake", json={"held": held},
                                    timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status != 200:
                    return False  # 404 until the agent has a wake endpoint; the hold goes on regardless
                answer = await response.json(content_type=None)
                return bool(isinstance(answer, dict) and answer.get("activated"))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _safe(exc: BaseException) -> str:
    """An error's text for the log (never a header: aiohttp's errors do not carry the token)."""
    return f"{type(exc).__name__}: {exc}"[:300]


def read_routes_file(path: Path) -> dict[str, Any]:
    return read_json_object(path, "the routes file (services and groups)", error=TableError)


async def follow_file(gateway: Gateway, path: Path, period: float = 0.5) -> None:
    """Apply the routes file again whenever it changes (a change reaches new requests within 1 s)."""
    seen = path.stat().st_mtime_ns
    while True:
        await asyncio.sleep(period)
        try:
            mtime = path.stat().st_mtime_ns
            if mtime != seen:
                seen = mtime
                gateway.apply(read_routes_file(path))
        except (OSError, TableError) as exc:
            log.error("%s: %s; the previous routes stay in use", path, exc)


# --- the process -----------------------------------------------------------------------------


async def serve(config: GatewayConfig, ready: Callable[[str, str], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT; then stop accepting and let answers in flight finish."""
    gateway = Gateway(config)
    if config.routes_file is not None:
        gateway.apply(read_routes_file(config.routes_file))
    limits = ServerLimits()
    # The express lane writes no access log line: with --access-log every request runs the chain.
    server = Server(gateway, limits, express=Express(gateway) if config.access_log is None else None)
    listener = await server.listen(*config.listen)
    admin = Server(gateway.admin, limits)
    admin_listener = await admin.listen(*config.admin)
    url = _address(listener)
    admin_url = _address(admin_listener)
    log.info("gateway on %s (admin %s); routes from %s; express lane %s", url, admin_url,
             config.routes_file or config.agent_url or "nowhere (no --agent or --routes-file)",
             f"scans in {SCANS}" if server.express is not None else "off (--access-log)")
    tasks = [asyncio.create_task(gateway.poll_vllm())]
    if config.routes_file is not None:
        tasks.append(asyncio.create_task(follow_file(gateway, config.routes_file)))
    elif config.agent_url is not None and config.agent_token is not None:
        gateway.agent = AgentLink(config.agent_url, config.agent_token, gateway.apply, {"url": url, "admin_url": admin_url})
        tasks.append(asyncio.create_task(gateway.agent.follow()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if config.state_dir is not None:
        write_process_files(config.state_dir, url, admin_url)
    if ready is not None:
        ready(url, admin_url)
    try:
        await stop.wait()
    finally:
        log.info("stopping: no new connections; answers in flight get up to 30 s")
        listener.close()
        admin_listener.close()
        await server.shutdown(grace=30.0)
        await admin.shutdown(grace=0.5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if gateway.agent is not None:
            await gateway.agent.close()
        if config.state_dir is not None:
            remove_process_files(config.state_dir)


def _address(listener: asyncio.AbstractServer) -> str:
    host, port = listener.sockets[0].getsockname()[:2]
    return f"http://{host}:{port}"


def write_process_files(state_dir: Path, url: str, admin_url: str) -> None:
    """`gateway.pid` and `gateway.json` (its addresses: port 0 picks free ones), each written whole."""
    for name, text in ((ADDRESSES, json.dumps({"pid": os.getpid(), "url": url, "admin_url": admin_url})),
                       (PIDFILE, f"{os.getpid()}\n")):
        partial = state_dir / f".{name}.{os.getpid()}"
        partial.write_text(text)
        partial.replace(state_dir / name)


def remove_process_files(state_dir: Path) -> None:
    """Remove both files if the pidfile is still ours (a newer gateway may have replaced it)."""
    try:
        ours = (state_dir / PIDFILE).read_text().strip() == str(os.getpid())
    except OSError:
        return
    if ours:
        for name in (ADDRESSES, PIDFILE):
            (state_dir / name).unlink(missing_ok=True)
