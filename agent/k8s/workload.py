"""A service's Deployment, the ConfigMap holding its spec, its Service and PodDisruptionBudget.

The container's command is `berth boot -- <command>`, written out even for images whose
ENTRYPOINT is already `berth boot` (Dockerfile.vllm, images/python-inference): Kubernetes'
`command` replaces the ENTRYPOINT, so the same manifest runs on those images and on any other
image with berth installed, exactly as the agent runs them.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from agent.k8s.model import Manifest, Options, Warnings, is_zero, labels, metadata, object_name, quantity_mib
from agent.k8s.secrets import PodSecrets
from agent.k8s.storage import PodStorage
from bootstrap.boot_cli import DEFAULT_STARTUP_TIMEOUT_S
from bootstrap.spec import ADMIN_PORT, PROXY_PORT, Probe, ServiceSpec, is_secret_name

SPEC_KEY = "spec.json"
# A Deployment does not roll when only its ConfigMap changes; the spec's digest on the pod template makes it.
SPEC_HASH = "berth.dev/spec-sha256"
SHM_VOLUME = "dshm"
SERVICE_PORT = 80
STARTUP_PERIOD_S = 10
# berth boot answers /ready 503 from its first second, through prepare, launch and warmup;
# the startup probe must outlast all three. The launch part is the boot's own startup timeout;
# downloads and pip come before it, so they get an allowance of their own.
PREPARE_ALLOWANCE_S = 900  # weights from OSS/S3 or pip: a 15 GB model at the ~120 MB/s KServe sees takes ~2 min; leave room
NO_PREPARE_ALLOWANCE_S = 60


def serving_port(spec: ServiceSpec) -> int:
    """Where clients connect in the pod: the proxy, or the app itself when the proxy is off."""
    return PROXY_PORT if (spec.container.bootstrap and spec.container.proxy) else spec.container.port


def config_map(spec: ServiceSpec, storage: PodStorage, options: Options) -> Manifest:
    """The normalized spec as BERTH_SPEC: no token, no dockerAuth, no secret env value (the pod
    gets those from Secrets, and berth boot applies the spec's env over the pod's), no storage
    that Kubernetes mounts itself (berth boot would mount it a second time)."""
    data = spec.to_json_dict(exclude_secrets=True)
    container = data["containers"][0]
    container["env"] = [var for var in container.get("env", []) if not is_secret_name(var["name"])]
    data["storage"] = [entry for entry in data.get("storage", []) if entry["mount_path"] not in storage.mounted_by_kubernetes]
    return Manifest({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(f"{object_name(spec.name)}-spec", options, object_name(spec.name)),
                     "data": {SPEC_KEY: json.dumps(data, indent=2, sort_keys=True) + "\n"}})


def deployment(spec: ServiceSpec, config: Manifest, storage: PodStorage, secrets: PodSecrets, options: Options, *,
               autoscaled: bool, source: str, warnings: Warnings) -> Manifest:
    meta = spec.metadata
    container: dict[str, Any] = {"name": object_name(spec.name), "image": spec.container.image}
    if spec.container.image_pull_policy:
        container["imagePullPolicy"] = spec.container.image_pull_policy
    argv = spec.container.argv
    if spec.container.bootstrap:
        container["command"] = ["berth", "boot", *(["--", *argv] if argv else [])]
        container["ports"] = [{"name": "http", "containerPort": serving_port(spec)},
                              {"name": "admin", "containerPort": ADMIN_PORT}]
        container.update(_boot_probes(spec))
    else:
        warnings.add(source, "containers[0].bootstrap", "false: rendered without berth boot, so no /ready, warmup, drain "
                     "or proxy; the probes are the spec's own checks")
        if argv:
            container["command"] = argv
        container["ports"] = [{"name": "http", "containerPort": spec.container.port}]
        container.update(_own_probes(spec))
    env = [{"name": "BERTH_SPEC", "valueFrom": {"configMapKeyRef": {"name": f"{object_name(spec.name)}-spec", "key": SPEC_KEY}}},
           *storage.env, *secrets.env]
    container["env"] = env
    if storage.env_from:
        container["envFrom"] = storage.env_from
    volumes = [*storage.volumes, *secrets.volumes]
    mounts = [*storage.mounts, *secrets.mounts]
    if meta.shm_bytes:
        # /dev/shm is a tmpfs whose pages count against the container's memory, so its size is added to the limit.
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": quantity_mib(meta.shm_bytes)}})
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    container["volumeMounts"] = mounts
    resources = _resources(spec, _gpu_limits(spec, options.gpu_share, source, warnings))
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": meta.grace_s, "volumes": volumes}
    if secrets.image_pull_secrets:
        pod["imagePullSecrets"] = secrets.image_pull_secrets
    strategy = meta.rolling_strategy
    surge: int | str = strategy.max_surge
    if is_zero(surge):
        surge = 1  # EAS starts at least one new instance beside the old ones
    body: dict[str, Any] = {
        "selector": {"matchLabels": labels(object_name(spec.name))},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": strategy.max_unavailable}},
        "template": {
            "metadata": {"labels": labels(object_name(spec.name)),
                         "annotations": {**_scrape_annotations(spec), SPEC_HASH: _digest(config.obj["data"][SPEC_KEY])}},
            "spec": pod,
        },
    }
    if not autoscaled:
        body["replicas"] = meta.instance
    return Manifest({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(object_name(spec.name), options, object_name(spec.name)),
                     "spec": body})


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _scrape_annotations(spec: ServiceSpec) -> dict[str, str]:
    if not spec.container.bootstrap:
        return {}
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(ADMIN_PORT), "prometheus.io/path": "/metrics"}


def startup_budget_s(spec: ServiceSpec) -> float:
    """Seconds a pod may take from start to /ready 200: prepare, then the boot's own startup timeout."""
    check = spec.container.startup_check
    launch = DEFAULT_STARTUP_TIMEOUT_S if check is None else check.initial_delay_seconds + check.period_seconds * check.failure_threshold
    prepares = any(entry.object_store is not None for entry in spec.storage) or bool(
        spec.container.prepare.python_requirements or spec.container.prepare.python_requirements_path)
    return launch + (PREPARE_ALLOWANCE_S if prepares else NO_PREPARE_ALLOWANCE_S)


def _boot_probes(spec: ServiceSpec) -> dict[str, Any]:
    def on(path: str, **timing: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "admin"}, "timeoutSeconds": 1, **timing}

    return {
        # /live answers 200 from the first second, so only /ready can hold a start.
        "startupProbe": on("/ready", periodSeconds=STARTUP_PERIOD_S,
                           failureThreshold=math.ceil(startup_budget_s(spec) / STARTUP_PERIOD_S)),
        # Every second: /ready turns 503 at SIGTERM, and 3 misses (3 s, not one slow answer) stay inside
        # berth boot's 5 s drain delay, during which new requests are still served.
        "readinessProbe": on("/ready", periodSeconds=1, failureThreshold=3, successThreshold=1),
        "livenessProbe": on("/live", periodSeconds=10, failureThreshold=3),
    }


def _own_probes(spec: ServiceSpec) -> dict[str, Any]:
    checks = {"startupProbe": spec.container.startup_check, "readinessProbe": spec.container.readiness_check,
              "livenessProbe": spec.container.liveness_check}
    return {kind: _probe(check, spec.container.port) for kind, check in checks.items() if check is not None}


def _probe(check: Probe, port: int) -> dict[str, Any]:
    if check.http_get is not None:
        action: dict[str, Any] = {"httpGet": {"path": check.http_get.path, "port": check.http_get.port or port}}
    elif check.tcp_socket is not None:
        action = {"tcpSocket": {"port": check.tcp_socket.port or port}}
    else:
        assert check.exec is not None
        action = {"exec": {"command": check.exec.argv}}
    return {**action, "initialDelaySeconds": math.ceil(check.initial_delay_seconds), "periodSeconds": math.ceil(check.period_seconds),
            "timeoutSeconds": math.ceil(check.timeout_seconds), "failureThreshold": check.failure_threshold,
            "successThreshold": check.success_threshold}


def _gpu_limits(spec: ServiceSpec, gpu_share: str, source: str, warnings: Warnings) -> dict[str, int]:
    """Extended resources for the GPUs: whole ones, or a share (metadata.gpu_memory, GiB) mapped
    for the cluster's sharing plugin. Kubernetes itself only hands out whole GPUs."""
    meta = spec.metadata
    if meta.gpu_memory_bytes is None:
        return {"nvidia.com/gpu": meta.gpu} if meta.gpu else {}
    if gpu_share == "hami":
        limits = {"nvidia.com/gpu": 1, "nvidia.com/gpumem": math.ceil(meta.gpu_memory_bytes / 2**20)}  # HAMi counts MiB
        if meta.gpu_core_percentage is not None:
            limits["nvidia.com/gpucores"] = meta.gpu_core_percentage
        return limits
    if gpu_share == "ack":
        gib = math.ceil(meta.gpu_memory)  # ACK gpushare books whole GiB
        if gib != meta.gpu_memory:
            warnings.add(source, "metadata.gpu_memory", f"{meta.gpu_memory:g} GiB rounded up to aliyun.com/gpu-mem {gib} (whole GiB)")
        if meta.gpu_core_percentage is not None:
            warnings.add(source, "metadata.gpu_core_percentage", "left out: ACK's aliyun.com/gpu-mem shares memory only")
        return {"aliyun.com/gpu-mem": gib}
    warnings.add(source, "metadata.gpu_memory", f"{meta.gpu_memory:g} GiB of one GPU rendered as a whole nvidia.com/gpu: 1 "
                 "(Kubernetes hands out whole GPUs; --gpu-share hami or ack maps the share for those plugins)")
    return {"nvidia.com/gpu": 1}


def _resources(spec: ServiceSpec, gpu_limits: dict[str, int]) -> dict[str, Any]:
    meta = spec.metadata
    amounts: dict[str, Any] = {}
    if meta.cpu is not None:
        amounts["cpu"] = f"{round(meta.cpu * 1000)}m"
    if meta.memory_bytes is not None:
        amounts["memory"] = quantity_mib(meta.memory_bytes + (meta.shm_bytes or 0))
    disk = spec.features.extra_ephemeral_storage
    if disk is not None:
        amounts["ephemeral-storage"] = str(disk)
    limits = {**amounts, **gpu_limits}  # extended resources: limits only (requests default to them)
    resources: dict[str, Any] = {}
    if amounts:
        resources["requests"] = amounts  # requests = limits: the instance's resources are reserved, as on EAS
    if limits:
        resources["limits"] = limits
    return resources


def service(spec: ServiceSpec, options: Options) -> Manifest:
    ports = [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}]
    if spec.container.bootstrap:
        ports.append({"name": "admin", "port": ADMIN_PORT, "targetPort": "admin", "protocol": "TCP"})
    return Manifest({"apiVersion": "v1", "kind": "Service", "metadata": metadata(object_name(spec.name), options, object_name(spec.name)),
                     "spec": {"type": "ClusterIP", "selector": labels(object_name(spec.name)), "ports": ports}})


def disruption_budget(spec: ServiceSpec, options: Options) -> Manifest:
    """maxUnavailable at least 1, so a node drain is never blocked (a minAvailable would be, at one replica)."""
    unavailable = max(1, spec.metadata.rolling_strategy.unavailable(max(spec.metadata.instance, 1)))
    return Manifest({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                     "metadata": metadata(object_name(spec.name), options, object_name(spec.name)),
                     "spec": {"maxUnavailable": unavailable, "selector": {"matchLabels": labels(object_name(spec.name))}}})
