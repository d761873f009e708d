"""The node: services, their desired state, and the loops that serve it.

The pieces, each its own module:

    supervisor.py  this: the agent's services; deploy, update, rollback, scale, wake and rm as
                   changes of desired state; re-adoption at start; housekeeping; views, events
    reconcile.py   desired state per service and the one loop per service that moves the actual
                   instances towards it (scale up and in, rollouts, removal)
    instance.py    one instance's life: GPUs, pull, start, probe, restart with backoff, stop
    scaling.py     who decides a count: the autoscaler's metrics and decision, cron jobs
    gpus.py, gpu_share.py  GPU inventory and allocation (whole GPUs by UUID, memory shares)
    state.py       SQLite: desired state, revisions, instance records, events
    runtime.py     the interface to Docker or local processes (docker_runtime, process_runtime)

Housekeeping loops run beside the instances: disk-limit eviction, the lost-GPU check, the GPU
share memory watch, image GC and the stray reaper, each at a period from the operator's
configuration; the autoscaler runs every `autoscale_period_s`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent import gpu_share, launch, scaling
from agent.config import AgentConfig
from agent.disk import DiskLimitPolicy
from agent.gpus import GpuAllocator, GpuShare, open_inventory
from agent.instance import Instance, Lifecycle, State, cancel
from agent.reconcile import Reconciler, Service
from agent.revision import revision as revision_of
from agent.routes import Routes
from agent.runtime import LABEL_GPU_MEMORY, LABEL_GPUS, Handle, Runtime
from agent.state import Store, disk_full, disk_full_message
from bootstrap.errors import CommandFailed
from bootstrap.spec import ServiceSpec, SpecError, SpecIssue, parse_spec

log = logging.getLogger("berth.agent")

class Conflict(Exception):
    """The request clashes with what the agent already runs (HTTP 409)."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instances = Gauge("berth_agent_instances", "Instances by state", ["state"], registry=self.registry)
        self.restarts = Counter("berth_agent_restarts", "Instance restarts", ["service"], registry=self.registry)
        self.exits = Counter("berth_agent_exits", "Instance exits by reason", ["reason"], registry=self.registry)
        self.ready_seconds = Histogram("berth_agent_start_to_ready_seconds", "From launch to Ready",
                                       buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900), registry=self.registry)
        self.desired = Gauge("berth_agent_desired_instances", "Instances wanted", ["service"], registry=self.registry)


class Supervisor:
    def __init__(self, config: AgentConfig, runtime: Runtime, store: Store) -> None:
        self.config = config
        self.runtime = runtime
        self.store = store
        self.services: dict[str, Service] = {}
        self.metrics = Metrics()
        self.gpus = GpuAllocator(open_inventory(config.gpu_inventory_file), config.state_dir / "gpu-checkpoint.json")
        self.gpu_watch = gpu_share.MemoryWatch()
        self.host_ports = config.network == "host" or runtime.name == "process"
        self.routes = Routes(self, store)  # the gateway's table; published on every change
        self.lifecycle = Lifecycle(config, runtime, store, self.gpus, self.metrics, self._event, self._state_changed,
                                   self.host_ports, self.routes, self._unstored)
        self.reconciler = Reconciler(self.lifecycle, store, self._event, config.timings.rollout_ready_timeout_s,
                                     self.host_ports, self._forget_service)
        self.autoscaling = scaling.Autoscaling(config.metric_window_s, lambda: list(self.services.values()),
                                               self._scale_decided, self._gpu_util)
        self.autoscaling.gateway_admin = lambda: self.routes.gateway_admin_url
        self._subscribers: set[asyncio.Queue] = set()
        self._closing = False
        self._background: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- start and stop of the agent ----------------------------------------------------------

    async def start(self) -> None:
        self._loop = self.lifecycle.loop = asyncio.get_running_loop()
        self._session = self.lifecycle.session = self.autoscaling.session = aiohttp.ClientSession()
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
                                     (timings.image_gc_period_s, self.collect_images),
                                     (self.config.autoscale_period_s, self.autoscaling.tick)):
            self._spawn(self._every(period, housekeeping))

    async def close(self) -> None:
        """Stop supervising. Instances keep running: a restarted agent re-adopts them."""
        self._closing = True
        tasks = [inst.task for svc in self.services.values() for inst in svc.every_instance() if inst.task]
        tasks += [svc.task for svc in self.services.values() if svc.task]
        await asyncio.gather(*(cancel(task) for task in [*tasks, *self._background]))
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
                log.exception("%s failed; tried again in %g s", getattr(housekeeping, "__qualname__", housekeeping), period)

    def _adopt(self, handles: list[Handle]) -> int:
        """Rebuild services from the stored desired state and attach the runtime's instances to them.

        Every instance of a known service is adopted, whatever its slot: matching revision, as it
        runs, never restarted; an older revision the store still knows (an update under way when
        the agent stopped) keeps its own spec; an unknown revision gets the current one (its life
        replaces it). Then each service's loop resumes towards its desired count and revision:
        missing slots start, older revisions roll, slots above the count are drained. An exited
        one's exit is handled as if just seen. Instances of unknown services: strays (reaper).
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
            desired = scaling.initial_count(spec) if stored.desired is None else stored.desired
            svc = Service(spec, stored.revision, stored.created, desired, stored.scaling, deleting=stored.deleting)
            self.services[svc.name] = svc
            for (service, slot), handle in list(found.items()):
                if service != svc.name or svc.deleting:
                    continue
                del found[(service, slot)]
                own_spec, own_revision = spec, svc.revision
                if handle.revision != svc.revision and (older := self.store.revision_spec(svc.name, handle.revision)):
                    own_spec, own_revision = parse_spec(older).spec, handle.revision
                inst = self.reconciler.new_instance(svc, slot, own_spec, own_revision)
                self.lifecycle.attach(inst, handle)
                if handle.revision == inst.revision:
                    adopted += 1
                    self._adopt_gpus(inst, handle)
                    self._event("Adopted", f"adopted {handle.id[:12]} ({'running' if handle.running else 'exited'})", svc.name, inst)
                self.lifecycle.start(inst)
            self.reconciler.watch(svc)
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

    def _exit_from_thread(self, runtime_id: str) -> None:
        if self._loop is not None and not self._closing:
            self._loop.call_soon_threadsafe(self.lifecycle.on_exit, runtime_id)

    # --- desired state: deploy, update, rollback, scale, wake, delete ---------------------------

    def check(self, spec: ServiceSpec, count: int | None = None) -> None:
        """Raise SpecError (422) for what the operator's policy forbids."""
        ports = {svc.spec.container.port: name for name, svc in self.services.items() if not svc.deleting}
        issues = launch.check_policy(spec, self.config, host_ports=self.host_ports, app_ports_in_use=ports,
                                     gpu_capacity=self.gpu_capacity(), process_runtime=self.runtime.name == "process",
                                     count=count)
        issues += gpu_share.share_issues(spec.metadata, self.gpus.inventory.gpus())
        issues += self.routes.check_service(spec)
        if issues:
            raise SpecError(issues)

    def scaling_warnings(self, spec: ServiceSpec) -> list[SpecIssue]:
        return scaling.deploy_warnings(spec)

    async def deploy(self, spec: ServiceSpec) -> tuple[Service, bool]:
        """Run `spec`; (service, True) when created, (service, False) when already running as asked."""
        self.check(spec)
        revision = revision_of(spec)
        existing = self.services.get(spec.name)
        if existing is not None:
            if existing.deleting:
                raise Conflict(f"service {spec.name!r} is being removed; deploy again once `berth get {spec.name}` says not found")
            if existing.revision == revision and existing.spec == spec:
                return existing, False
            raise Conflict(f"service {spec.name!r} already runs revision {existing.revision}; roll it to this config "
                           f"with `berth update {spec.name} FILE` (or remove it first with `berth rm {spec.name}`)")
        desired = scaling.initial_count(spec)
        self.store.put_service(spec.name, spec.to_json_dict(reveal_secrets=True), revision, desired)
        svc = Service(spec, revision, time.time(), desired)
        self.services[spec.name] = svc
        self.routes.changed()  # the name exists now: the gateway holds its requests until an instance is Ready
        self._event("Deployed", f"revision {revision}, {desired} instance(s), image {spec.container.image}", svc.name)
        self._store_desired(svc)
        self.reconciler.watch(svc)
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
        if revision == svc.revision and spec == svc.spec and not (svc.rollout and svc.rollout["state"] == "Paused"):
            return svc
        previous = svc.revision
        # An autoscaled service keeps its count (within the new bounds); otherwise the spec's count is wanted.
        desired = scaling.initial_count(spec) if spec.autoscaler is None else \
            max(scaling.floor_of(spec.autoscaler, svc.scaling), min(spec.autoscaler.max, svc.desired))
        self.store.put_service(spec.name, spec.to_json_dict(reveal_secrets=True), revision, desired)
        svc.spec, svc.revision, svc.desired = spec, revision, desired
        svc.scaling["manual"] = None
        self._store_desired(svc)
        self._event("Updating", f"revision {previous} -> {revision}, {desired} instance(s), "
                                f"image {spec.container.image}", svc.name)
        svc.rollout = self.reconciler.new_rollout(svc)
        self.reconciler.watch(svc, supersede=True)
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

    async def scale(self, name: str, count: int) -> Service:
        """`berth scale`: the instance count of a service without an autoscaler (until a cron job fires)."""
        svc = self.services.get(name)
        if svc is None:
            raise KeyError(name)
        if svc.deleting:
            raise Conflict(f"service {name!r} is being removed")
        scaler = svc.spec.autoscaler
        if scaler is not None:
            raise Conflict(f"service {name!r} has an autoscaler, which owns its count ({scaler.min}..{scaler.max}); "
                           f"change autoscaler.min/max with `berth update {name} FILE`")
        self.check(svc.spec, count)
        svc.scaling["manual"] = count
        self._scale_decided(svc, count, "berth scale")
        return svc

    async def wake(self, name: str, held: int) -> dict[str, Any]:
        """An idle service (min 0, at zero) back to scaleUpActivationReplicas, for `held` waiting requests."""
        svc = self.services.get(name)
        if svc is None:
            raise KeyError(name)
        scaler = svc.spec.autoscaler
        if svc.deleting or scaler is None or scaler.min > 0:
            raise Conflict(f"service {name!r} does not scale to zero (it needs an autoscaler with min 0); nothing to wake")
        self.autoscaling.note_activity(name)
        began = svc.desired == 0
        if began:
            count = min(scaler.max, scaler.behavior.on_zero.scale_up_activation_replicas)
            svc.scaling["activated_at"] = time.time()
            self._scale_decided(svc, count, f"{held} request(s) held at zero instances", kind="Activated")
        elif svc.ready_count() > 0:
            svc.scaling.pop("activated_at", None)  # that cold start is over
        since = svc.scaling.get("activated_at")
        return {"activated": since is not None, "began": began, "since": since, "desired": svc.desired,
                "ready": svc.ready_count()}

    async def delete(self, name: str) -> Service:
        svc = self.services.get(name)
        if svc is None:
            raise KeyError(name)
        if not svc.deleting:
            self.store.mark_deleting(name)  # first: when the disk is full, nothing has changed
            svc.deleting = True
            self.routes.changed()
            self.reconciler.watch(svc, supersede=True)
        return svc

    def _scale_decided(self, svc: Service, count: int, why: str, kind: str | None = None) -> None:
        """The one way a count changes after deploy: stored, told as an event, then the service's loop acts."""
        before = svc.desired
        if count != before:
            if count == 0:
                svc.scaling.pop("activated_at", None)
            svc.desired = count
            svc.scaling["decision"] = {"at": time.time(), "from": before, "to": count, "why": why}
            self._event(kind or scaling.describe_change(before, count), f"{before} -> {count} instance(s): {why}", svc.name)
        self._store_desired(svc)
        svc.changed.set()

    def _store_desired(self, svc: Service) -> None:
        try:
            self.store.put_desired(svc.name, svc.desired, svc.scaling)
        except Exception as exc:  # noqa: BLE001 - see _unstored: the count still applies in memory
            self._unstored(exc, f"the desired count of {svc.name}")
        self.metrics.desired.labels(svc.name).set(svc.desired)

    def _forget_service(self, svc: Service) -> None:
        """A removed service leaves the table, the gateway's routes and its instances' kept logs."""
        for inst in svc.every_instance():
            self.previous_logs_path(inst).unlink(missing_ok=True)
        self.services.pop(svc.name, None)
        self.routes.changed()

    # --- a full disk under the state directory: supervision goes on, writes wait for space ----

    def _unstored(self, exc: Exception, what: str) -> None:
        """A record that could not be written: logged; the instance it describes is supervised on."""
        if not disk_full(exc):
            raise exc
        log.error("%s not stored: %s", what, disk_full_message(self.config.state_dir))

    def _gpu_util(self) -> dict[str, float]:
        """Each GPU's utilization (percent) by UUID, from the GPU inventory (NVML, or a recorded one)."""
        return {gpu.uuid: gpu.utilization_percent or 0 for gpu in self.gpus.inventory.gpus()}

    def gpu_capacity(self) -> int:
        return len(self.gpus.inventory.gpus())

    def previous_logs_path(self, inst: Instance) -> Path:
        return self.lifecycle.previous_logs_path(inst)

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
        self.lifecycle.set(inst, State.EVICTED, message)
        await self.lifecycle.terminate(inst, self.config.timings.eviction_grace_s)

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
            await self.lifecycle.terminate(inst, inst.spec.metadata.grace_s)

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
            owner = self.lifecycle.by_runtime_id.get(handle.id)
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
        state = "Deleting" if svc.deleting else "Idle" if svc.idle else "Active"
        scaler = svc.spec.autoscaler
        autoscaler = None
        if scaler is not None or svc.spec.cronscaler is not None or svc.scaling.get("manual") is not None:
            metrics = self.autoscaling.of(svc.name).metrics if scaler is not None else []
            autoscaler = {**scaling.summary(svc.scaling, scaler, metrics), "desired": svc.desired,
                          "current": len(svc.instances), "ready": svc.ready_count()}
        return {
            "name": svc.name, "revision": svc.revision, "runtime": self.runtime.name, "created": svc.created,
            "deleting": svc.deleting, "state": state, "image": svc.spec.container.image, "instance": svc.desired,
            "ready": svc.ready_count(),
            # Where to send requests now: every Ready instance, of whichever revision (a rollout serves from both).
            "endpoints": [inst.endpoint for inst in instances if inst.ready and inst.endpoint],
            "rollout": svc.rollout, "autoscaler": autoscaler, "instances": views, "spec": svc.spec.to_json_dict(),
            "gateway_url": f"{self.routes.gateway_url}/api/predict/{svc.name}" if self.routes.gateway_url else None,
        }

    def _state_changed(self) -> None:
        self.routes.changed()  # readiness may have changed: the gateway's table follows
        counts: dict[str, int] = {s.value: 0 for s in State}
        for svc in self.services.values():
            for other in svc.every_instance():
                counts[other.state.value] += 1
        for name, count in counts.items():
            self.metrics.instances.labels(name).set(count)

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
