"""One instance's life: GPUs, pull, start, probe, restart with backoff, stop.

One asyncio task per instance walks the states (one vocabulary everywhere: API, CLI, events):

    Pending -> Pulling -> Starting -> Ready <-> Unhealthy
                              ^          |
                              |          v  (exit, or liveness failed)
                              +------ BackOff            Failed (permanent error, crash block)
    Stopping -> Stopped (scale-in, rollout, rm)          Evicted (over its disk limit) -> BackOff

Probing follows the kubelet, with one change: while an instance starts, `/ready` is asked every
100 ms (start_probe_period_s) rather than at the probe period, so deploy-to-ready is not padded.
Exits come from the runtime's event stream (Docker's `die` events) within a second.
Restarts: 10 s doubling to 300 s, reset after 10 min healthy (the kubelet's numbers; all settable).

Which instances exist is not decided here (agent/reconcile.py does that); this module only
runs the one it is given, and `terminate` is the single place any instance is sent SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import aiohttp

from agent import coldstart, gpu_share, launch
from agent.config import AgentConfig
from agent.disk import DISK_LIMIT_EXCEEDED
from agent.gpus import GpuAllocator, GpuRequestRefused, GpusPending
from agent.pull import PullError
from agent.runtime import ExitInfo, Handle, LaunchError, Runtime
from agent.state import Store, StoredInstance
from bootstrap.spec import ServiceSpec

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

    @property
    def admin_endpoint(self) -> str | None:
        handle = self.handle
        if self.endpoint is None or handle.admin_port is None:
            return None
        return f"http://{handle.host_ip}:{handle.admin_port}"

    def view(self) -> dict[str, Any]:
        handle = self.handle
        return {
            "id": self.id, "revision": self.revision, "state": self.state.value, "ready": self.ready, "reason": self.reason,
            "restarts": self.restarts, "gpus": self.gpus, "endpoint": self.endpoint, "admin_endpoint": self.admin_endpoint,
            "runtime_id": handle.id if handle else None,
            "last_exit": self.last_exit.as_json() if self.last_exit else None,
            "cold_start": self.cold_start,
        }


async def cancel(task: asyncio.Task) -> None:
    """Cancel `task` and wait until it has ended.

    Cancelled again until done: Python 3.11's wait_for loses a cancellation that arrives as
    the awaited event fires (an adopted instance found exited does exactly that).
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.1)


# (kind, message, service, instance) -> None: the agent's event log
EventSink = Callable[[str, str, "str | None", "Instance | None"], None]


class Lifecycle:
    """Runs instances: each `run(inst)` is one instance's task; `stop` ends one for good."""

    def __init__(self, config: AgentConfig, runtime: Runtime, store: Store, gpus: GpuAllocator, metrics,
                 event: EventSink, on_state: Callable[[], None], host_ports: bool, routes,
                 unstored: Callable[[Exception, str], None]) -> None:
        self.config = config
        self.runtime = runtime
        self.store = store
        self.gpus = gpus
        self.metrics = metrics
        self._event = event
        self._on_state = on_state  # the gateway's table and the instances-by-state gauge follow
        self.host_ports = host_ports
        self.routes = routes  # agent/routes.py: the gateway's table
        self.unstored = unstored  # a write the state disk refused: logged, supervision goes on
        self.session: aiohttp.ClientSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.by_runtime_id: dict[str, Instance] = {}
        self._early_exits: set[str] = set()
        self._gpus_freed = asyncio.Event()  # replaced after each release: Pending instances wait on it
        self.vllm_starts = gpu_share.StartQueue()

    # --- runtime handles and exits ------------------------------------------------------------

    def attach(self, inst: Instance, handle: Handle) -> None:
        inst.handle = handle
        inst.exited.clear()
        self.by_runtime_id[handle.id] = inst
        if not handle.running or handle.id in self._early_exits:
            self._early_exits.discard(handle.id)
            inst.exited.set()

    def on_exit(self, runtime_id: str) -> None:
        inst = self.by_runtime_id.get(runtime_id)
        if inst is None:
            self._early_exits.add(runtime_id)  # died before its start returned; `attach` sees it
        else:
            inst.exited.set()

    def set(self, inst: Instance, state: State, reason: str) -> None:
        changed = inst.state != state
        inst.state, inst.reason = state, reason
        if state not in (State.READY, State.UNHEALTHY):
            inst.ready = False
        if changed:
            self._event(state.value, reason, inst.service, inst)
            self._on_state()

    def persist(self, inst: Instance) -> None:
        if inst.surge:
            return  # a rollout's new instance takes over the slot's record once it is Ready
        try:
            self.store.put_instance(inst.service, inst.slot, StoredInstance(
                inst.restarts, inst.last_exit.as_json() if inst.last_exit else None, inst.gpus))
        except Exception as exc:  # noqa: BLE001 - see the supervisor's _unstored
            self.unstored(exc, f"the record of {inst.id}")

    # --- the one task per instance ------------------------------------------------------------

    def start(self, inst: Instance) -> None:
        inst.task = asyncio.create_task(self.run(inst))

    async def run(self, inst: Instance) -> None:
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
                    self.set(inst, State.FAILED, f"agent error: {exc}")
                    return
                inst.ready = False
                self.set(inst, State.UNHEALTHY, f"agent error: {exc}; supervised again")
                await asyncio.sleep(self.config.timings.backoff_initial_s)

    async def _launch(self, inst: Instance) -> bool:
        """Replace what runs (if anything), pull, start. False when the instance cannot run."""
        spec = inst.spec
        if inst.handle is not None:
            old = inst.handle
            self.set(inst, State.STOPPING, f"replacing revision {old.revision} with {inst.revision}")
            await self.terminate(inst, spec.metadata.grace_s)
            await self._forget(inst)
        gpus = await self._assign_gpus(inst)
        if gpus is None:
            return False
        inst.launched_at, inst.pull_s, inst.cold_start = time.monotonic(), 0.0, None
        container = spec.container
        policy = container.image_pull_policy or self.config.image_pull_policy
        if policy == "Never" and not await asyncio.to_thread(self.runtime.has_image, container.image):
            self.set(inst, State.FAILED, f"ErrImageNeverPull: {container.image} is not on the node and the pull policy is Never")
            return False
        if policy == "Always" or not await asyncio.to_thread(self.runtime.has_image, container.image):
            self.set(inst, State.PULLING, f"image {container.image}")
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
        self.set(inst, State.STARTING, "")
        try:
            request = launch.build_request(spec, inst.revision, inst.slot, self.config, gpus=gpus, host_ports=self.host_ports,
                                           share=share)
            handle = await asyncio.to_thread(self.runtime.start, request)
        except LaunchError as exc:
            if exc.instance_id is not None:  # kept for `docker inspect`; removed with the service
                if (kept := await asyncio.to_thread(self.runtime.inspect, exc.instance_id)) is not None:
                    self.attach(inst, kept)
                    inst.exited.clear()
            return await self._cannot_start(inst, f"{exc.reason}: {exc}", permanent=exc.permanent)
        self.attach(inst, handle)
        self._event("Started", f"{handle.id[:12]} started (revision {inst.revision})", inst.service, inst)
        return True

    def _from_thread(self, function, *args) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(function, *args)

    async def _cannot_start(self, inst: Instance, reason: str, *, permanent: bool) -> bool:
        if permanent:
            self.set(inst, State.FAILED, reason)
            return False
        await self._back_off(inst, reason)
        return True

    # --- GPUs ---------------------------------------------------------------------------------

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
                self.set(inst, State.FAILED, str(exc))
                return None
            except GpusPending as exc:
                freed = self._gpus_freed
                self.set(inst, State.PENDING, str(exc))
                await freed.wait()
                continue
            if list(uuids) != inst.gpus:
                inst.gpus = list(uuids)
                self.persist(inst)
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
            waiting=lambda holder: self.set(inst, State.PENDING, f"waits for the vLLM engine of {holder.split('@')[0]} to "
                                                                 f"start on GPU {uuid} (vLLM engines on one GPU start one at a time)"))

    def release_gpus(self, inst: Instance) -> None:
        if inst.spec.metadata.gpu == 0 and inst.spec.metadata.gpu_memory is None:
            return
        self.gpus.release(inst.gpu_key)
        inst.gpus = []
        freed, self._gpus_freed = self._gpus_freed, asyncio.Event()
        freed.set()

    # --- probing ------------------------------------------------------------------------------

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
            self.set(inst, State.STARTING, "waiting for /ready")
        while not inst.ready:
            if await self._exited_within(inst, timings.start_probe_period_s):
                return await self._exit_info(inst)
            if await self._probe(inst, "/ready", timeout):
                took = time.monotonic() - inst.launched_at if inst.launched_at else None
                if took is not None:
                    self.metrics.ready_seconds.observe(took)
                    await self._record_cold_start(inst, took, timeout)  # before `ready`: clients see both at once
                inst.ready, inst.ready_since = True, time.time()
                self.set(inst, State.READY, f"ready in {took:.2f} s" if took is not None else "ready (adopted)")
        ready_failures = live_failures = 0
        next_live = time.monotonic() + live_period
        while True:
            if await self._exited_within(inst, ready_period):
                return await self._exit_info(inst)
            if await self._probe(inst, "/ready", timeout):
                ready_failures = 0
                if inst.state == State.UNHEALTHY:
                    inst.ready = True
                    self.set(inst, State.READY, "readiness probe succeeded again")
            else:
                ready_failures += 1
                if ready_failures >= ready_threshold and inst.state == State.READY:
                    inst.ready = False
                    self.set(inst, State.UNHEALTHY, f"readiness probe failed {ready_failures} times in a row")
            if container.bootstrap and time.monotonic() >= next_live:
                next_live = time.monotonic() + live_period
                live_failures = 0 if await self._probe(inst, "/live", timeout) else live_failures + 1
                if live_failures >= live_threshold:
                    self._event("LivenessFailed", f"liveness probe failed {live_failures} times; restarting", inst.service, inst)
                    await self.terminate(inst, inst.spec.metadata.grace_s)
                    info = await self._exit_info(inst)
                    info.reason = "LivenessProbeFailed"
                    return info

    async def _record_cold_start(self, inst: Instance, ready_s: float, timeout: float) -> None:
        status = None
        if inst.admin_endpoint is not None:
            status = await coldstart.fetch_boot_status(self.session, inst.admin_endpoint, timeout)
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
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return 200 <= response.status < 400
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError):
            return False

    # --- exits and restarts -------------------------------------------------------------------

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
        if info.message:  # the runtime's or berth boot's own account says more than a log line
            detail += f": {info.message}"
        elif info.log_tail:
            detail += f": {info.log_tail[-1]}"
        self._event("Exited", detail, inst.service, inst)
        if inst.ready_since is not None and info.at - inst.ready_since >= self.config.timings.backoff_reset_s:
            inst.failures_in_row = 0
        inst.ready_since = None
        self.persist(inst)
        if inst.spec.runtime.enable_crash_block:
            final = State.EVICTED if info.reason in (DISK_LIMIT_EXCEEDED, gpu_share.GPU_MEMORY_EXCEEDED) else State.FAILED
            self.set(inst, final, f"{detail}; not restarted (runtime.enable_crash_block)")
            return False
        await self._keep_previous_logs(inst)
        await self._back_off(inst, detail)
        await self._forget(inst)
        return True

    async def _back_off(self, inst: Instance, reason: str) -> None:
        timings = self.config.timings
        delay = min(timings.backoff_initial_s * 2**inst.failures_in_row, timings.backoff_max_s)
        inst.failures_in_row += 1
        self.set(inst, State.BACKOFF, f"{reason}; restarting in {delay:.1f} s")
        await asyncio.sleep(delay)
        inst.restarts += 1
        self.metrics.restarts.labels(inst.service).inc()
        self.persist(inst)

    async def _forget(self, inst: Instance) -> None:
        if inst.handle is not None:
            await asyncio.to_thread(self.runtime.remove, inst.handle.id)
            self.by_runtime_id.pop(inst.handle.id, None)
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

    # --- stopping -----------------------------------------------------------------------------

    async def terminate(self, inst: Instance, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after `grace_s`: the one place the agent stops a running instance
        (scale-in, rollout, rm, liveness restart, eviction, lost GPU), so whatever must happen
        before a SIGTERM (leaving the node's routes) happens here."""
        if inst.handle is not None:
            await self.routes.withdraw(inst)  # drain order: out of the gateway's table before SIGTERM
            await asyncio.to_thread(self.runtime.stop, inst.handle.id, grace_s)

    async def stop(self, inst: Instance) -> None:
        """End an instance for good: its task cancelled, SIGTERM and the grace period, removed, GPUs released."""
        if inst.task is not None and inst.task is not asyncio.current_task():
            await cancel(inst.task)
        grace = inst.spec.metadata.grace_s
        if inst.handle is not None:
            self.set(inst, State.STOPPING, f"SIGTERM, then SIGKILL after {grace} s")
            started = time.monotonic()
            await self.terminate(inst, grace)
            handle = await asyncio.to_thread(self.runtime.inspect, inst.handle.id)
            code = handle.exit.code if handle and handle.exit else None
            runtime_id = inst.handle.id
            await self._forget(inst)
            self.routes.forget(runtime_id)
            self.set(inst, State.STOPPED, f"revision {inst.revision} stopped in {time.monotonic() - started:.1f} s, "
                                          f"exit code {code}")
        else:
            self.set(inst, State.STOPPED, "")
        self.release_gpus(inst)
