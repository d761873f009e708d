"""Who decides a service's instance count: EAS's `autoscaler`, its `cronscaler` jobs, `berth scale`.

Every `autoscale_period_s` (2 s) the agent reads each service's metrics, averages them over
`metric_window_s` (30 s) and decides as EAS and the HPA do:

    wanted = ceil(total of the metric / threshold per instance), the largest over the strategies,
    kept at the Ready count while the ratio is within 10% of 1 (the HPA's tolerance);
    up: the smallest recommendation over the scale-up window; down: the largest over the
    scale-down window; never below `min` (or a cron job's TargetSize) nor above `max`.

`min: 0` goes to zero only after `scaleDownGracePeriodSeconds` without a request; a wake call
(the gateway holding a request for an idle service) brings it to `scaleUpActivationReplicas`.
The decision only changes the desired count (agent/reconcile.py moves the instances).

Metrics: `qps` and `concurrency` from the node gateway's per-service counts when it runs (they
include held requests, so demand shows at zero instances), else summed over the instances'
proxies (berth boot's admin /metrics: request counter, time-weighted in-flight average); `cpu`
from the instance's process tree (berth boot's child CPU seconds) as a percent of its CPU
request (one core when it has none); `gpu[util]` from the GPU inventory for the instance's GPUs;
`custom[NAME]` a gauge of the instance's admin /metrics (the app's own page, re-exported).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bootstrap import cron
from bootstrap.spec import Autoscaler, CronScaler, ScaleJob, ServiceSpec, SpecIssue

TOLERANCE = 0.1  # the HPA's: no change while the metric is within 10% of its target
REQUESTS = "berth_requests_total"
INFLIGHT = "berth_inflight_requests_avg"
CPU_SECONDS = "berth_child_cpu_seconds_total"


# --- reading metrics ------------------------------------------------------------------------------


@dataclass
class Scrape:
    """One instance's admin /metrics at one moment: counters as they are, every gauge by name."""

    at: float
    requests: float = 0.0
    cpu_seconds: float = 0.0
    gauges: dict[str, float] = field(default_factory=dict)


def parse_scrape(text: str, at: float) -> Scrape:
    scrape = Scrape(at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == REQUESTS:
                scrape.requests += sample.value
            elif sample.name == CPU_SECONDS:
                scrape.cpu_seconds += sample.value
            elif family.type in ("gauge", "untyped") and sample.name == family.name:
                scrape.gauges[sample.name] = scrape.gauges.get(sample.name, 0.0) + sample.value  # summed over labels
    return scrape


async def scrape_instance(session: aiohttp.ClientSession, admin_endpoint: str) -> Scrape | None:
    try:
        async with session.get(f"{admin_endpoint}/metrics", timeout=aiohttp.ClientTimeout(total=2)) as response:
            if response.status != 200:
                return None
            return parse_scrape(await response.text(), time.monotonic())
    except (OSError, TimeoutError, aiohttp.ClientError, ValueError):
        return None


@dataclass
class GatewayCounts:
    requests_total: int
    inflight: int  # every client request the gateway has not answered yet, held ones included
    held: int  # of those, the ones waiting for a Ready instance


async def gateway_stats(session: aiohttp.ClientSession, admin_url: str) -> dict[str, GatewayCounts]:
    """The node gateway's per-service counts (`GET /v1/stats` on its admin port; mirror copies excluded)."""
    async with session.get(f"{admin_url}/v1/stats", timeout=aiohttp.ClientTimeout(total=2)) as response:
        response.raise_for_status()
        body = await response.json()
    return {name: GatewayCounts(int(counts["requests_total"]), int(counts["inflight"]), int(counts.get("held", 0)))
            for name, counts in body["services"].items()}


@dataclass
class Sample:
    """One service's metrics at one moment (the totals a decision divides by the thresholds)."""

    at: float
    values: dict[str, float]
    active: bool  # a request arrived or was in flight since the last sample


class MetricWindow:
    """Per-instance counter rates summed into service totals, averaged over `metric_window_s`."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.samples: deque[Sample] = deque()
        self._last: dict[str, Scrape] = {}  # runtime id -> previous scrape, for rates
        self._last_gateway: tuple[float, int] | None = None

    def add(self, at: float, scrapes: dict[str, Scrape], cpu_requests: float, gpu_util: float | None,
            gateway: GatewayCounts | None) -> Sample:
        values: dict[str, float] = {"qps": 0.0, "concurrency": 0.0, "cpu": 0.0}
        active = False
        for runtime_id, scrape in scrapes.items():
            previous = self._last.get(runtime_id)
            if previous is not None and scrape.at > previous.at:
                elapsed = scrape.at - previous.at
                served = max(0.0, scrape.requests - previous.requests)
                values["qps"] += served / elapsed
                values["cpu"] += 100 * max(0.0, scrape.cpu_seconds - previous.cpu_seconds) / elapsed / cpu_requests
                active = active or served > 0
            inflight = scrape.gauges.get(INFLIGHT, 0.0)
            values["concurrency"] += inflight
            active = active or inflight > 0
            for name, value in scrape.gauges.items():
                values[f"custom[{name}]"] = values.get(f"custom[{name}]", 0.0) + value
        self._last = scrapes
        if gateway is not None:  # the gateway sees every request, held ones too: it replaces the proxies' sum
            values["concurrency"] = float(gateway.inflight)
            if self._last_gateway is not None and at > self._last_gateway[0]:
                served = max(0, gateway.requests_total - self._last_gateway[1])
                values["qps"] = served / (at - self._last_gateway[0])
                active = served > 0
            active = active or gateway.inflight > 0
            self._last_gateway = (at, gateway.requests_total)
        if gpu_util is not None:
            values["gpu[util]"] = gpu_util
        sample = Sample(at, values, active)
        self.samples.append(sample)
        while self.samples and self.samples[0].at < at - self.window_s:
            self.samples.popleft()
        return sample

    def average(self, metric: str) -> float | None:
        seen = [sample.values[metric] for sample in self.samples if metric in sample.values]
        return sum(seen) / len(seen) if seen else None


# --- deciding -------------------------------------------------------------------------------------


@dataclass
class Recommendation:
    count: int
    why: str
    metrics: list[dict[str, Any]]


def recommend(scaler: Autoscaler, averages: dict[str, float | None], ready: int) -> Recommendation | None:
    """The count each strategy asks for, the largest winning; None when no metric has a value yet."""
    best: tuple[int, str] | None = None
    views = []
    for strategy in scaler.scale_strategies:
        name, threshold = strategy.metric_name, strategy.threshold
        value = averages.get(name)
        if value is None:
            views.append({"metric": name, "threshold": threshold, "value": None, "wants": None})
            continue
        ratio = value / threshold
        wants = ready if ready and abs(ratio / ready - 1) <= TOLERANCE else math.ceil(ratio - 1e-9)
        views.append({"metric": name, "threshold": threshold, "value": round(value, 3), "wants": wants})
        if best is None or wants > best[0]:
            best = (wants, f"{name} {value:.1f} against {threshold:g} per instance wants {wants}")
    return None if best is None else Recommendation(best[0], best[1], views)


class Stabilizer:
    """The HPA's stabilization windows: up to the smallest recommendation of the up window,
    down to the largest of the down window."""

    def __init__(self) -> None:
        self.history: deque[tuple[float, int]] = deque()

    def decide(self, at: float, recommended: int, current: int, up_window_s: float, down_window_s: float) -> int:
        self.history.append((at, recommended))
        while self.history and self.history[0][0] < at - max(up_window_s, down_window_s):
            self.history.popleft()
        if recommended > current:
            return max(current, min(count for t, count in self.history if t >= at - up_window_s))
        if recommended < current:
            return min(current, max(count for t, count in self.history if t >= at - down_window_s))
        return current


# --- scheduled jobs -------------------------------------------------------------------------------


def excluded(scaler: CronScaler, fire: datetime, time_zone: str | None) -> bool:
    """Whether `fire` falls on a day an ExcludeDates expression names (it fires at some time that day)."""
    local = fire.astimezone(cron.zone(time_zone))
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return any(cron.next_fire(rule, day - timedelta(seconds=1), time_zone) < day + timedelta(days=1)
               for rule in scaler.exclude_dates)


def fired_job(scaler: CronScaler, since: float, now: float) -> tuple[ScaleJob, float] | None:
    """The job that fired last in (since, now], not on an excluded day, with when it fired."""
    latest: tuple[ScaleJob, float] | None = None
    now_dt = datetime.fromtimestamp(now, timezone.utc)
    for job in scaler.scale_jobs:
        fire = cron.last_fire(job.schedule, now_dt, job.time_zone)
        # at the schedule's resolution: last_fire answers `now` itself within a matching minute (or second)
        fire = fire.replace(microsecond=0) if len(job.schedule.split()) == 6 else fire.replace(second=0, microsecond=0)
        at = fire.timestamp()
        if since < at <= now and not excluded(scaler, fire, job.time_zone) and (latest is None or at > latest[1]):
            latest = (job, at)
    return latest


def deploy_warnings(spec: ServiceSpec) -> list[SpecIssue]:
    """What the agent changes of the asked scaling, said at deploy."""
    warnings = []
    if spec.autoscaler and not spec.container.bootstrap:
        names = [s.metric_name for s in spec.autoscaler.scale_strategies if s.metric_name != "gpu[util]"]
        if names:
            warnings.append(SpecIssue("autoscaler.scaleStrategies",
                                      f"{', '.join(names)} come from berth boot's admin port, and containers[0].bootstrap "
                                      "is off: without a gateway they read nothing and the count stays"))
    if spec.cronscaler and spec.autoscaler:
        for index, job in enumerate(spec.cronscaler.scale_jobs):
            if job.target_size > spec.autoscaler.max:
                warnings.append(SpecIssue(f"cronscaler.ScaleJobs[{index}].TargetSize",
                                          f"{job.target_size} is above autoscaler.max ({spec.autoscaler.max}); "
                                          f"clamped to {spec.autoscaler.max}"))
    return warnings


def floor_of(scaler: Autoscaler, scaling: dict[str, Any]) -> int:
    """The fewest instances now: `min`, or the TargetSize of the cron job that fired last."""
    job = scaling.get("cron")
    return min(scaler.max, job["target"]) if job else scaler.min


def initial_count(spec: ServiceSpec) -> int:
    scaler = spec.autoscaler
    count = spec.metadata.instance
    return count if scaler is None else max(scaler.min, min(scaler.max, count))


def describe_change(before: int, after: int) -> str:
    return "ScaledToZero" if after == 0 else ("ScaledUp" if after > before else "ScaledDown")


def summary(scaling: dict[str, Any], scaler: Autoscaler | None, metrics: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The `autoscaler` part of a service's view."""
    view: dict[str, Any] = {"decision": scaling.get("decision"), "cron": scaling.get("cron"), "manual": scaling.get("manual")}
    if scaler is not None:
        view.update(min=scaler.min, max=scaler.max, floor=floor_of(scaler, scaling), metrics=list(metrics))
    return view


# --- the loop -------------------------------------------------------------------------------------


@dataclass
class ServiceScaling:
    """What the loop remembers of one service between periods (not stored: rebuilt after a restart)."""

    window: MetricWindow
    stabilizer: Stabilizer = field(default_factory=Stabilizer)
    last_active: float = field(default_factory=time.monotonic)
    metrics: list[dict[str, Any]] = field(default_factory=list)


class Autoscaling:
    """Each period: fire due cron jobs, then decide each autoscaled service's count.

    `set_desired(svc, count, why)` is the agent's one way to change a count; `services()` lists
    the services to look at; `gpu_util()` reads each GPU's utilization by UUID.
    """

    def __init__(self, window_s: float, services, set_desired, gpu_util) -> None:
        self.window_s = window_s
        self._services = services
        self._set_desired = set_desired
        self._gpu_util = gpu_util
        self.gateway_admin: Callable[[], str | None] = lambda: None  # the node gateway's admin URL, where one runs
        self.session: aiohttp.ClientSession | None = None
        self.state: dict[str, ServiceScaling] = {}

    def of(self, name: str) -> ServiceScaling:
        if name not in self.state:
            self.state[name] = ServiceScaling(MetricWindow(self.window_s))
        return self.state[name]

    def note_activity(self, name: str) -> None:
        """A request is waiting (a wake call): the scale-to-zero grace period starts over."""
        self.of(name).last_active = time.monotonic()

    async def tick(self) -> None:
        services = [svc for svc in self._services() if not svc.deleting]
        for name in set(self.state) - {svc.name for svc in services}:
            del self.state[name]
        gateway, admin = None, self.gateway_admin()
        if admin and any(svc.spec.autoscaler for svc in services):  # qps and concurrency from the gateway's own counts
            gateway = await gateway_stats(self.session, admin)
        for svc in services:
            if svc.spec.cronscaler is not None:
                self._fire_cron(svc)
            if svc.spec.autoscaler is not None:
                await self._decide(svc, None if gateway is None else gateway.get(svc.name, GatewayCounts(0, 0, 0)))

    def _fire_cron(self, svc) -> None:
        now = time.time()
        checked = svc.scaling.setdefault("cron_checked", now)
        fired = fired_job(svc.spec.cronscaler, checked, now)
        svc.scaling["cron_checked"] = now
        if fired is None:
            return
        job, at = fired
        svc.scaling["cron"] = {"job": job.name, "target": job.target_size, "at": at}
        if svc.spec.autoscaler is None:
            svc.scaling["manual"] = None  # a job overrides `berth scale` until the next one
            self._set_desired(svc, job.target_size, f"cron job {job.name!r} ({job.schedule}) sets {job.target_size}")
        else:  # the job moves the autoscaler's floor; the decision below applies it
            self._set_desired(svc, svc.desired, f"cron job {job.name!r} sets min {floor_of(svc.spec.autoscaler, svc.scaling)}")

    async def _decide(self, svc, gateway: GatewayCounts | None) -> None:
        scaler = svc.spec.autoscaler
        state = self.of(svc.name)
        ready = [inst for inst in svc.instances.values() if inst.ready and inst.admin_endpoint]
        ids = [inst.handle.id for inst in ready]  # taken now: an instance may stop during the scrape
        found = await asyncio.gather(*(scrape_instance(self.session, inst.admin_endpoint) for inst in ready))
        scrapes = {runtime_id: scrape for runtime_id, scrape in zip(ids, found) if scrape is not None}
        gpu = None
        if any(strategy.metric_name == "gpu[util]" for strategy in scaler.scale_strategies) and ready:
            by_uuid = await asyncio.to_thread(self._gpu_util)  # NVML: read once per period, in a thread
            gpu = sum(sum(by_uuid.get(uuid, 0) for uuid in inst.gpus) / len(inst.gpus) for inst in ready if inst.gpus)
        now = time.monotonic()
        sample = state.window.add(now, scrapes, svc.spec.metadata.cpu or 1.0, gpu, gateway)
        if sample.active:
            state.last_active = now
        if svc.scaling.get("activated_at") is not None:  # woken from zero: the grace period starts once it serves
            state.last_active = now
            if ready:
                svc.scaling.pop("activated_at")
        averages = {strategy.metric_name: state.window.average(strategy.metric_name) for strategy in scaler.scale_strategies}
        current = svc.desired
        recommendation = recommend(scaler, averages, len(ready))
        behavior = scaler.behavior
        if recommendation is None:
            wanted, why = current, "no metric yet"
        else:
            state.metrics = recommendation.metrics
            wanted = state.stabilizer.decide(now, recommendation.count, current, behavior.scale_up.stabilization_window_seconds,
                                             behavior.scale_down.stabilization_window_seconds)
            why = recommendation.why
            if wanted != recommendation.count:
                why += f"; {wanted} over the scale-{'up' if recommendation.count > current else 'down'} window"
        floor = floor_of(scaler, svc.scaling)
        grace = behavior.on_zero.scale_down_grace_period_seconds
        if floor == 0 and now - state.last_active < grace and (current > 0 or sample.active):
            floor = 1  # scale to zero only after the grace period without a request
        if floor == 0 and wanted == 0:
            why = f"no request for {grace} s (scaleDownGracePeriodSeconds)"
        count = max(floor, min(scaler.max, wanted))
        if count != wanted:
            why += f"; held at {'min' if count > wanted else 'max'} {count}"
        if count != current:
            self._set_desired(svc, count, why)
