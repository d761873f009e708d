"""berth's own checks of rendered objects: what JSON schemas cannot see.

Schemas check each object's structure; these check meaning across fields and objects. The
renderer runs them on everything it writes, so a mistake in berth stops the command rather
than reaching a cluster. Each returns problems as 'Kind/name: what is wrong'.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

from agent.k8s.model import Manifest, is_zero
from bootstrap import units

MIN_SECRET_LENGTH = 4  # shorter values ("1", "on") occur everywhere by chance


def _where(manifest: Manifest) -> str:
    return f"{manifest.kind}/{manifest.name}"


def _pod_templates(manifests: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for manifest in manifests:
        if manifest.kind == "Deployment":
            yield manifest, manifest.obj["spec"]["template"]


def selector_matches_template(manifests: list[Manifest]) -> list[str]:
    problems = []
    templates = {m.name: t["metadata"].get("labels", {}) for m, t in _pod_templates(manifests)}
    for manifest, template in _pod_templates(manifests):
        wanted = manifest.obj["spec"]["selector"].get("matchLabels", {})
        if not wanted or any(template["metadata"].get("labels", {}).get(k) != v for k, v in wanted.items()):
            problems.append(f"{_where(manifest)}: spec.selector {wanted} does not match the pod template's labels")
    for manifest in manifests:
        if manifest.kind not in ("Service", "PodDisruptionBudget") or manifest.name not in templates:
            continue
        selector = manifest.obj["spec"]["selector"]
        selector = selector.get("matchLabels", {}) if manifest.kind == "PodDisruptionBudget" else selector
        pod_labels = templates[manifest.name]
        if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{_where(manifest)}: selector {selector} selects none of Deployment/{manifest.name}'s pods")
    return problems


def probe_ports_exist(manifests: list[Manifest]) -> list[str]:
    problems = []
    for manifest, template in _pod_templates(manifests):
        for container in template["spec"]["containers"]:
            ports = container.get("ports", [])
            known = {p.get("name") for p in ports} | {p["containerPort"] for p in ports}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                action = container.get(kind, {}).get("httpGet") or container.get(kind, {}).get("tcpSocket")
                if action is not None and action["port"] not in known:
                    problems.append(f"{_where(manifest)}: {kind} port {action['port']!r} is none of the container's ports")
    return problems


def rollout_can_progress(manifests: list[Manifest]) -> list[str]:
    problems = []
    for manifest in manifests:
        if manifest.kind != "Deployment":
            continue
        rolling = manifest.obj["spec"].get("strategy", {}).get("rollingUpdate", {})
        if is_zero(rolling.get("maxSurge", "25%")) and is_zero(rolling.get("maxUnavailable", "25%")):
            problems.append(f"{_where(manifest)}: maxSurge and maxUnavailable are both 0, so a rollout can never start")
    return problems


def gpus_whole_in_limits(manifests: list[Manifest]) -> list[str]:
    problems = []
    for manifest, template in _pod_templates(manifests):
        for container in template["spec"]["containers"]:
            resources = container.get("resources", {})
            if "nvidia.com/gpu" in resources.get("requests", {}):
                problems.append(f"{_where(manifest)}: nvidia.com/gpu belongs in limits only (requests follow them)")
            gpus = resources.get("limits", {}).get("nvidia.com/gpu")
            if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1):
                problems.append(f"{_where(manifest)}: nvidia.com/gpu limit {gpus!r} is not a whole number of GPUs")
    return problems


def shm_counted_in_memory(manifests: list[Manifest]) -> list[str]:
    problems = []
    for manifest, template in _pod_templates(manifests):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for container in template["spec"]["containers"]:
            limit = container.get("resources", {}).get("limits", {}).get("memory")
            for mount in container.get("volumeMounts", []):
                empty = volumes.get(mount["name"], {}).get("emptyDir")
                if mount["mountPath"] != "/dev/shm" or not empty or empty.get("medium") != "Memory" or limit is None:
                    continue
                shm = units.parse_quantity(empty.get("sizeLimit", limit))
                if units.parse_quantity(limit) <= shm:
                    problems.append(f"{_where(manifest)}: memory limit {limit} does not leave room beside /dev/shm "
                                    f"({empty.get('sizeLimit')}); tmpfs pages count as the container's memory")
    return problems


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _secret_values(secret: dict[str, Any]) -> Iterator[str]:
    for key, value in secret.get("stringData", {}).items():
        if key == ".dockerconfigjson":
            for entry in json.loads(value).get("auths", {}).values():
                yield from (entry.get(k, "") for k in ("auth", "password"))
        else:
            yield value


def secrets_only_in_secrets(manifests: list[Manifest]) -> list[str]:
    secrets = {value for m in manifests if m.kind == "Secret" for value in _secret_values(m.obj)
               if len(value) >= MIN_SECRET_LENGTH}
    problems = []
    for manifest in manifests:
        if manifest.kind == "Secret":
            continue
        text = [*_strings(manifest.obj), *_strings(manifest.commented), manifest.comment]
        if any(secret in piece for piece in text for secret in secrets):
            problems.append(f"{_where(manifest)}: holds a secret value; only a Secret may")
    return problems


def _mirrors(manifests: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for manifest in manifests:
        if manifest.kind == "HTTPRoute":
            for rule in manifest.obj["spec"].get("rules", []):
                for filter_ in rule.get("filters", []):
                    if filter_.get("type") == "RequestMirror":
                        yield manifest, filter_.get("requestMirror", {})


def mirror_percent_in_range(manifests: list[Manifest]) -> list[str]:
    return [f"{_where(m)}: RequestMirror percent {mirror['percent']} is not between 0 and 100"
            for m, mirror in _mirrors(manifests) if "percent" in mirror and not 0 <= mirror["percent"] <= 100]


def mirror_percent_or_fraction(manifests: list[Manifest]) -> list[str]:
    return [f"{_where(m)}: RequestMirror gives both percent and fraction; give one"
            for m, mirror in _mirrors(manifests) if "percent" in mirror and "fraction" in mirror]


def names_unique(manifests: list[Manifest]) -> list[str]:
    seen: set[tuple[str, str, str]] = set()
    problems = []
    for manifest in manifests:
        key = (manifest.kind, manifest.obj["metadata"].get("namespace", ""), manifest.name)
        if key in seen:
            problems.append(f"{_where(manifest)}: rendered twice (a service and a group, or two files, share the name)")
        seen.add(key)
    return problems


CHECKS: tuple[Callable[[list[Manifest]], list[str]], ...] = (
    selector_matches_template, probe_ports_exist, rollout_can_progress, gpus_whole_in_limits, shm_counted_in_memory,
    secrets_only_in_secrets, mirror_percent_in_range, mirror_percent_or_fraction, names_unique,
)


def check_all(manifests: list[Manifest]) -> list[str]:
    return [problem for check in CHECKS for problem in check(manifests)]
