"""What the renderers share: the options, a rendered object, and the warnings collected on the way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_GATEWAY = "berth"
DEFAULT_PROMETHEUS = "http://prometheus.monitoring.svc:9090"
DEFAULT_NODE_CACHE = Path("/var/cache/berth")
DEFAULT_NAMESPACE = "default"
MANAGED_BY = {"app.kubernetes.io/managed-by": "berth"}


@dataclass(frozen=True)
class Options:
    namespace: str = DEFAULT_NAMESPACE
    gateway: str = DEFAULT_GATEWAY
    prometheus: str = DEFAULT_PROMETHEUS
    node_cache: Path = DEFAULT_NODE_CACHE
    storage_secret: str | None = None  # None: "<service>-storage"
    gpu_share: str = "none"  # none | hami | ack: how metadata.gpu_memory maps (agent/k8s/workload.py)

    def storage_secret_for(self, service: str) -> str:
        return self.storage_secret or f"{service}-storage"


@dataclass(frozen=True)
class Manifest:
    """One Kubernetes object, and a comment to print above it: a note, and an object not to apply
    (the volume a claim expects, which needs credentials berth does not hold)."""

    obj: dict[str, Any]
    comment: str = ""
    commented: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]


@dataclass
class Warnings:
    """What did not map, each as 'FILE: JSON.PATH: what was left out'."""

    items: list[str] = field(default_factory=list)

    def add(self, source: str, path: str, message: str) -> None:
        where = ": ".join(part for part in (source, path) if part)
        self.items.append(f"{where}: {message}" if where else message)


def labels(service: str) -> dict[str, str]:
    """The selector of a service's pods; every object of the service carries it too."""
    return {"app.kubernetes.io/name": service}


def metadata(name: str, options: Options, service: str | None = None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": options.namespace,
                            "labels": {**MANAGED_BY, **(labels(service) if service else {})}}
    meta.update(extra)
    return meta


def quantity_mib(size_bytes: int) -> str:
    """A byte count as Kubernetes writes memory: whole MiB when exact, else bytes."""
    mib = 1024 * 1024
    return f"{size_bytes // mib}Mi" if size_bytes % mib == 0 else str(size_bytes)


def object_name(name: str) -> str:
    """A berth name as a Kubernetes object name (DNS-1123: no '_'). URLs and the cache keep the berth name."""
    return name.replace("_", "-")


def is_zero(value: int | str) -> bool:
    """A count or percentage (maxSurge, maxUnavailable) that allows nothing: 0 or '0%'."""
    return value == 0 or (isinstance(value, str) and float(value.rstrip("%")) == 0)
