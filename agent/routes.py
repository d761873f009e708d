"""The route table the agent publishes to the gateway, and the drain order that depends on it.

The table (serving/routing.py reads it) holds every service with its Ready instances and
token, and every service group: the stored group files, plus the members that joined by
`metadata.group` (weight 100 unless the file lists them). Each change gets a new `version`;
`GET /v1/routes?watch=1` streams whole tables and the gateway acknowledges each one it has
applied (`POST /v1/gateway/ack`).

Drain order: before any SIGTERM to an instance the agent calls `await routes.withdraw(inst)`:
the instance leaves the table, and the agent waits until the gateway has applied that
version (at most 2 s), so no new request reaches an instance about to stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from agent.state import Store
from bootstrap.group import DEFAULT_WEIGHT, GroupSpec, parse_group
from bootstrap.spec import ServiceSpec, SpecError, SpecIssue

if TYPE_CHECKING:
    from agent.supervisor import Instance, Supervisor

log = logging.getLogger("berth.agent")

ACK_WAIT_S = 2.0
SETTLE_S = 3.0  # at most this long after the agent starts, the first table waits for adopted instances


class Routes:
    def __init__(self, supervisor: Supervisor, store: Store) -> None:
        self.supervisor, self.store = supervisor, store
        self.groups: dict[str, GroupSpec] = {}
        for raw in store.groups():
            try:
                group = parse_group(raw)[0]
            except SpecError as exc:
                log.error("stored group %s is no longer valid, not served: %s", raw.get("name"), exc)
                continue
            self.groups[group.name] = group
        self.version = 0
        self.acked = 0
        self.acked_at: float | None = None
        self.gateway_url: str | None = None  # where clients reach the gateway (None: off, or not known)
        self.gateway_admin_url: str | None = None  # its /metrics and /v1/stats (the autoscaler reads these)
        self._withdrawn: set[str] = set()  # runtime ids out of the table before their SIGTERM
        self._watchers: set[asyncio.Event] = set()
        self._acked = asyncio.Event()
        self._started = time.monotonic()

    # --- the table ---------------------------------------------------------------------------

    def table(self) -> dict[str, Any]:
        services: dict[str, Any] = {}
        members: dict[str, list[str]] = {}
        for name, svc in sorted(self.supervisor.services.items()):
            if svc.deleting:
                continue
            spec = svc.spec
            instances = [{"id": inst.id, "url": inst.endpoint,
                          **({"admin": f"http://{inst.handle.host_ip}:{inst.handle.admin_port}"} if inst.handle.admin_port else {})}
                         for inst in svc.every_instance()
                         if inst.ready and inst.endpoint and inst.handle.id not in self._withdrawn]
            services[name] = {"instances": instances, "timeout_s": spec.metadata.request_timeout_s,
                              **({"token": spec.token.get_secret_value()} if spec.token else {}),
                              **({"engine": "vllm"} if _is_vllm(spec) else {})}
            if spec.metadata.group:
                members.setdefault(spec.metadata.group, []).append(name)
        groups: dict[str, Any] = {}
        stored = self.groups
        for name in sorted(set(stored) | set(members)):
            group = stored.get(name)
            routes = [route.model_dump(mode="json", exclude_none=True) for route in group.routes] if group else []
            listed = {route["service"] for route in routes}
            routes += [{"service": member, "weight": DEFAULT_WEIGHT} for member in members.get(name, []) if member not in listed]
            routes = [route for route in routes if route["service"] in services]  # a member removed since
            if not any(route.get("weight", DEFAULT_WEIGHT) > 0 or "match" in route for route in routes):
                continue  # nothing could answer: the name is unknown until a member returns
            if not (group and group.token) and any("token" in services[route["service"]] for route in routes):
                log.warning("group %s is not served: a member has a token and the group has none "
                            "(`berth group apply` a file with a token)", name)
                continue
            groups[name] = {"routes": routes, **({"token": group.token.get_secret_value()} if group and group.token else {})}
        return {"version": self.version, "services": services, "groups": groups}

    def changed(self) -> None:
        """Something the table shows changed: a new version for every watcher."""
        self.version += 1
        for watcher in list(self._watchers):
            watcher.set()

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """The current table, then a whole new one after each change (the latest only, if several)."""
        # A restarted agent re-adopts running instances and probes them within 100 ms: a table
        # sent before that would hold requests the last one (which the gateway serves) routes.
        while time.monotonic() - self._started < SETTLE_S and any(
                inst.handle is not None and inst.handle.running and not inst.ready and inst.state.value == "Starting"
                for svc in self.supervisor.services.values() for inst in svc.every_instance()):
            await asyncio.sleep(0.05)
        wake = asyncio.Event()
        self._watchers.add(wake)
        try:
            sent = -1
            while True:
                if self.version != sent:
                    sent = self.version
                    yield self.table()
                await wake.wait()
                wake.clear()
        finally:
            self._watchers.discard(wake)

    def ack(self, version: int) -> None:
        if version > self.acked:
            self.acked, self.acked_at = version, time.time()
            acked, self._acked = self._acked, asyncio.Event()
            acked.set()

    # --- the drain order ---------------------------------------------------------------------

    async def withdraw(self, inst: Instance) -> None:
        """Take `inst` out of the table and wait (at most 2 s) until a gateway has applied that."""
        if inst.handle is None or inst.handle.id in self._withdrawn:
            return
        self._withdrawn.add(inst.handle.id)
        self.changed()
        if not self._watchers:
            return  # no gateway follows the routes now (off, or away): nothing to wait for
        wanted, deadline = self.version, time.monotonic() + ACK_WAIT_S
        while self.acked < wanted:
            acked = self._acked
            try:
                await asyncio.wait_for(acked.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                log.warning("%s: the gateway did not acknowledge routes version %d within %.0f s; stopping it anyway",
                            inst.id, wanted, ACK_WAIT_S)
                return

    def forget(self, runtime_id: str) -> None:
        """The instance is gone: its id need not be remembered."""
        self._withdrawn.discard(runtime_id)

    # --- groups and names ----------------------------------------------------------------------

    def apply_group(self, group: GroupSpec) -> bool:
        """Store and publish `group` (SpecError naming the field when it cannot be); True when new."""
        issues = self.check_group(group)
        if issues:
            raise SpecError(issues)
        created = group.name not in self.groups
        self.store.put_group(group.name, group.to_json_dict(reveal_secrets=True))
        self.groups[group.name] = group
        self.changed()
        return created

    def remove_group(self, name: str) -> bool:
        found = self.groups.pop(name, None) is not None
        self.store.delete_group(name)
        self.changed()
        return found

    def members(self, name: str) -> list[str]:
        """Services in group `name`: listed by its file or joined by their metadata.group."""
        group = self.groups.get(name)
        listed = [route.service for route in group.routes] if group else []
        joined = [svc.name for svc in self.supervisor.services.values() if svc.spec.metadata.group == name]
        return list(dict.fromkeys([*listed, *joined]))

    def check_service(self, spec: ServiceSpec) -> list[SpecIssue]:
        """A service may not take a group's name, nor join a group that is a service's name."""
        issues = []
        if spec.name in self.groups or any(svc.spec.metadata.group == spec.name for svc in self.supervisor.services.values()):
            issues.append(SpecIssue("metadata.name", f"{spec.name!r} is a service group's name (`berth group ls`); "
                                                     "services and groups share /api/predict/NAME"))
        if spec.metadata.group and spec.metadata.group in self.supervisor.services:
            issues.append(SpecIssue("metadata.group", f"{spec.metadata.group!r} is a service's name, not a group"))
        return issues

    def check_group(self, group: GroupSpec) -> list[SpecIssue]:
        """A group may not take a service's name; each route names a service on this node."""
        issues = []
        if group.name in self.supervisor.services:
            issues.append(SpecIssue("name", f"{group.name!r} is a service's name; services and groups share /api/predict/NAME"))
        for index, route in enumerate(group.routes):
            svc = self.supervisor.services.get(route.service)
            if svc is None:
                issues.append(SpecIssue(f"routes[{index}].service", f"no service named {route.service!r} on this node "
                                                                     "(`berth ls` lists them)"))
            elif svc.spec.token is not None and group.token is None:
                issues.append(SpecIssue("token", f"member {route.service!r} has a token, so the group needs one of its own "
                                                 "(clients send the group's; the gateway calls each member with its own)"))
        return issues


def _is_vllm(spec: ServiceSpec) -> bool:
    """vLLM's load (`vllm:num_requests_waiting`) steers the gateway's choice."""
    argv = spec.container.argv or []
    return any("vllm" in part for part in argv[:4])
