"""The system-disk limit (`features["eas.aliyun.com/extra-ephemeral-storage"]`).

Where the engine can enforce it (Docker's `storage_opt size`: overlay2 over xfs mounted with
pquota, btrfs, zfs), the writable layer gets a hard quota; whether it can is found out by
asking the engine, never assumed from the driver's name. Everywhere, as the kubelet does for
ephemeral storage, the agent measures what an instance uses on the node's disk (its writable
layer, its disk-backed `empty_dir` volumes and its logs) every eviction period and evicts
the instance once it is over its limit, with reason `DiskLimitExceeded`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from bootstrap.spec import EXTRA_EPHEMERAL_STORAGE, ServiceSpec
from bootstrap.units import format_bytes, parse_quantity

from agent.logs import log_files

if TYPE_CHECKING:
    import docker

log = logging.getLogger("berth.agent.disk")

DISK_LIMIT_EXCEEDED = "DiskLimitExceeded"
DEFAULT_EVICTION_PERIOD_S = 10.0  # the kubelet's housekeeping interval for ephemeral storage
# Storage drivers that can take `storage_opt size` at all; whether this engine's can is probed.
QUOTA_DRIVERS = ("overlay2", "btrfs", "zfs", "devicemapper", "windowsfilter")


# --- the quota path ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QuotaSupport:
    supported: bool
    reason: str

    def create_options(self, limit_bytes: int | None) -> dict[str, object]:
        """Keyword arguments for `containers.create`: a hard quota where the engine enforces one."""
        if not self.supported or limit_bytes is None:
            return {}
        return {"storage_opt": {"size": str(limit_bytes)}}


def storage_quota_support(client: "docker.DockerClient", image: str) -> QuotaSupport:
    """Whether this engine enforces `storage_opt size`, found by creating (not starting) a container.

    Engines refuse the option at create time where the filesystem cannot enforce it
    (overlay2 needs xfs mounted with pquota), so one create of any local image tells.
    """
    import docker.errors

    info = client.info()
    driver = info.get("Driver", "unknown")
    backing = dict(info.get("DriverStatus") or []).get("Backing Filesystem", "unknown")
    where = f"storage driver {driver} over {backing}"
    if driver not in QUOTA_DRIVERS:
        return QuotaSupport(False, f"{where} has no per-container size quota")
    try:
        probe = client.api.create_container(
            image, ["true"], name=f"berth-quota-probe-{uuid.uuid4().hex[:8]}",
            host_config=client.api.create_host_config(storage_opt={"size": str(1024**3)}),
        )
    except docker.errors.APIError as exc:
        return QuotaSupport(False, f"{where}: the engine refuses storage_opt size ({exc.explanation or exc})")
    client.api.remove_container(probe["Id"], force=True)
    return QuotaSupport(True, f"{where} enforces storage_opt size")


# --- the measured path ------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskUsage:
    """What one instance occupies on the node's disk, in bytes."""

    writable_layer: int
    empty_dirs: Mapping[str, int] = field(default_factory=dict)  # mount path -> bytes
    logs: int = 0
    measured_in_s: float = 0.0

    @property
    def total(self) -> int:
        return self.writable_layer + sum(self.empty_dirs.values()) + self.logs

    def describe(self) -> str:
        parts = [f"writable layer {format_bytes(self.writable_layer)}"]
        parts += [f"empty_dir {path} {format_bytes(size)}" for path, size in self.empty_dirs.items()]
        parts.append(f"logs {format_bytes(self.logs)}")
        return ", ".join(parts)


def measure_instance_disk(
    client: "docker.DockerClient", container_id: str, empty_dir_paths: Sequence[str] = ()
) -> DiskUsage:
    """Measure a container's writable layer (the engine's SizeRw), its empty_dir volumes and its logs.

    `empty_dir_paths` are the mount paths inside the container of its disk-backed empty_dir
    volumes; their host directories are read from the container's mounts, so it does not
    matter whether the agent made them as bind mounts or as Docker volumes.
    """
    started = time.monotonic()
    # The engine walks the writable layer for a listing with size=True (the SDK's inspect
    # cannot ask for it); that works for every storage driver without access to its data root.
    attrs = client.api.inspect_container(container_id)  # raises docker.errors.NotFound for a gone container
    listed = client.api.containers(all=True, size=True, filters={"id": attrs["Id"]})
    sources = {mount["Destination"]: mount.get("Source") for mount in attrs.get("Mounts") or []}
    empty_dirs = {path: directory_usage(Path(sources[path])) for path in empty_dir_paths if sources.get(path)}
    logs = sum(_size(path) for path in log_files(attrs))
    return DiskUsage(
        writable_layer=int(listed[0].get("SizeRw") or 0) if listed else 0,  # removed meanwhile
        empty_dirs=empty_dirs,
        logs=logs,
        measured_in_s=time.monotonic() - started,
    )


def directory_usage(root: Path) -> int:
    """Bytes of disk a directory tree occupies (allocated blocks, each hard-linked file once), like `du -s`."""
    total = 0
    seen: set[tuple[int, int]] = set()
    pending = [root]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue  # removed while walking, or unreadable: count what can be read
        for entry in entries:
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            elif stat.st_nlink > 1:
                if (stat.st_dev, stat.st_ino) in seen:
                    continue
                seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_blocks * 512
    return total


def _size(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


# --- the policy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Eviction:
    reason: str
    message: str


@dataclass(frozen=True)
class DiskLimitPolicy:
    """When an instance must be evicted for its disk use: over its system-disk limit, or an
    empty_dir over its `size_limit` (the kubelet's two ephemeral-storage evictions)."""

    limit_bytes: int | None
    empty_dirs: Mapping[str, int | None] = field(default_factory=dict)  # disk-backed mount path -> size_limit

    @classmethod
    def from_spec(cls, spec: ServiceSpec) -> "DiskLimitPolicy":
        """The spec's system-disk limit and its disk-backed empty_dir volumes (tmpfs ones count as memory)."""
        return cls(
            limit_bytes=spec.features.disk_limit_bytes,
            empty_dirs={
                entry.mount_path: None if entry.empty_dir.size_limit is None else parse_quantity(entry.empty_dir.size_limit)
                for entry in spec.storage
                if entry.empty_dir is not None and not entry.empty_dir.in_memory
            },
        )

    @property
    def enforced(self) -> bool:
        """Whether this instance needs measuring at all."""
        return self.limit_bytes is not None or any(limit is not None for limit in self.empty_dirs.values())

    def check(self, usage: DiskUsage) -> Eviction | None:
        """The eviction due for this usage, or None while the instance is within its limits."""
        if self.limit_bytes is not None and usage.total > self.limit_bytes:
            return Eviction(
                DISK_LIMIT_EXCEEDED,
                f"system disk use {format_bytes(usage.total)} ({usage.describe()}) is over the limit of "
                f"{format_bytes(self.limit_bytes)} (features[\"{EXTRA_EPHEMERAL_STORAGE}\"]) "
                f"by {format_bytes(usage.total - self.limit_bytes)}",
            )
        for path, limit in self.empty_dirs.items():
            used = usage.empty_dirs.get(path, 0)
            if limit is not None and used > limit:
                return Eviction(
                    DISK_LIMIT_EXCEEDED,
                    f"empty_dir {path} uses {format_bytes(used)}, over its size_limit of {format_bytes(limit)} "
                    f"by {format_bytes(used - limit)}",
                )
        return None
