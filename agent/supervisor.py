"""Per-instance lifecycle: pull, start, probe, restart with backoff, stop; and re-adoption at start.

One asyncio task per instance walks the states (one vocabulary everywhere: API, CLI, events):

    Pending -> Pulling -> Starting -> Ready <-> Unhealthy
                              ^          |
                              |          v  (exit, or liveness failed)
                              +------ BackOff            Failed (permanent error, crash block)
    Stopping -> Stopped (rm)                             Evicted (disk limit: agent/disk.py, later)

Probing follows the kubelet, with one change: while an instance starts, `/ready` is asked every
100 ms (start_probe_period_s) rather than at the probe period, so deploy-to-ready is not padded.
Exits come from the runtime's event stream (Docker's `die` events) within a second.
Restarts: 10 s doubling to 300 s, reset after 10 min healthy (the kubelet's numbers; all settable).

Where the next agent issue plugs in: GPU assignment (`_assign_gpus`, today the node has no
inventory), disk-limit eviction (an `evict()` that stops an instance into EVICTED) and image GC
(which asks `images_in_use()`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, AsyncIterator

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent import coldstart, launch
from agent.config import AgentConfig
from agent.pull import PullError
from agent.revision import revision as revision_of
from agent.runtime import ExitInfo, Handle, LaunchError, Runtime
from agent.state import StoredInstance, Store
from bootstrap.spec import ServiceSpec, SpecError, parse_spec

log = logging.getLogger("berth.agent")


class State(str, Enum):
    PENDING = "Pending"
    PULLING = "Pulling"
    STARTING = "Starting"
    READY = "Ready"
    UNHEALTHY = "Unhealthy"
    BACKOFF = "BackOff"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    FAILED = "Failed"
    EVICTED = "Evicted"


class Conflict(Exception):
    """The request clashes with what the agent already runs (HTTP 409)."""


@dataclass
class Instance:
    service: str
    slot: int
    state: State = State.PENDING
    reason: str = ""
    ready: bool = False
    restarts: int = 0
    gpus: list[str] = field(default_factory=list)
    last_exit: ExitInfo | None = None
    handle: Handle | None = None
    failures_in_row: int = 0
    ready_since: float | None = None
    launched_at: float | None = None
    pull_s: float = 0.0
    cold_start: dict[str, float | None] | None = None  # agent/coldstart.py, once Ready
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    @property
    def id(self) -> str:
        return f"{self.service}-{self.slot}"

    def view(self) -> dict[str, Any]:
        handle = self.handle
        endpoint = admin = None
        if handle is not None and handle.running:
            port = handle.proxy_port or handle.app_port
            endpoint = f"http://{handle.host_ip}:{port}" if port else None
            admin = f"http://{handle.host_ip}:{handle.admin_port}" if handle.admin_port else None
        return {
            "id": self.id, "state": self.state.value, "ready": self.ready, "reason": self.reason,
            "restarts": self.restarts, "gpus": self.gpus, "endpoint": endpoint, "admin_endpoint": admin,
            "runtime_id": handle.id if handle else None,
            "last_exit": self.last_exit.as_json() if self.last_exit else None,
            "cold_start": self.cold_start,
        }


@dataclass
class Service:
    spec: ServiceSpec
    revision: str
    created: float
    instances: dict[int, Instance] = field(default_factory=dict)
    deleting: bool = False

    @property
    def name(self) -> str:
        return self.spec.name


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instances = Gauge("berth_agent_instances", "Instances by state", ["state"], registry=self.registry)
        self.restarts = Counter("berth_agent_restarts", "Instance restarts", ["service"], registry=self.registry)
        self.exits = Counter("berth_agent_exits", "Instance exits by reason", ["reason"], registry=self.registry)
        self.ready_seconds = Histogram("berth_agent_start_to_ready_seconds", "From launch to Ready",
                                       buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900), registry=self.registry)


class Supervisor:
    def __init__(self, config: AgentConfig, runtime: Runtime, store: Store) -> None:
        self.config = config
        self.runtime = runtime
        self.store = store
        self.services: dict[str, Service] = {}
        self.metrics = Metrics()
        self._by_runtime_id: dict[str, Instance] = {}
        self._early_exits: set[str] = set()
        self._subscribers: set[asyncio.Queue] = set()
        self._closing = False
        self._background: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.host_ports = config.network == "host" or runtime.name == "process"

    # --- start and stop of the agent ----------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession()
        threading.Thread(target=self.runtime.watch_exits, args=(self._exit_from_thread, lambda: self._closing),
                         name="berth-exits", daemon=True).start()
        started = time.monotonic()
        handles = await asyncio.to_thread(self.runtime.list)
        adopted = self._adopt(handles)
        log.info("runtime %s: %d instance(s) found, %d adopted in %.2f s", self.runtime.name, len(handles), adopted,
                 time.monotonic() - started)
        self._spawn(self._reap_strays_forever())

    async def close(self) -> None:
        """Stop supervising. Instances keep running: a restarted agent re-adopts them."""
        self._closing = True
        tasks = [inst.task for svc in self.services.values() for inst in svc.instances.values() if inst.task]
        for task in [*tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*tasks, *self._background, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _adopt(self, handles: list[Handle]) -> int:
        """Rebuild services from the store and attach the runtime's instances to them.

        Matching revision: adopted as it runs, never restarted. Other revision: replaced by its
        lifecycle. Exited: its exit is handled as if just seen. Unknown: a stray (reaper).
        """
        found: dict[tuple[str, int], Handle] = {}
        for handle in sorted(handles, key=lambda h: h.created_at):
            found[(handle.service, handle.slot)] = handle  # the newest wins; older duplicates are strays
        adopted = 0
        for stored in self.store.services():
            try:
                spec = parse_spec(stored.spec).spec
            except SpecError as exc:
                self._event("Invalid", f"stored spec no longer valid, not run: {exc}", stored.name)
                continue
            svc = Service(spec, stored.revision, stored.created, deleting=stored.deleting)
            self.services[svc.name] = svc
            if svc.deleting:
                self._spawn(self._delete(svc))
                continue
            for slot in range(spec.metadata.instance):
                inst = self._new_instance(svc, slot)
                handle = found.pop((svc.name, slot), None)
                if handle is not None:
                    self._attach(inst, handle)
                    if handle.revision == svc.revision:
                        adopted += 1
                        self._event("Adopted", f"adopted {handle.id[:12]} ({'running' if handle.running else 'exited'})", svc.name, inst)
                inst.task = asyncio.create_task(self._lifecycle(svc, inst))
        return adopted

    def _new_instance(self, svc: Service, slot: int) -> Instance:
        stored = self.store.instance(svc.name, slot)
        inst = Instance(svc.name, slot, restarts=stored.restarts, gpus=stored.gpus,
                        last_exit=ExitInfo.from_json(stored.last_exit) if stored.last_exit else None)
        svc.instances[slot] = inst
        return inst

    def _attach(self, inst: Instance, handle: Handle) -> None:
        inst.handle = handle
        inst.exited.clear()
        self._by_runtime_id[handle.id] = inst
        if not handle.running or handle.id in self._early_exits:
            self._early_exits.discard(handle.id)
            inst.exited.set()

    def _exit_from_thread(self, runtime_id: str) -> None:
        if self._loop is not None and not self._closing:
            self._loop.call_soon_threadsafe(self._on_exit, runtime_id)

    def _on_exit(self, runtime_id: str) -> None:
        inst = self._by_runtime_id.get(runtime_id)
        if inst is None:
            self._early_exits.add(runtime_id)  # died before its start returned; `_attach` sees it
        else:
            inst.exited.set()

    # --- deploy and delete --------------------------------------------------------------------

    def check(self, spec: ServiceSpec) -> None:
        """Raise SpecError (422) for what the operator's policy forbids."""
        ports = {svc.spec.container.port: name for name, svc in self.services.items() if not svc.deleting}
        issues = launch.check_policy(spec, self.config, host_ports=self.host_ports, app_ports_in_use=ports,
                                     gpu_capacity=self.gpu_capacity())
        if issues:
            raise SpecError(issues)

    async def deploy(self, spec: ServiceSpec) -> tuple[Service, bool]:
        """Run `spec`; (service, True) when created, (service, False) when already running as asked."""
        self.check(spec)
        revision = revision_of(spec)
        existing = self.services.get(spec.name)
        if existing is not None:
            if existing.deleting:
                raise Conflict(f"service {spec.name!r} is being removed; deploy again once `berth get {spec.name}` says not found")
            if existing.revision == revision and existing.spec.metadata.instance == spec.metadata.instance:
                return existing, False
            raise Conflict(f"service {spec.name!r} already runs revision {existing.revision}; remove it first "
                           f"(`berth rm {spec.name}`); in-place updates arrive with `berth update`")
        self.store.put_service(spec.name, spec.to_json_dict(reveal_secrets=True), revision)
        svc = Service(spec, revision, time.time())
        self.services[spec.name] = svc
        self._event("Deployed", f"revision {revision}, {spec.metadata.instance} instance(s), image {spec.container.image}", svc.name)
        for slot in range(spec.metadata.instance):
            inst = self._new_instance(svc, slot)
            inst.task = asyncio.create_task(self._lifecycle(svc, inst))
        return svc, True

    async def delete(self, name: str) -> Service:
        svc = self.services.get(name)
        if svc is None:
            raise KeyError(name)
        if not svc.deleting:
            svc.deleting = True
            self.store.mark_deleting(name)
            self._spawn(self._delete(svc))
        return svc

    async def _delete(self, svc: Service) -> None:
        for inst in svc.instances.values():
            if inst.task is not None:
                inst.task.cancel()
        await asyncio.gather(*(inst.task for inst in svc.instances.values() if inst.task), return_exceptions=True)
        await asyncio.gather(*(self._stop(svc, inst) for inst in svc.instances.values()))
        # A start that was under way when its task was cancelled may have left a container.
        for handle in await asyncio.to_thread(self.runtime.list):
            if handle.service == svc.name:
                await asyncio.to_thread(self.runtime.stop, handle.id, svc.spec.metadata.grace_s)
                await asyncio.to_thread(self.runtime.remove, handle.id)
        self.store.delete_service(svc.name)
        self.services.pop(svc.name, None)
        self._event("Deleted", "every instance stopped and removed", svc.name)

    async def _stop(self, svc: Service, inst: Instance) -> None:
        if inst.handle is not None:
            self._set(inst, State.STOPPING, f"SIGTERM, then SIGKILL after {svc.spec.metadata.grace_s} s")
            started = time.monotonic()
            await asyncio.to_thread(self.runtime.stop, inst.handle.id, svc.spec.metadata.grace_s)
            handle = await asyncio.to_thread(self.runtime.inspect, inst.handle.id)
            code = handle.exit.code if handle and handle.exit else None
            await asyncio.to_thread(self.runtime.remove, inst.handle.id)
            self._by_runtime_id.pop(inst.handle.id, None)
            self._set(inst, State.STOPPED, f"stopped in {time.monotonic() - started:.1f} s, exit code {code}")
        else:
            self._set(inst, State.STOPPED, "")

    # --- one instance's life ------------------------------------------------------------------

    async def _lifecycle(self, svc: Service, inst: Instance) -> None:
        try:
            while True:
                if inst.handle is None or inst.handle.revision != svc.revision:
                    if not await self._launch(svc, inst):
                        return
                exit_info = await self._supervise(svc, inst)
                if not await self._after_exit(svc, inst, exit_info):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - an instance must never die silently
            log.exception("instance %s: unexpected error", inst.id)
            self._set(inst, State.FAILED, f"agent error: {exc}")

    async def _launch(self, svc: Service, inst: Instance) -> bool:
        """Replace what runs (if anything), pull, start. False when the instance cannot run."""
        if inst.handle is not None:
            old = inst.handle
            self._set(inst, State.STOPPING, f"replacing revision {old.revision} with {svc.revision}")
            await asyncio.to_thread(self.runtime.stop, old.id, svc.spec.metadata.grace_s)
            await self._forget(inst)
        inst.launched_at, inst.pull_s, inst.cold_start = time.monotonic(), 0.0, None
        gpus = self._assign_gpus(svc, inst)
        if gpus is None:
            return False
        container = svc.spec.container
        policy = container.image_pull_policy or self.config.image_pull_policy
        if policy == "Never" and not await asyncio.to_thread(self.runtime.has_image, container.image):
            self._set(inst, State.FAILED, f"ErrImageNeverPull: {container.image} is not on the node and the pull policy is Never")
            return False
        if policy == "Always" or not await asyncio.to_thread(self.runtime.has_image, container.image):
            self._set(inst, State.PULLING, f"image {container.image}")
            pull_started = time.monotonic()
            try:
                await asyncio.to_thread(
                    self.runtime.ensure_image, container.image, always=policy == "Always",
                    auth=svc.spec.docker_auth.get_secret_value() if svc.spec.docker_auth else None,
                    progress=lambda message: self._from_thread(self._event, "Pulling", message, svc.name, inst),
                )
            except PullError as exc:
                return await self._cannot_start(svc, inst, f"ErrImagePull: {exc}", permanent=exc.permanent)
            inst.pull_s = time.monotonic() - pull_started
        self._set(inst, State.STARTING, "")
        request = launch.build_request(svc.spec, svc.revision, inst.slot, self.config, gpus=gpus, host_ports=self.host_ports)
        try:
            handle = await asyncio.to_thread(self.runtime.start, request)
        except LaunchError as exc:
            return await self._cannot_start(svc, inst, f"{exc.reason}: {exc}", permanent=exc.permanent)
        self._attach(inst, handle)
        self._event("Started", f"{handle.id[:12]} started", svc.name, inst)
        return True

    async def _cannot_start(self, svc: Service, inst: Instance, reason: str, *, permanent: bool) -> bool:
        if permanent:
            self._set(inst, State.FAILED, reason)
            return False
        await self._back_off(svc, inst, reason)
        return True

    def _assign_gpus(self, svc: Service, inst: Instance) -> list[str] | None:
        """GPU UUIDs for this instance; None (and Pending) when too few are free.

        The GPU inventory (agent/gpus.py) is wired in here; until then the node has none and
        `check` refuses specs asking for any.
        """
        if svc.spec.metadata.gpu == 0:
            return []
        self._set(inst, State.PENDING, f"needs {svc.spec.metadata.gpu} GPU(s); this node has no GPU inventory")
        return None

    def gpu_capacity(self) -> int:
        return 0

    async def _supervise(self, svc: Service, inst: Instance) -> ExitInfo:
        """Probe until the instance exits (or fails liveness); returns how it ended."""
        timings = self.config.timings
        container = svc.spec.container
        readiness = container.readiness_check
        liveness = container.liveness_check
        ready_period = readiness.period_seconds if readiness else timings.probe_period_s
        live_period = liveness.period_seconds if liveness else timings.probe_period_s
        timeout = min(readiness.timeout_seconds if readiness else timings.probe_timeout_s, ready_period)
        ready_threshold = readiness.failure_threshold if readiness else timings.probe_failure_threshold
        live_threshold = liveness.failure_threshold if liveness else timings.probe_failure_threshold
        if inst.state != State.READY:
            self._set(inst, State.STARTING, "waiting for /ready")
        while not inst.ready:
            if await self._exited_within(inst, timings.start_probe_period_s):
                return await self._exit_info(inst)
            if await self._probe(inst, "/ready", timeout):
                took = time.monotonic() - inst.launched_at if inst.launched_at else None
                if took is not None:
                    self.metrics.ready_seconds.observe(took)
                    await self._record_cold_start(inst, took, timeout)  # before `ready`: clients see both at once
                inst.ready, inst.ready_since = True, time.time()
                self._set(inst, State.READY, f"ready in {took:.2f} s" if took is not None else "ready (adopted)")
        ready_failures = live_failures = 0
        next_live = time.monotonic() + live_period
        while True:
            if await self._exited_within(inst, ready_period):
                return await self._exit_info(inst)
            if await self._probe(inst, "/ready", timeout):
                ready_failures = 0
                if inst.state == State.UNHEALTHY:
                    inst.ready = True
                    self._set(inst, State.READY, "readiness probe succeeded again")
            else:
                ready_failures += 1
                if ready_failures >= ready_threshold and inst.state == State.READY:
                    inst.ready = False
                    self._set(inst, State.UNHEALTHY, f"readiness probe failed {ready_failures} times in a row")
            if container.bootstrap and time.monotonic() >= next_live:
                next_live = time.monotonic() + live_period
                live_failures = 0 if await self._probe(inst, "/live", timeout) else live_failures + 1
                if live_failures >= live_threshold:
                    self._event("LivenessFailed", f"liveness probe failed {live_failures} times; restarting", svc.name, inst)
                    await asyncio.to_thread(self.runtime.stop, inst.handle.id, svc.spec.metadata.grace_s)
                    info = await self._exit_info(inst)
                    info.reason = "LivenessProbeFailed"
                    return info

    async def _record_cold_start(self, inst: Instance, ready_s: float, timeout: float) -> None:
        status = None
        if inst.handle.admin_port is not None:
            admin = f"http://{inst.handle.host_ip}:{inst.handle.admin_port}"
            status = await coldstart.fetch_boot_status(self._session, admin, timeout)
        inst.cold_start = coldstart.breakdown(inst.pull_s, ready_s, status)
        self._event("ColdStart", coldstart.summary(inst.cold_start), inst.service, inst)

    async def _exited_within(self, inst: Instance, seconds: float) -> bool:
        try:
            await asyncio.wait_for(inst.exited.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        # Events can be stale (a reused process id): believe the runtime.
        handle = await asyncio.to_thread(self.runtime.inspect, inst.handle.id)
        if handle is not None and handle.running:
            inst.exited.clear()
            return False
        return True

    async def _probe(self, inst: Instance, path: str, timeout: float) -> bool:
        handle = inst.handle
        try:
            if handle.admin_port is None:  # bootstrap off: the app port accepting is all we know
                _, writer = await asyncio.wait_for(asyncio.open_connection(handle.host_ip, handle.app_port), timeout)
                writer.close()
                return True
            url = f"http://{handle.host_ip}:{handle.admin_port}{path}"
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return 200 <= response.status < 400
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError):
            return False

    async def _exit_info(self, inst: Instance) -> ExitInfo:
        handle = await asyncio.to_thread(self.runtime.inspect, inst.handle.id)
        if handle is None:
            return ExitInfo(code=None, reason="Removed", message="the instance was removed outside the agent")
        return handle.exit or ExitInfo(code=None, reason="Unknown")

    async def _after_exit(self, svc: Service, inst: Instance, info: ExitInfo) -> bool:
        """Record the exit and wait out the backoff. False when the instance is not restarted."""
        inst.last_exit = info
        inst.ready = False
        self.metrics.exits.labels(info.reason).inc()
        detail = f"exit code {info.code} ({info.reason}{', OOM-killed' if info.oom else ''})"
        self._event("Exited", detail + (f": {info.log_tail[-1]}" if info.log_tail else ""), svc.name, inst)
        if inst.ready_since is not None and info.at - inst.ready_since >= self.config.timings.backoff_reset_s:
            inst.failures_in_row = 0
        inst.ready_since = None
        self._persist(inst)
        if svc.spec.runtime.enable_crash_block:
            self._set(inst, State.FAILED, f"{detail}; not restarted (runtime.enable_crash_block)")
            return False
        await self._back_off(svc, inst, detail)
        await self._forget(inst)
        return True

    async def _back_off(self, svc: Service, inst: Instance, reason: str) -> None:
        timings = self.config.timings
        delay = min(timings.backoff_initial_s * 2**inst.failures_in_row, timings.backoff_max_s)
        inst.failures_in_row += 1
        self._set(inst, State.BACKOFF, f"{reason}; restarting in {delay:.1f} s")
        await asyncio.sleep(delay)
        inst.restarts += 1
        self.metrics.restarts.labels(svc.name).inc()
        self._persist(inst)

    async def _forget(self, inst: Instance) -> None:
        if inst.handle is not None:
            await asyncio.to_thread(self.runtime.remove, inst.handle.id)
            self._by_runtime_id.pop(inst.handle.id, None)
            inst.handle = None

    def _persist(self, inst: Instance) -> None:
        self.store.put_instance(inst.service, inst.slot, StoredInstance(
            inst.restarts, inst.last_exit.as_json() if inst.last_exit else None, inst.gpus))

    # --- strays -------------------------------------------------------------------------------

    async def _reap_strays_forever(self) -> None:
        while True:
            try:
                await self.reap_strays()
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad pass
                log.exception("stray reaper pass failed")
            await asyncio.sleep(self.config.timings.reaper_period_s)

    async def reap_strays(self) -> None:
        """Remove berth instances no service wants, once older than the stray grace (Nomad's reaper)."""
        now = time.time()
        for handle in await asyncio.to_thread(self.runtime.list):
            owner = self._by_runtime_id.get(handle.id)
            if owner is not None or now - handle.created_at < self.config.timings.stray_grace_s:
                continue
            svc = self.services.get(handle.service)
            if svc is not None and svc.deleting:
                continue
            await asyncio.to_thread(self.runtime.stop, handle.id, float(handle.labels.get("berth.grace", "30")))
            await asyncio.to_thread(self.runtime.remove, handle.id)
            self._event("StrayRemoved", f"removed {handle.id[:12]} (revision {handle.revision or '?'}), unknown to this agent",
                        handle.service or None)

    # --- views and events ---------------------------------------------------------------------

    def images_in_use(self) -> set[str]:
        return {svc.spec.container.image for svc in self.services.values()}

    def view(self, svc: Service) -> dict[str, Any]:
        instances = [inst.view() for _, inst in sorted(svc.instances.items())]
        return {
            "name": svc.name, "revision": svc.revision, "runtime": self.runtime.name, "created": svc.created,
            "deleting": svc.deleting, "image": svc.spec.container.image, "instance": svc.spec.metadata.instance,
            "ready": sum(1 for inst in instances if inst["ready"]), "instances": instances,
            "spec": svc.spec.to_json_dict(),
        }

    def _set(self, inst: Instance, state: State, reason: str) -> None:
        changed = inst.state != state
        inst.state, inst.reason = state, reason
        if state not in (State.READY, State.UNHEALTHY):
            inst.ready = False
        if changed:
            self._event(state.value, reason, inst.service, inst)
            counts: dict[str, int] = {s.value: 0 for s in State}
            for svc in self.services.values():
                for other in svc.instances.values():
                    counts[other.state.value] += 1
            for name, count in counts.items():
                self.metrics.instances.labels(name).set(count)

    def _from_thread(self, function, *args) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(function, *args)

    def _event(self, kind: str, message: str, service: str | None = None, inst: Instance | None = None) -> None:
        event = self.store.add_event(kind, message, service, inst.id if inst else None)
        where = inst.id if inst else (service or "agent")
        log.info("%s: %s%s", where, kind, f": {message}" if message else "")
        for queue in list(self._subscribers):
            queue.put_nowait(event)

    async def subscribe(self, *, since: int, service: str | None, follow: bool) -> AsyncIterator[dict]:
        """Stored events after `since`, then (with `follow`) new ones as they happen."""
        queue: asyncio.Queue = asyncio.Queue()
        if follow:
            self._subscribers.add(queue)
        try:
            last = since
            for event in self.store.events(since=since, service=service):
                last = event["id"]
                yield event
            while follow:
                event = await queue.get()
                if event["id"] > last and (service is None or event["service"] == service):
                    yield event
        finally:
            self._subscribers.discard(queue)
