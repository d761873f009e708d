"""The gateway's routing decisions, apart from HTTP: the route table, the instance picker, the
group's choice (header match, weight, mirror) and the hold of requests for a name with no
Ready instance.

The route table is what the agent publishes (`GET /v1/routes`) and what `--routes-file` holds:

    {"version": 7,
     "services": {"hello": {"token": "...", "engine": "vllm", "timeout_s": 5.0,
                            "instances": [{"id": "hello-0", "url": "http://127.0.0.1:41234",
                                           "admin": "http://127.0.0.1:41235"}]}},
     "groups": {"chat": {"token": "...", "routes": [{"service": "hello", "weight": 90}, ...]}}}

A service listed with no instances exists and holds its requests until one turns Ready.
Instances are kept across tables by id and address, with their in-flight counts and pools,
so a new table never resets the balance nor cuts a stream: a withdrawn instance finishes what
it serves, and its pool closes once idle.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bootstrap.group import GroupSpec
from serving.upstream import UpstreamPool

# Below uvicorn's (and so vLLM's and berth boot's proxy's) 5 s keep-alive: the keep-alive race.
UPSTREAM_IDLE_S = 4.0


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InstanceEntry(_Wire):
    id: str
    url: str = Field(pattern=r"^http://[^/]+:\d+$", description="http://HOST:PORT of the instance's proxy")
    admin: str | None = Field(None, description="http://HOST:PORT of its admin port (vLLM's load is read there)")


class ServiceEntry(_Wire):
    token: str | None = None
    engine: str | None = None
    timeout_s: float | None = Field(None, gt=0, description="the service's own request timeout (rpc.keepalive)")
    instances: list[InstanceEntry] = Field(default_factory=list)


class TableEntry(_Wire):
    version: int = 0
    services: dict[str, ServiceEntry] = Field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = Field(default_factory=dict)


class TableError(ValueError):
    """A route table that cannot be used; the message names the field."""


class Backend:
    """One instance as the gateway sees it: its pool and the gateway's own load figures."""

    __slots__ = ("id", "host", "port", "admin", "pool", "inflight", "waiting", "retired")

    def __init__(self, id: str, url: str, admin: str | None) -> None:
        parts = urlsplit(url)
        self.id, self.host, self.port, self.admin = id, parts.hostname or "127.0.0.1", parts.port or 80, admin
        self.pool = UpstreamPool(self.host, self.port, idle_timeout=UPSTREAM_IDLE_S)
        self.inflight = 0
        self.waiting = 0.0  # vllm:num_requests_waiting, read from its admin port
        self.retired = False  # out of the table: closed once idle

    @property
    def key(self) -> tuple[str, str, int]:
        return self.id, self.host, self.port


@dataclass
class Service:
    name: str
    token: bytes | None
    engine: str | None
    timeout_s: float | None
    backends: list[Backend]


@dataclass
class Group:
    name: str
    token: bytes | None
    spec: GroupSpec
    matched: list[Any] = field(default_factory=list)  # routes with `match`, in order
    weighted: list[Any] = field(default_factory=list)  # routes with a share above 0
    mirrored: list[Any] = field(default_factory=list)  # routes with mirror_weight above 0

    def __post_init__(self) -> None:
        self.matched = [route for route in self.spec.routes if route.match is not None]
        self.weighted = [route for route in self.spec.routes if route.share > 0]
        self.mirrored = [route for route in self.spec.routes if route.mirror_weight > 0]


@dataclass
class Choice:
    """A group's decision for one request: the service that answers and those that get a copy."""

    service: str
    mirrors: list[str]


class RouteTable:
    """One applied version of the routes; built from a table entry, reusing known backends."""

    def __init__(self, version: int, services: dict[str, Service], groups: dict[str, Group]) -> None:
        self.version, self.services, self.groups = version, services, groups

    def backends(self) -> Iterable[Backend]:
        for service in self.services.values():
            yield from service.backends


def parse_table(raw: Mapping[str, Any], known: Mapping[tuple[str, str, int], Backend]) -> RouteTable:
    """A table from its JSON form; backends already `known` (by id and address) are reused.

    Raises TableError naming the field (`services.hello.instances[0].url: ...`).
    """
    try:
        entry = TableEntry.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
                             for error in exc.errors(include_url=False))
        raise TableError(problems) from None
    services: dict[str, Service] = {}
    for name, svc in entry.services.items():
        backends = []
        for inst in svc.instances:
            fresh = Backend(inst.id, inst.url, inst.admin)
            backend = known.get(fresh.key) or fresh
            backend.admin, backend.retired = inst.admin, False
            backends.append(backend)
        services[name] = Service(name, _token(svc.token), svc.engine, svc.timeout_s, backends)
    groups: dict[str, Group] = {}
    for name, raw_group in entry.groups.items():
        if name in services:
            raise TableError(f"groups.{name}: a service has this name")
        try:
            spec = GroupSpec.model_validate({"name": name, **raw_group})
        except ValidationError as exc:
            problems = "; ".join(f"groups.{name}.{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
                                 for error in exc.errors(include_url=False))
            raise TableError(problems) from None
        for index, route in enumerate(spec.routes):
            if route.service not in services:
                raise TableError(f"groups.{name}.routes[{index}].service: no service named {route.service!r}")
            if services[route.service].token is not None and spec.token is None:
                raise TableError(f"groups.{name}.token: member {route.service!r} has a token, so the group needs one")
        groups[name] = Group(name, _token(spec.token.get_secret_value() if spec.token else None), spec)
    return RouteTable(entry.version, services, groups)


def _token(value: str | None) -> bytes | None:
    return value.encode() if value else None


def redacted(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A table's JSON form with every token replaced (the admin port's /routes)."""
    services = {name: {**svc, "token": "***"} if svc.get("token") else dict(svc) for name, svc in raw.get("services", {}).items()}
    groups = {name: {**group, "token": "***"} if group.get("token") else dict(group) for name, group in raw.get("groups", {}).items()}
    return {**raw, "services": services, "groups": groups}


def pick(backends: list[Backend], exclude: Backend | None = None, rng: Any = random) -> Backend | None:
    """Power of two random choices on the gateway's own in-flight counts (Knative's activator,
    Envoy's least-request); a vLLM instance with requests waiting loses to one without."""
    candidates = backends if exclude is None else [backend for backend in backends if backend is not exclude]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    count = len(candidates)
    index = int(rng.random() * count)
    other = int(rng.random() * (count - 1))
    first, second = candidates[index], candidates[other + 1 if other >= index else other]  # two different ones
    if (second.waiting > 0, second.inflight) < (first.waiting > 0, first.inflight):
        return second
    return first


class LowerHeaders:
    """A request's headers as a case-insensitive mapping (what HeaderMatch.matches reads)."""

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._values: dict[str, str] = {}
        for name, value in headers:
            self._values.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def get(self, name: str) -> str | None:
        return self._values.get(name.lower())


def choose(group: Group, headers: list[tuple[bytes, bytes]], present: Mapping[str, Service],
           rng: Any = random) -> Choice | None:
    """The answering service: the first route whose `match` fits, else one by weight among the
    members that exist; copies to mirrored members other than that one, each by its percent."""
    primary = None
    if group.matched:
        lowered = LowerHeaders(headers)
        primary = next((route.service for route in group.matched
                        if route.service in present and route.match.matches(lowered)), None)
    if primary is None:
        routes = [route for route in group.weighted if route.service in present]
        if not routes:
            return None
        point = rng.random() * sum(route.share for route in routes)
        for route in routes:
            point -= route.share
            if point < 0:
                primary = route.service
                break
        else:
            primary = routes[-1].service
    mirrors = [route.service for route in group.mirrored
               if route.service != primary and route.service in present and rng.random() * 100 < route.mirror_weight]
    return Choice(primary, mirrors)


class Hold:
    """Requests waiting for a Ready instance of a name: bounded, woken by each new table."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.by_service: dict[str, int] = {}
        self._changed = asyncio.Event()

    def table_changed(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def full(self) -> bool:
        return self.held >= self.limit

    def enter(self, service: str) -> None:
        self.held += 1
        self.by_service[service] = self.by_service.get(service, 0) + 1

    def leave(self, service: str) -> None:
        self.held -= 1
        self.by_service[service] -= 1

    async def next_table(self, timeout: float) -> bool:
        """Wait for the next table; False when `timeout` passed first."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


VLLM_WAITING = re.compile(rb"^vllm:num_requests_waiting(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)


def waiting_requests(metrics_text: bytes) -> float:
    """The sum of `vllm:num_requests_waiting` over the series of a Prometheus text page."""
    return sum(float(value) for value in VLLM_WAITING.findall(metrics_text))
