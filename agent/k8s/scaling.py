"""`autoscaler` and `cronscaler` as one KEDA ScaledObject (keda.sh/v1alpha1).

Each scale strategy becomes a `prometheus` trigger on berth's own proxy metrics (serving/
metrics.py), summed over the service's pods: KEDA's HPA then asks for ceil(sum / threshold)
pods, EAS's own rule (desired = ceil(current x metric / threshold)). Each cronscaler job is a
`cron` trigger whose window runs from its schedule to the next job's.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from agent.k8s.model import Manifest, Options, Warnings, metadata, object_name
from bootstrap import cron
from bootstrap.spec import ScaleJob, ScaleStrategy, ServiceSpec, SpecError, SpecIssue

# A fixed instant to order cron jobs from, so the same file always renders the same windows.
CRON_REFERENCE = datetime(2026, 1, 5, tzinfo=timezone.utc)  # a Monday, 00:00 UTC
RATE_WINDOW = "1m"  # two Prometheus scrapes at the usual 30 s interval


def pod_selector(spec: ServiceSpec, options: Options) -> str:
    """The service's pods in Prometheus' kubernetes-pods labels (a Deployment's pods are NAME-HASH-XXXXX)."""
    return f'namespace="{options.namespace}",pod=~"{object_name(spec.name)}-[a-z0-9]+-[a-z0-9]{{5}}"'


def query(strategy: ScaleStrategy, spec: ServiceSpec, options: Options) -> str:
    """The PromQL whose value, divided by the threshold, is the pod count the strategy wants."""
    pods = pod_selector(spec, options)
    gauge = strategy.custom_gauge
    if gauge is not None:
        return f"sum({gauge}{{{pods}}})"
    if strategy.metric_name == "qps":
        return f"sum(rate(berth_requests_total{{{pods}}}[{RATE_WINDOW}]))"
    if strategy.metric_name == "concurrency":
        return f"sum(berth_inflight_requests_avg{{{pods}}})"  # time-weighted over each second: bursts count
    if strategy.metric_name == "cpu":
        cores = spec.metadata.cpu
        return f"sum(rate(berth_child_cpu_seconds_total{{{pods}}}[{RATE_WINDOW}])) * 100 / {cores:g}"
    assert strategy.metric_name == "gpu[util]"
    gpus = max(spec.metadata.gpu, 1)
    return f"sum(DCGM_FI_DEV_GPU_UTIL{{{pods}}}) / {gpus}"  # NVIDIA dcgm-exporter's per-GPU percent


def scaled_object(spec: ServiceSpec, options: Options, source: str, warnings: Warnings) -> Manifest | None:
    if spec.autoscaler is None and spec.cronscaler is None:
        return None
    triggers: list[dict[str, Any]] = []
    body: dict[str, Any] = {"scaleTargetRef": {"name": object_name(spec.name)}}
    low, high = spec.metadata.instance, max(spec.metadata.instance, 1)
    scaler = spec.autoscaler
    if scaler is not None:
        low, high = scaler.min, scaler.max
        if low == 0:
            low = 1
            warnings.add(source, "autoscaler.min", "0 rendered as minReplicaCount 1: with no pod there is no metric "
                         "series and nothing holds requests; scaling from zero on Kubernetes needs KEDA's HTTP add-on "
                         "(docs/kubernetes.md)")
        for index, strategy in enumerate(scaler.scale_strategies):
            if strategy.metric_name == "cpu" and spec.metadata.cpu is None:
                raise SpecError([SpecIssue(f"autoscaler.scaleStrategies[{index}].metricName",
                                           "cpu is a percent of metadata.cpu, which is not given; set metadata.cpu")], source)
            triggers.append({"type": "prometheus", "name": _trigger_name(strategy.metric_name), "metadata": {
                "serverAddress": options.prometheus, "query": query(strategy, spec, options),
                "threshold": f"{strategy.threshold:g}"}})
        behavior = scaler.behavior
        body["cooldownPeriod"] = behavior.on_zero.scale_down_grace_period_seconds
        body["advanced"] = {"horizontalPodAutoscalerConfig": {"behavior": {
            "scaleUp": {"stabilizationWindowSeconds": behavior.scale_up.stabilization_window_seconds},
            "scaleDown": {"stabilizationWindowSeconds": behavior.scale_down.stabilization_window_seconds},
        }}}
    if spec.cronscaler is not None:
        cron_triggers, floor = _cron_triggers(spec.cronscaler.scale_jobs, source, warnings)
        triggers.extend(cron_triggers)
        high = max(high, *(job.target_size for job in spec.cronscaler.scale_jobs))
        low = max(low, floor)
        if spec.cronscaler.exclude_dates:
            warnings.add(source, "cronscaler.ExcludeDates", "left out: KEDA's cron trigger has no excluded dates, so the "
                         "jobs also fire on them")
    body["minReplicaCount"] = low
    body["maxReplicaCount"] = max(high, low)
    body["triggers"] = triggers
    return Manifest({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                     "metadata": metadata(object_name(spec.name), options, object_name(spec.name)), "spec": body})


def _trigger_name(metric: str) -> str:
    return metric.replace("[", "-").replace("]", "").replace("_", "-").replace(":", "-").lower()


def _cron_triggers(jobs: list[ScaleJob], source: str, warnings: Warnings) -> tuple[list[dict[str, Any]], int]:
    """One trigger per job, from its firing to the next job's; and a floor for minReplicaCount."""
    if len(jobs) == 1:
        job = jobs[0]
        warnings.add(source, "cronscaler.ScaleJobs[0]", f"a single job holds TargetSize from its first firing on; rendered "
                     f"as minReplicaCount {job.target_size} rather than a cron window")
        return [], job.target_size
    firings = {job.name: cron.next_fire(job.schedule, CRON_REFERENCE, job.time_zone) for job in jobs}
    triggers = []
    for index, job in enumerate(jobs):
        start = firings[job.name]
        following = min((other for other in jobs if other is not job),
                        key=lambda other: (cron.next_fire(other.schedule, start, other.time_zone), other.name))
        if (following.time_zone or "UTC") != (job.time_zone or "UTC"):
            warnings.add(source, f"cronscaler.ScaleJobs[{index}].TimeZone", f"differs from the next job's "
                         f"({following.name}); the window's end is read in this job's zone")
        if len(job.schedule.split()) == 6 and job.schedule.split()[0] not in ("0", "00"):
            warnings.add(source, f"cronscaler.ScaleJobs[{index}].Schedule", "its seconds field is left out: KEDA's cron "
                         "trigger fires on the minute")
        triggers.append({"type": "cron", "name": f"cron-{_trigger_name(job.name)}", "metadata": {
            "timezone": job.time_zone or "Etc/UTC", "start": cron.five_fields(job.schedule),
            "end": cron.five_fields(following.schedule), "desiredReplicas": str(job.target_size)}})
    return triggers, 0
