"""Per-instance lifecycle: pull, start, probe, restart with backoff, stop; and re-adoption at start.

One asyncio task per instance walks the states (one vocabulary everywhere: API, CLI, events):

    Pending -> Pulling -> Starting -> Ready <-> Unhealthy
                              ^          |
                              |          v  (exit, or liveness failed)
                              +------ BackOff            Failed (permanent error, crash block)
    Stopping -> Stopped (rm, rollout)                    Evicted (over its disk limit) -> BackOff

Probing follows the kubelet, with one change: while an instance starts, `/ready` is asked every
100 ms (start_probe_period_s) rather than at the probe period, so deploy-to-ready is not padded.
Exits come from the runtime's event stream (Docker's `die` events) within a second.
Restarts: 10 s doubling to 300 s, reset after 10 min healthy (the kubelet's numbers; all settable).

Each instance carries its own spec and revision: during a rolling update (`update`) a slot's
new instance starts beside the old one (surge), and the old one is drained only once the new
one is Ready. Housekeeping loops run beside the instances: disk-limit eviction, the lost-GPU
check and image GC, each at a period from the operator's configuration.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent import coldstart, gpu_share, launch
from agent.config import AgentConfig
from agent.disk import DISK_LIMIT_EXCEEDED, DiskLimitPolicy
from agent.gpus import GpuAllocator, GpuRequestRefused, GpuShare, GpusPending, open_inventory
from agent.pull import PullError
from agent.revision import revision as revision_of
from agent.routes import Routes
from agent.runtime import LABEL_GPU_MEMORY, LABEL_GPUS, ExitInfo, Handle, LaunchError, Runtime
from agent.state import StoredInstance, Store, disk_full, disk_full_message
from bootstrap.errors import CommandFailed
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
    spec: ServiceSpec
    revision: str
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
    # Why the agent itself stopped the running instance (eviction, lost GPU): (reason, message).
    stopped_by_agent: tuple[str, str] | None = None
    surge: bool = False  # a rollout's new instance, beside the old one of its slot until Ready
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    @property
    def id(self) -> str:
        return f"{self.service}-{self.slot}"

    @property
    def gpu_key(self) -> str:
        """The GPU holder's name: a slot's old and new instance (a rollout's surge) hold GPUs apart."""
        return f"{self.id}@{self.revision}"

    @property
    def endpoint(self) -> str | None:
        handle = self.handle
        if handle is None or not handle.running:
            return None
        port = handle.proxy_port or handle.app_port
        return f"http://{handle.host_ip}:{port}" if port else None

    def view(self) -> dict[str, Any]:
        handle = self.handle
        endpoint = self.endpoint
        admin = f"http://{handle.host_ip}:{handle.admin_port}" if endpoint and handle.admin_port else None
        return {
            "id": self.id, "revision": self.revision, "state": self.state.value, "ready": self.ready, "reason": self.reason,
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
    surge: list[Instance] = field(default_factory=list)  # a rollout's new instances, not yet Ready
    deleting: bool = False
    rollout: dict[str, Any] | None = None
    rollout_task: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def every_instance(self) -> list[Instance]:
        return [*self.instances.values(), *self.surge]


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
        self.gpus = GpuAllocator(open_inventory(config.gpu_inventory_file), config.state_dir / "gpu-checkpoint.json")
        self._gpus_freed = asyncio.Event()  # replaced after each release: Pending instances wait on it
        self.gpu_watch = gpu_share.MemoryWatch()
        self.vllm_starts = gpu_share.StartQueue()
        self._by_runtime_id: dict[str, Instance] = {}
        self._early_exits: set[str] = set()
        self._subscribers: set[asyncio.Queue] = set()
        self._closing = False
        self._background: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.host_ports = config.network == "host" or runtime.name == "process"
        self.routes = Routes(self, store)  # the gateway's table; published on every change below

    # --- start and stop of the agent ----------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession()
        threading.Thread(target=self.runtime.watch_exits, args=(self._exit_from_thread, lambda: self._closing),
                         name="berth-exits", daemon=True).start()
        started = time.monotonic()
        handles = await asyncio.to_thread(self.runtime.list)
        adopted = self._adopt(handles)
        log.info("runtime %s: %d instance(s) found, %d adopted in %.2f s; GPUs from %s", self.runtime.name, len(handles),
                 adopted, time.monotonic() - started, self.gpus.inventory.describe())
        timings = self.config.timings
        for period, housekeeping in ((timings.state_check_period_s, self.keep_state_database),
                                     (timings.reaper_period_s, self.reap_strays),
                                     (timings.eviction_period_s, self.evict_over_disk_limit),
                                     (timings.gpu_check_period_s, self.check_gpus),
                                     (timings.gpu_watch_period_s, self.watch_gpu_memory),
                                     (timings.image_gc_period_s, self.collect_images)):
            self._spawn(self._every(period, housekeeping))

    async def close(self) -> None:
        """Stop supervising. Instances keep running: a restarted agent re-adopts them."""
        self._closing = True
        tasks = [inst.task for svc in self.services.values() for inst in svc.every_instance() if inst.task]
        tasks += [svc.rollout_task for svc in self.services.values() if svc.rollout_task]
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

    async def _every(self, period: float, housekeeping) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await housekeeping()
            except Exception:  # noqa: BLE001 - housekeeping must outlive one bad pass
                log.exception("%s failed; tried again in %g s", housekeeping.__name__, period)

    def _adopt(self, handles: list[Handle]) -> int:
        """Rebuild services from the store and attach the runtime's instances to them.

        Matching revision: adopted as it runs, never restarted. An older revision the store
        still knows (an update under way when the agent stopped): adopted, and the rollout
        resumes. Unknown revision: replaced by its lifecycle. Exited: its exit is handled as
        if just seen. Unknown service or slot: a stray (reaper).
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
            stale = False
            for slot in range(spec.metadata.instance):
                handle = found.pop((svc.name, slot), None)
                own_spec, own_revision = spec, svc.revision
                if handle is not None and handle.revision != svc.revision:
                    older = self.store.revision_spec(svc.name, handle.revision)
                    if older is not None:
                        own_spec, own_revision, stale = parse_spec(older).spec, handle.revision, True
                inst = self._new_instance(svc, slot, own_spec, own_revision)
                if handle is not None:
                    self._attach(inst, handle)
                    if handle.revision == inst.revision:
                        adopted += 1
                        self._adopt_gpus(inst, handle)
                        self._event("Adopted", f"adopted {handle.id[:12]} ({'running' if handle.running else 'exited'})", svc.name, inst)
                inst.task = asyncio.create_task(self._lifecycle(inst))
            if stale:
                self._start_rollout(svc)
        self.gpus.retain_only(inst.gpu_key for svc in self.services.values() for inst in svc.instances.values())
        return adopted

    def _adopt_gpus(self, inst: Instance, handle: Handle) -> None:
        uuids = [uuid for uuid in handle.labels.get(LABEL_GPUS, "").split(",") if uuid]
        if not uuids:
            return
        try:
            if share := handle.labels.get(LABEL_GPU_MEMORY):
                self.gpus.adopt_share(inst.gpu_key, GpuShare(uuid=uuids[0], memory_bytes=int(share)))
            else:
                self.gpus.adopt(inst.gpu_key, uuids)
            inst.gpus = uuids
        except CommandFailed as exc:
            self._event("GpuConflict", str(exc), inst.service, inst)

    def _new_instance(self, svc: Service, slot: int, spec: ServiceSpec, revision: str, *, surge: bool = False) -> Instance:
        """An instance of `svc` in `slot`; a surge instance (a rollout's new one) starts with a clean record."""
        if surge:
            inst = Instance(svc.name, slot, spec, revision, surge=True)
            svc.surge.append(inst)
            return inst
        stored = self.store.instance(svc.name, slot)
        inst = Instance(svc.name, slot, spec, revision, restarts=stored.restarts, gpus=stored.gpus,
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

    # --- deploy, update and delete ------------------------------------------------------------

    def check(self, spec: ServiceSpec) -> None:
        """Raise SpecError (422) for what the operator's policy forbids."""
        ports = {svc.spec.container.port: name for name, svc in self.services.items() if not svc.deleting}
        issues = launch.check_policy(spec, self.config, host_ports=self.host_ports, app_ports_in_use=ports,
                                     gpu_capacity=self.gpu_capacity(), process_runtime=self.runtime.name == "process")
        issues += gpu_share.share_issues(spec.metadata, self.gpus.inventory.gpus())
        issues += self.routes.check_service(spec)
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
            raise Conflict(f"service {spec.name!r} already runs revision {existing.revision}; roll it to this config "
                           f"with `berth update {spec.name} FILE` (or remove it first with `berth rm {spec.name}`)")
        self.store.put_service(spec.name, spec.to_json_dict(reveal_secrets=True), revision)
        svc = Service(spec, revision, time.time())
        self.services[spec.name] = svc
        self.routes.changed()  # the name exists now: the gateway holds its requests until an instance is Ready
        self._event("Deployed", f"revision {revision}, {spec.metadata.instance} instance(s), image {spec.container.image}", svc.name)
        for slot in range(spec.metadata.instance):
            inst = self._new_instance(svc, slot, spec, revision)
            inst.task = asyncio.create_task(self._lifecycle(inst))
        return svc, True

    async def update(self, spec: ServiceSpec) -> Service:
        """Roll `spec.name` to `spec` (a rolling update); returns at once, the rollout runs on."""
        svc = self.services.get(spec.name)
        if svc is None:
            raise KeyError(spec.name)
        if svc.deleting:
            raise Conflict(f"service {spec.name!r} is being removed")
        self.check(spec)
        revision = revision_of(spec)
        unchanged = revision == svc.revision and spec.metadata.instance == svc.spec.metadata.instance
        if unchanged and not (svc.rollout and svc.rollout["state"] == "Paused"):
            return svc
        previous = svc.revision
        self.store.put_service(spec.name, spec.to_json_dict(reveal_secrets=True), revision)
        svc.spec, svc.revision = spec, revision
        self._event("Updating", f"revision {previous} -> {revision}, {spec.metadata.instance} instance(s), "
                                f"image {spec.container.image}", svc.name)
        self._start_rollout(svc)
        return svc

    async def rollback(self, name: str) -> Service:
        """Roll back to the revision deployed before the current one."""
        svc = self.services.get(name)
        if svc is None:
            raise KeyError(name)
        previous = self.store.previous_revision(name, svc.revision)
        if previous is None:
            raise Conflict(f"service {name!r} has no earlier revision to roll back to (only {svc.revision})")
        self._event("RollingBack", f"to revision {previous[0]}", name)
        return await self.update(parse_spec(previous[1]).spec)

    def _start_rollout(self, svc: Service) -> None:
        if svc.rollout_task is not None:
            svc.rollout_task.cancel()  # a newer update supersedes the one under way (Kubernetes: rollover)
        svc.rollout_task = self._spawn(self._rollout(svc, svc.rollout_task))

    async def _rollout(self, svc: Service, superseded: asyncio.Task | None) -> None:
        """Replace each instance of an older revision, `surge` new ones beside the old at a time.

        A new instance must be Ready before the old one of its slot is drained (SIGTERM: the
        bootstrap stops reporting ready and keeps serving for its drain delay). `max_unavailable`
        old instances may go first. A new instance that fails pauses the rollout, old ones serving.
        """
        if superseded is not None:
            await asyncio.gather(superseded, return_exceptions=True)
        spec, revision = svc.spec, svc.revision
        count = spec.metadata.instance
        strategy = spec.metadata.rolling_strategy
        surge, unavailable = strategy.surge(count), strategy.unavailable(count)
        if self.host_ports:
            # Two instances of one service would bind the same app port on the host.
            surge, unavailable = 0, max(1, unavailable)
        started = time.time()
        svc.rollout = {"state": "Progressing", "revision": revision, "reason": "", "started": started, "finished": None,
                       "max_surge": surge, "max_unavailable": unavailable}
        await asyncio.gather(*(self._retire(svc, inst) for inst in list(svc.surge)))  # an interrupted rollout's
        for slot in range(count):
            if slot not in svc.instances:  # scaled up
                inst = self._new_instance(svc, slot, spec, revision)
                inst.task = asyncio.create_task(self._lifecycle(inst))
        stale = [slot for slot in sorted(svc.instances) if slot < count and svc.instances[slot].revision != revision]
        while stale:
            batch, stale = stale[:surge + unavailable], stale[surge + unavailable:]
            early = batch[:unavailable]
            await asyncio.gather(*(self._retire(svc, svc.instances[slot]) for slot in early))
            fresh = {slot: self._new_instance(svc, slot, spec, revision, surge=True) for slot in batch}
            for inst in fresh.values():
                inst.task = asyncio.create_task(self._lifecycle(inst))
            failure = await self._ready_or_failed(list(fresh.values()))
            if failure is not None:
                await asyncio.gather(*(self._retire(svc, inst) for inst in fresh.values()))
                svc.rollout.update(state="Paused", reason=failure)
                self._event("RolloutPaused", f"{failure}; old instances keep serving; `berth update --rollback "
                                             f"{svc.name}` returns to the previous revision", svc.name)
                return
            for slot, inst in fresh.items():
                old = svc.instances[slot]
                svc.instances[slot] = inst
                svc.surge.remove(inst)
                inst.surge = False
                self._persist(inst)
                if slot not in early:
                    await self._retire(svc, old)
        for slot in [slot for slot in svc.instances if slot >= count]:  # scaled down
            await self._retire(svc, svc.instances.pop(slot))
            self.store.drop_instance(svc.name, slot)
        svc.rollout.update(state="Complete", finished=time.time())
        self._event("RolloutComplete", f"every instance on revision {revision} in {time.time() - started:.1f} s", svc.name)

    async def _ready_or_failed(self, fresh: list[Instance]) -> str | None:
        """Wait until every new instance is Ready; the reason of the first that fails, else None."""
        deadline = time.monotonic() + self.config.timings.rollout_ready_timeout_s
        while not all(inst.ready for inst in fresh):
            for inst in fresh:
                if inst.state in (State.BACKOFF, State.FAILED, State.EVICTED) or inst.last_exit is not None:
                    tail = inst.last_exit.log_tail[-5:] if inst.last_exit else []
                    return f"new instance {inst.id} (revision {inst.revision}) {inst.state.value}: {inst.reason}" + (
                        "; last log lines: " + " | ".join(tail) if tail else "")
            if time.monotonic() > deadline:
                waiting = next(inst for inst in fresh if not inst.ready)
                return (f"new instance {waiting.id} (revision {waiting.revision}) not Ready within "
                        f"{self.config.timings.rollout_ready_timeout_s:.0f} s ({waiting.state.value}: {waiting.reason})")
            await asyncio.sleep(0.05)
        return None

    async def _retire(self, svc: Service, inst: Instance) -> None:
        """Take an instance out of service: no more restarts, out of the endpoints, then drained and removed."""
        if inst.task is not None:
            inst.task.cancel()
            await asyncio.gather(inst.task, return_exceptions=True)
        await self._stop(inst)
        if inst in svc.surge:
            svc.surge.remove(inst)

    async def delete(self, name: str) -> Service:
        svc = self.services.get(name)
        if svc is None:
            raise KeyError(name)
        if not svc.deleting:
            self.store.mark_deleting(name)  # first: when the disk is full, nothing has changed
            svc.deleting = True
            self.routes.changed()
            self._spawn(self._delete(svc))
        return svc

    async def _delete(self, svc: Service) -> None:
        if svc.rollout_task is not None:
            svc.rollout_task.cancel()
            await asyncio.gather(svc.rollout_task, return_exceptions=True)
        instances = svc.every_instance()
        for inst in instances:
            if inst.task is not None:
                inst.task.cancel()
        await asyncio.gather(*(inst.task for inst in instances if inst.task), return_exceptions=True)
        await asyncio.gather(*(self._stop(inst) for inst in instances))
        # A start that was under way when its task was cancelled may have left a container.
        for handle in await asyncio.to_thread(self.runtime.list):
            if handle.service == svc.name:
                await asyncio.to_thread(self.runtime.stop, handle.id, svc.spec.metadata.grace_s)
                await asyncio.to_thread(self.runtime.remove, handle.id)
        await asyncio.to_thread(self.runtime.remove_service, svc.name)
        for inst in instances:
            self.previous_logs_path(inst).unlink(missing_ok=True)
        await self._until_stored(self.store.delete_service, svc.name)
        self.services.pop(svc.name, None)
        self.routes.changed()
        self._event("Deleted", "every instance stopped and removed", svc.name)

    async def _stop(self, inst: Instance) -> None:
        """SIGTERM, the grace period, SIGKILL; then removed, and its GPUs released."""
        grace = inst.spec.metadata.grace_s
        if inst.handle is not None:
            await self.routes.withdraw(inst)  # drain order: out of the gateway's table before SIGTERM
            self._set(inst, State.STOPPING, f"SIGTERM, then SIGKILL after {grace} s")
            started = time.monotonic()
            await asyncio.to_thread(self.runtime.stop, inst.handle.id, grace)
            handle = await asyncio.to_thread(self.runtime.inspect, inst.handle.id)
            code = handle.exit.code if handle and handle.exit else None
            await asyncio.to_thread(self.runtime.remove, inst.handle.id)
            self._by_runtime_id.pop(inst.handle.id, None)
            self.routes.forget(inst.handle.id)
            inst.handle = None
            self._set(inst, State.STOPPED, f"revision {inst.revision} stopped in {time.monotonic() - started:.1f} s, "
                                           f"exit code {code}")
        else:
            self._set(inst, State.STOPPED, "")
        self._release_gpus(inst)

    # --- one instance's life ------------------------------------------------------------------

    async def _lifecycle(self, inst: Instance) -> None:
        while True:
            try:
                while True:
                    if inst.handle is None or inst.handle.revision != inst.revision:
                        if not await self._launch(inst):
                            return
                        if inst.handle is None:
                            continue  # the pull or start failed and was backed off: try again
                    exit_info = await self._supervise(inst)
                    if not await self._after_exit(inst, exit_info):
                        return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - an instance must never die silently
                log.exception("instance %s: unexpected error", inst.id)
                # Failed only when its processes are gone: one that runs, or that the runtime cannot
                # tell about now (an engine restarting), is supervised again.
                try:
                    handle = inst.handle and await asyncio.to_thread(self.runtime.inspect, inst.handle.id)
                    gone = handle is None or not handle.running
                except Exception:  # noqa: BLE001 - the runtime itself is unreachable
                    gone = False
                if gone:
                    self._set(inst, State.FAILED, f"agent error: {exc}")
                    return
                inst.ready = False
                self._set(inst, State.UNHEALTHY, f"agent error: {exc}; supervised again")
                await asyncio.sleep(self.config.timings.backoff_initial_s)

    async def _launch(self, inst: Instance) -> bool:
        """Replace what runs (if anything), pull, start. False when the instance cannot run."""
        spec = inst.spec
        if inst.handle is not None:
            old = inst.handle
            self._set(inst, State.STOPPING, f"replacing revision {old.revision} with {inst.revision}")
            await asyncio.to_thread(self.runtime.stop, old.id, spec.metadata.grace_s)
            await self._forget(inst)
        gpus = await self._assign_gpus(inst)
        if gpus is None:
            return False
        inst.launched_at, inst.pull_s, inst.cold_start = time.monotonic(), 0.0, None
        container = spec.container
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
                    auth=spec.docker_auth.get_secret_value() if spec.docker_auth else None,
                    progress=lambda message: self._from_thread(self._event, "Pulling", message, inst.service, inst),
                )
            except PullError as exc:
                return await self._cannot_start(inst, f"ErrImagePull: {exc}", permanent=exc.permanent)
            inst.pull_s = time.monotonic() - pull_started
        share = gpu_share.placement(self.gpus, inst.gpu_key, self.config.mps_pipe_directory)
        if share is not None and gpu_share.is_vllm(spec):
            await self._vllm_turn(inst, share.share.uuid)
        self._set(inst, State.STARTING, "")
        try:
            request = launch.build_request(spec, inst.revision, inst.slot, self.config, gpus=gpus, host_ports=self.host_ports,
                                           share=share)
            handle = await asyncio.to_thread(self.runtime.start, request)
        except LaunchError as exc:
            if exc.instance_id is not None:  # kept for `docker inspect`; removed with the service
                if (kept := await asyncio.to_thread(self.runtime.inspect, exc.instance_id)) is not None:
                    self._attach(inst, kept)
                    inst.exited.clear()
            return await self._cannot_start(inst, f"{exc.reason}: {exc}", permanent=exc.permanent)
        self._attach(inst, handle)
        self._event("Started", f"{handle.id[:12]} started (revision {inst.revision})", inst.service, inst)
        return True

    async def _cannot_start(self, inst: Instance, reason: str, *, permanent: bool) -> bool:
        if permanent:
            self._set(inst, State.FAILED, reason)
            return False
        await self._back_off(inst, reason)
        return True

    async def _assign_gpus(self, inst: Instance) -> list[str] | None:
        """GPU UUIDs for this instance, waiting in Pending while too few are free; None when it can never have them.

        The instance keeps its GPUs across restarts (the same UUIDs, so its weights' GPU memory
        layout and NVML's view stay put); they are released when it is stopped for good.
        """
        count, share_bytes = inst.spec.metadata.gpu, inst.spec.metadata.gpu_memory_bytes
        while True:
            try:
                if share_bytes is None:
                    uuids = await asyncio.to_thread(self.gpus.allocate, inst.gpu_key, count)
                else:
                    uuids = ((await asyncio.to_thread(self.gpus.allocate_share, inst.gpu_key, share_bytes)).uuid,)
            except GpuRequestRefused as exc:  # the node has fewer GPUs now than when the spec was accepted
                self._set(inst, State.FAILED, str(exc))
                return None
            except GpusPending as exc:
                freed = self._gpus_freed
                self._set(inst, State.PENDING, str(exc))
                await freed.wait()
                continue
            if list(uuids) != inst.gpus:
                inst.gpus = list(uuids)
                self._persist(inst)
                if share_bytes is not None:
                    mps = gpu_share.detect_mps(self.config.mps_pipe_directory)
                    self._event("GpuShare", f"{inst.spec.metadata.gpu_memory:g} GiB of GPU {uuids[0]}; "
                                            f"{gpu_share.enforcement_note(inst.spec.metadata, mps)}", inst.service, inst)
            return inst.gpus

    async def _vllm_turn(self, inst: Instance, uuid: str) -> None:
        """Wait until no other vLLM engine is starting on this shared GPU (see gpu_share.StartQueue)."""
        startup = inst.spec.container.startup_check
        timeout = (startup.initial_delay_seconds + startup.period_seconds * startup.failure_threshold if startup
                   else self.config.timings.rollout_ready_timeout_s)
        await self.vllm_starts.wait_turn(
            uuid, inst.gpu_key, timeout_s=timeout,
            settled=lambda: inst.ready or inst.state in (State.BACKOFF, State.FAILED, State.EVICTED, State.STOPPED),
            waiting=lambda holder: self._set(inst, State.PENDING, f"waits for the vLLM engine of {holder.split('@')[0]} to "
                                                                  f"start on GPU {uuid} (vLLM engines on one GPU start one at a time)"))

    def _release_gpus(self, inst: Instance) -> None:
        if inst.spec.metadata.gpu == 0 and inst.spec.metadata.gpu_memory is None:
            return
        self.gpus.release(inst.gpu_key)
        inst.gpus = []
        freed, self._gpus_freed = self._gpus_freed, asyncio.Event()
        freed.set()

    def gpu_capacity(self) -> int:
        return len(self.gpus.inventory.gpus())

    async def _supervise(self, inst: Instance) -> ExitInfo:
        """Probe until the instance exits (or fails liveness); returns how it ended."""
        timings = self.config.timings
        container = inst.spec.container
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
                    self._event("LivenessFailed", f"liveness probe failed {live_failures} times; restarting", inst.service, inst)
                    await asyncio.to_thread(self.runtime.stop, inst.handle.id, inst.spec.metadata.grace_s)
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

    async def _after_exit(self, inst: Instance, info: ExitInfo) -> bool:
        """Record the exit and wait out the backoff. False when the instance is not restarted."""
        if inst.stopped_by_agent is not None:
            (info.reason, info.message), inst.stopped_by_agent = inst.stopped_by_agent, None
        inst.last_exit = info
        inst.ready = False
        self.metrics.exits.labels(info.reason).inc()
        detail = f"exit code {info.code} ({info.reason}{', OOM-killed' if info.oom else ''})"
        self._event("Exited", detail + (f": {info.log_tail[-1]}" if info.log_tail else ""), inst.service, inst)
        if inst.ready_since is not None and info.at - inst.ready_since >= self.config.timings.backoff_reset_s:
            inst.failures_in_row = 0
        inst.ready_since = None
        self._persist(inst)
        if inst.spec.runtime.enable_crash_block:
            final = State.EVICTED if info.reason in (DISK_LIMIT_EXCEEDED, gpu_share.GPU_MEMORY_EXCEEDED) else State.FAILED
            self._set(inst, final, f"{detail}; not restarted (runtime.enable_crash_block)")
            return False
        await self._keep_previous_logs(inst)
        await self._back_off(inst, detail)
        await self._forget(inst)
        return True

    async def _back_off(self, inst: Instance, reason: str) -> None:
        timings = self.config.timings
        delay = min(timings.backoff_initial_s * 2**inst.failures_in_row, timings.backoff_max_s)
        inst.failures_in_row += 1
        self._set(inst, State.BACKOFF, f"{reason}; restarting in {delay:.1f} s")
        await asyncio.sleep(delay)
        inst.restarts += 1
        self.metrics.restarts.labels(inst.service).inc()
        self._persist(inst)

    async def _forget(self, inst: Instance) -> None:
        if inst.handle is not None:
            await asyncio.to_thread(self.runtime.remove, inst.handle.id)
            self._by_runtime_id.pop(inst.handle.id, None)
            inst.handle = None

    def previous_logs_path(self, inst: Instance) -> Path:
        return self.config.state_dir / "previous-logs" / f"{inst.id}.log"

    async def _keep_previous_logs(self, inst: Instance) -> None:
        """Keep the ended run's logs (their last log_max_size_bytes) for `berth logs --previous`,
        as the kubelet keeps a restarted container's last instance."""
        if inst.handle is None:
            return
        limit, path, runtime_id = self.config.log_max_size_bytes, self.previous_logs_path(inst), inst.handle.id

        def copy() -> None:
            kept = bytearray()
            for chunk in self.runtime.logs(runtime_id, tail=None, follow=False):
                kept += chunk
                del kept[:-limit]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes(kept))

        await asyncio.to_thread(copy)

    def _persist(self, inst: Instance) -> None:
        if inst.surge:
            return  # a rollout's new instance takes over the slot's record once it is Ready
        try:
            self.store.put_instance(inst.service, inst.slot, StoredInstance(
                inst.restarts, inst.last_exit.as_json() if inst.last_exit else None, inst.gpus))
        except Exception as exc:  # noqa: BLE001 - see _unstored
            self._unstored(exc, f"the record of {inst.id}")

    # --- a full disk under the state directory: supervision goes on, writes wait for space ----

    def _unstored(self, exc: Exception, what: str) -> None:
        """A record that could not be written: logged; the instance it describes is supervised on."""
        if not disk_full(exc):
            raise exc
        log.error("%s not stored: %s", what, disk_full_message(self.config.state_dir))

    async def _until_stored(self, write, *args) -> None:
        """Retry a write the outcome of an operation hangs on (a removal) until space returns."""
        while True:
            try:
                write(*args)
                return
            except Exception as exc:  # noqa: BLE001
                self._unstored(exc, f"{write.__name__}{args}")
                await asyncio.sleep(self.config.timings.probe_period_s)

    # --- housekeeping -------------------------------------------------------------------------

    def _running(self) -> list[Instance]:
        return [inst for svc in self.services.values() if not svc.deleting for inst in svc.every_instance()
                if inst.handle is not None and inst.handle.running and inst.state not in (State.STOPPING, State.STOPPED)]

    async def evict_over_disk_limit(self) -> None:
        """Measure each limited instance's disk use (writable layer, disk empty_dirs, logs) and
        evict those over their limit, as the kubelet does for ephemeral storage."""
        for inst in self._running():
            policy = DiskLimitPolicy.from_spec(inst.spec)
            if not policy.enforced:
                continue
            usage = await asyncio.to_thread(self.runtime.disk_usage, inst.handle.id, list(policy.empty_dirs))
            eviction = policy.check(usage) if usage is not None else None
            if eviction is not None and inst.handle is not None:
                await self._evict(inst, eviction.reason, eviction.message)

    async def _evict(self, inst: Instance, reason: str, message: str) -> None:
        """Stop an instance over a limit with the eviction grace; its lifecycle restarts it with backoff."""
        inst.stopped_by_agent = (reason, message)
        self._event(reason, message, inst.service, inst)
        self._set(inst, State.EVICTED, message)
        await asyncio.to_thread(self.runtime.stop, inst.handle.id, self.config.timings.eviction_grace_s)

    async def watch_gpu_memory(self) -> None:
        """Hold each GPU share to its size through NVML's per-process memory (soft enforcement;
        see agent/gpu_share.py)."""
        shared = {inst.gpu_key: inst for inst in self._running() if inst.spec.metadata.gpu_memory is not None}
        shares = {key: share for key in shared if (share := self.gpus.share_of(key)) is not None}
        owners = {inst.handle.id: key for key, inst in shared.items()}

        def measure() -> dict[str, int]:
            return gpu_share.used_by_instance(self.gpus.inventory.gpus(), owners, self.runtime.instance_of_pid)

        for excess in self.gpu_watch.check(shares, await asyncio.to_thread(measure) if shares else {}):
            inst = shared[excess.key]
            if inst.handle is not None:
                await self._evict(inst, gpu_share.GPU_MEMORY_EXCEEDED, excess.message)

    async def check_gpus(self) -> None:
        """Recreate instances whose container lost its GPUs (NVML "Unknown Error" after a driver or
        systemd reload): the same GPUs, a new container."""
        for inst in self._running():
            if not inst.gpus or not inst.ready:
                continue
            verdict = await asyncio.to_thread(self.runtime.check_gpus, inst.handle.id, inst.gpus)
            if verdict is None or verdict.state != "lost" or inst.handle is None:
                continue
            inst.stopped_by_agent = ("GpuLost", verdict.reason)
            self._event("GpuLost", f"{verdict.reason}; recreating with the same GPUs", inst.service, inst)
            await asyncio.to_thread(self.runtime.stop, inst.handle.id, inst.spec.metadata.grace_s)

    async def collect_images(self) -> None:
        result = await asyncio.to_thread(self.runtime.collect_images, self.images_in_use())
        if result is not None and result.removed:
            names = ", ".join(", ".join(image.references) or image.image_id[:19] for image in result.removed)
            self._event("ImagesCollected", f"image filesystem {result.usage.percent:.0f}% used: removed {names} "
                                           f"({result.freed_bytes} bytes)")

    async def keep_state_database(self) -> None:
        """A state database deleted under the running agent is written back at once (see Store)."""
        if await asyncio.to_thread(self.store.write_back_if_deleted):
            log.error("the state database %s was deleted while the agent ran: written back from the open copy",
                      self.store.path)
            self._event("StateRestored", f"{self.store.path} was deleted while the agent ran; written back")

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
        """Images any instance runs or a service wants (image GC keeps them)."""
        wanted = {svc.spec.container.image for svc in self.services.values()}
        return wanted | {inst.spec.container.image for svc in self.services.values() for inst in svc.every_instance()}

    def view(self, svc: Service) -> dict[str, Any]:
        instances = sorted(svc.every_instance(), key=lambda inst: (inst.slot, inst.surge))
        views = [inst.view() for inst in instances]
        return {
            "name": svc.name, "revision": svc.revision, "runtime": self.runtime.name, "created": svc.created,
            "deleting": svc.deleting, "image": svc.spec.container.image, "instance": svc.spec.metadata.instance,
            "ready": sum(1 for inst in svc.instances.values() if inst.ready),
            # Where to send requests now: every Ready instance, of whichever revision (a rollout serves from both).
            "endpoints": [inst.endpoint for inst in instances if inst.ready and inst.endpoint],
            "rollout": svc.rollout, "instances": views, "spec": svc.spec.to_json_dict(),
            "gateway_url": f"{self.routes.gateway_url}/api/predict/{svc.name}" if self.routes.gateway_url else None,
        }

    def _set(self, inst: Instance, state: State, reason: str) -> None:
        changed = inst.state != state
        inst.state, inst.reason = state, reason
        if state not in (State.READY, State.UNHEALTHY):
            inst.ready = False
        if changed:
            self.routes.changed()  # readiness may have changed: the gateway's table follows
            self._event(state.value, reason, inst.service, inst)
            counts: dict[str, int] = {s.value: 0 for s in State}
            for svc in self.services.values():
                for other in svc.every_instance():
                    counts[other.state.value] += 1
            for name, count in counts.items():
                self.metrics.instances.labels(name).set(count)

    def _from_thread(self, function, *args) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(function, *args)

    def _event(self, kind: str, message: str, service: str | None = None, inst: Instance | None = None) -> None:
        try:
            event = self.store.add_event(kind, message, service, inst.id if inst else None)
        except Exception as exc:  # noqa: BLE001 - see _unstored: subscribers still hear it
            self._unstored(exc, "an event")
            event = {"id": None, "at": time.time(), "service": service, "instance": inst.id if inst else None,
                     "kind": kind, "message": message}
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
                if (event["id"] is None or event["id"] > last) and (service is None or event["service"] == service):
                    yield event
        finally:
            self._subscribers.discard(queue)
