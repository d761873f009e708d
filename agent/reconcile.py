"""Desired state and the loop that moves each service's instances towards it.

A service's desired state is its spec, its revision and how many instances of that revision
are wanted (every other revision: none); agent/state.py keeps it in SQLite. Deploy, update,
rollback, `berth scale`, the autoscaler, cron jobs and rm only change the desired state and
poke the service's loop; the loop alone starts and stops instances, so an agent killed mid-
rollout or mid-scale resumes from the stored desired state and what the runtime still runs.

One pass (`converge`) does, in order: start the missing slots of the current revision; replace
instances of older revisions under the rolling strategy (`max_surge` new beside the old, an old
one drained only once its replacement is Ready; a new one that fails pauses the rollout, old
ones serving); stop the slots above the desired count (scale-in drains like a rollout: out of
the endpoints first, then SIGTERM, in-flight requests finish). A newer revision cancels the
pass under way and starts over (Kubernetes' rollover). A count change applies during a rollout:
new slots start at once (at the new revision; while the rollout is paused, at the revision that
still serves), slots above the count are not rolled and stop when the pass ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.instance import Instance, Lifecycle, State, cancel
from agent.runtime import ExitInfo
from agent.state import Store
from bootstrap.spec import ServiceSpec

log = logging.getLogger("berth.agent")


@dataclass
class Service:
    spec: ServiceSpec
    revision: str
    created: float
    desired: int  # instances of `revision` wanted
    scaling: dict[str, Any] = field(default_factory=dict)  # stored with `desired`: what decided it (agent/scaling.py)
    instances: dict[int, Instance] = field(default_factory=dict)
    surge: list[Instance] = field(default_factory=list)  # a rollout's new instances, not yet Ready
    deleting: bool = False
    rollout: dict[str, Any] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def every_instance(self) -> list[Instance]:
        return [*self.instances.values(), *self.surge]

    def ready_count(self) -> int:
        return sum(1 for inst in self.instances.values() if inst.ready)

    @property
    def idle(self) -> bool:
        """Scaled to zero and nothing left running: the service's own state, not its instances'."""
        return self.desired == 0 and not self.every_instance()


class Reconciler:
    """One loop per service: actual instances towards the desired state."""

    def __init__(self, lifecycle: Lifecycle, store: Store, event: Callable, rollout_ready_timeout_s: float,
                 host_ports: bool, forget: Callable[[Service], None]) -> None:
        self.lifecycle = lifecycle
        self.store = store
        self._event = event
        self.rollout_ready_timeout_s = rollout_ready_timeout_s
        self.host_ports = host_ports
        self._forget = forget  # drops a deleted service from the agent's table

    def watch(self, svc: Service, *, supersede: bool = False) -> None:
        """Start the service's loop (or, with `supersede`, restart it: a newer revision cancels the pass under way)."""
        previous = svc.task
        if previous is None or supersede:
            svc.task = asyncio.create_task(self._loop(svc, previous if supersede else None))
        svc.changed.set()

    async def _loop(self, svc: Service, superseded: asyncio.Task | None) -> None:
        if superseded is not None:
            await cancel(superseded)
        while True:
            await svc.changed.wait()
            svc.changed.clear()
            try:
                if not await self.converge(svc):
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad pass
                log.exception("service %s: reconcile failed", svc.name)
                self._event("ReconcileFailed", f"{exc}; tried again in 2 s", svc.name, None)
                await asyncio.sleep(2)
                svc.changed.set()

    async def converge(self, svc: Service) -> bool:
        """One pass towards the desired state; False once the service is gone."""
        if svc.deleting:
            await self._delete(svc)
            return False
        revision = svc.revision
        rollout = svc.rollout
        paused = rollout is not None and rollout["state"] == "Paused" and rollout["revision"] == revision
        self._start_missing(svc, paused)
        if not paused and (self._stale(svc) or svc.surge):
            if rollout is None or rollout["revision"] != revision or rollout["state"] != "Progressing":
                rollout = svc.rollout = self.new_rollout(svc)
            if not await self._roll(svc):
                paused = True
        count = svc.desired  # as it is now: it may have changed during the rollout
        extra = sorted((slot for slot in svc.instances if slot >= count), reverse=True)
        await asyncio.gather(*(self.lifecycle.stop(svc.instances[slot]) for slot in extra))
        for slot in extra:
            svc.instances.pop(slot, None)
            self.store.drop_instance(svc.name, slot)
        if rollout is not None and rollout["state"] == "Progressing" and not paused:
            rollout.update(state="Complete", finished=time.time())
            self._event("RolloutComplete", f"every instance on revision {revision} in {time.time() - rollout['started']:.1f} s",
                        svc.name, None)
        return True

    def _start_missing(self, svc: Service, paused: bool) -> list[Instance]:
        """Start each slot below the desired count that has no instance: at the service's revision,
        or, while its rollout is paused (the new revision fails), at the revision that still serves."""
        spec, revision = svc.spec, svc.revision
        if paused and (serving := sorted((inst for inst in svc.instances.values() if inst.revision != revision),
                                         key=lambda inst: not inst.ready)):
            spec, revision = serving[0].spec, serving[0].revision  # a Ready one's, where there is one
        started = [self.new_instance(svc, slot, spec, revision) for slot in range(svc.desired) if slot not in svc.instances]
        for inst in started:
            self.lifecycle.start(inst)
        return started

    @staticmethod
    def _stale(svc: Service) -> list[int]:
        """The slots below the desired count whose instance runs an older revision."""
        return [slot for slot in sorted(svc.instances) if slot < svc.desired and svc.instances[slot].revision != svc.revision]

    def new_instance(self, svc: Service, slot: int, spec: ServiceSpec, revision: str, *, surge: bool = False) -> Instance:
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

    # --- rollouts -----------------------------------------------------------------------------

    def _surge_and_unavailable(self, svc: Service) -> tuple[int, int]:
        strategy = svc.spec.metadata.rolling_strategy
        surge, unavailable = strategy.surge(svc.desired), strategy.unavailable(svc.desired)
        if self.host_ports:
            # Two instances of one service would bind the same app port on the host.
            surge, unavailable = 0, max(1, unavailable)
        return surge, unavailable

    def new_rollout(self, svc: Service) -> dict[str, Any]:
        surge, unavailable = self._surge_and_unavailable(svc)
        return {"state": "Progressing", "revision": svc.revision, "reason": "", "started": time.time(), "finished": None,
                "max_surge": surge, "max_unavailable": unavailable}

    async def _roll(self, svc: Service) -> bool:
        """Replace the stale slots' instances, `surge` new ones beside the old at a time. False when paused.

        A new instance must be Ready before the old one of its slot is drained (SIGTERM: the
        bootstrap stops reporting ready and keeps serving for its drain delay). `max_unavailable`
        old instances may go first. A new instance that fails pauses the rollout, old ones serving
        (those that went first start again). The stale slots are read before each batch, and new
        slots start while a batch comes up: the desired count may change during the rollout. When
        it pauses, those new slots not yet Ready run the revision that serves instead.
        """
        spec, revision = svc.spec, svc.revision
        added: list[Instance] = []  # new slots started during the rollout, at its revision
        await asyncio.gather(*(self._retire_surge(svc, inst) for inst in list(svc.surge)))  # an interrupted rollout's
        while stale := self._stale(svc):
            surge, unavailable = self._surge_and_unavailable(svc)
            batch = stale[:surge + unavailable]
            early = batch[:unavailable]
            await asyncio.gather(*(self.lifecycle.stop(svc.instances[slot]) for slot in early))
            fresh = {slot: self.new_instance(svc, slot, spec, revision, surge=True) for slot in batch}
            for inst in fresh.values():
                self.lifecycle.start(inst)
            failure = await self._ready_or_failed(list(fresh.values()),
                                                  meanwhile=lambda: added.extend(self._start_missing(svc, False)))
            if failure is not None:
                unproven = [inst for inst in added if not inst.ready and svc.instances.get(inst.slot) is inst]
                await asyncio.gather(*(self._retire_surge(svc, inst) for inst in fresh.values()),
                                     *(self.lifecycle.stop(inst) for inst in unproven))
                for inst in unproven:
                    del svc.instances[inst.slot]
                    self.store.drop_instance(svc.name, inst.slot)
                for slot in early:
                    gone = svc.instances[slot]
                    self.lifecycle.start(self.new_instance(svc, slot, gone.spec, gone.revision))
                svc.rollout.update(state="Paused", reason=failure)
                self._start_missing(svc, paused=True)  # the unproven slots, at the revision that serves
                self._event("RolloutPaused", f"{failure}; old instances keep serving; `berth update --rollback "
                                             f"{svc.name}` returns to the previous revision", svc.name, None)
                return False
            for slot, inst in fresh.items():
                old = svc.instances[slot]
                svc.instances[slot] = inst
                svc.surge.remove(inst)
                inst.surge = False
                self.lifecycle.persist(inst)
                if slot not in early:
                    await self.lifecycle.stop(old)
        return True

    async def _retire_surge(self, svc: Service, inst: Instance) -> None:
        await self.lifecycle.stop(inst)
        if inst in svc.surge:
            svc.surge.remove(inst)

    async def _ready_or_failed(self, fresh: list[Instance], meanwhile: Callable[[], None]) -> str | None:
        """Wait until every new instance is Ready (calling `meanwhile` as it polls); the reason of
        the first that fails, else None."""
        deadline = time.monotonic() + self.rollout_ready_timeout_s
        while not all(inst.ready for inst in fresh):
            meanwhile()
            for inst in fresh:
                if inst.state in (State.BACKOFF, State.FAILED, State.EVICTED) or inst.last_exit is not None:
                    tail = inst.last_exit.log_tail[-5:] if inst.last_exit else []
                    return f"new instance {inst.id} (revision {inst.revision}) {inst.state.value}: {inst.reason}" + (
                        "; last log lines: " + " | ".join(tail) if tail else "")
            if time.monotonic() > deadline:
                waiting = next(inst for inst in fresh if not inst.ready)
                return (f"new instance {waiting.id} (revision {waiting.revision}) not Ready within "
                        f"{self.rollout_ready_timeout_s:.0f} s ({waiting.state.value}: {waiting.reason})")
            await asyncio.sleep(0.05)
        return None

    # --- removal ------------------------------------------------------------------------------

    async def _delete(self, svc: Service) -> None:
        await asyncio.gather(*(self.lifecycle.stop(inst) for inst in svc.every_instance()))
        runtime = self.lifecycle.runtime
        # A start that was under way when its task was cancelled may have left a container.
        for handle in await asyncio.to_thread(runtime.list):
            if handle.service == svc.name:
                await asyncio.to_thread(runtime.stop, handle.id, svc.spec.metadata.grace_s)
                await asyncio.to_thread(runtime.remove, handle.id)
        await asyncio.to_thread(runtime.remove_service, svc.name)
        while True:  # the removal's outcome hangs on this write: retried until the state disk has space again
            try:
                self.store.delete_service(svc.name)
                break
            except Exception as exc:  # noqa: BLE001
                self.lifecycle.unstored(exc, f"the removal of {svc.name}")
                await asyncio.sleep(1)
        self._forget(svc)
        self._event("Deleted", "every instance stopped and removed", svc.name, None)
