"""Image garbage collection, as the kubelet does it, so a node does not silt up with images.

When the image filesystem (the engine's data root) passes the high threshold (85%), unused
images are removed, least recently used first, until the space freed brings it down to the
low threshold (80%). An image used by any container (running, stopped or only created) is
never removed, nor one unused for less than the minimum age, nor one that another image is
built on (removing it would only drop its tag and free nothing).

When an image was last used is kept in memory, like the kubelet's; an image the agent has
not seen in use counts from when it came to the node (its last tag time), so a restarted
agent does not take every image for brand new.
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from agent.dockertime import docker_time
from bootstrap.units import format_bytes

if TYPE_CHECKING:
    import docker

log = logging.getLogger("berth.agent.imagegc")

DEFAULT_HIGH_THRESHOLD_PERCENT = 85.0  # kubelet imageGCHighThresholdPercent
DEFAULT_LOW_THRESHOLD_PERCENT = 80.0  # kubelet imageGCLowThresholdPercent
DEFAULT_MIN_AGE_S = 120.0  # kubelet imageMinimumGCAge (2 min)
DEFAULT_GC_PERIOD_S = 300.0  # kubelet's image GC period (5 min)


@dataclass(frozen=True)
class ImageGcPolicy:
    high_threshold_percent: float = DEFAULT_HIGH_THRESHOLD_PERCENT
    low_threshold_percent: float = DEFAULT_LOW_THRESHOLD_PERCENT
    min_age_s: float = DEFAULT_MIN_AGE_S
    # Patterns (fnmatch) of the image references GC may remove; empty: every image, as the
    # kubelet. An operator sharing the node with other software can limit GC to its registry.
    repositories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.low_threshold_percent < self.high_threshold_percent <= 100:
            raise ValueError(
                f"image_gc_low_threshold_percent ({self.low_threshold_percent}) must be below "
                f"image_gc_high_threshold_percent ({self.high_threshold_percent}), both within 0-100"
            )
        if self.min_age_s < 0:
            raise ValueError(f"image_gc_min_age_s must be 0 or more, got {self.min_age_s}")

    def in_scope(self, references: Sequence[str]) -> bool:
        if not self.repositories:
            return True
        return bool(references) and all(
            any(fnmatch.fnmatchcase(reference, pattern) for pattern in self.repositories) for reference in references
        )


@dataclass(frozen=True)
class FilesystemUsage:
    capacity_bytes: int
    used_bytes: int  # capacity less what is available, as the kubelet counts it

    @property
    def percent(self) -> float:
        return 100.0 * self.used_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


def image_filesystem_usage(client: "docker.DockerClient") -> FilesystemUsage:
    """The usage of the filesystem that holds the engine's images (its data root)."""
    usage = shutil.disk_usage(client.info()["DockerRootDir"])
    return FilesystemUsage(capacity_bytes=usage.total, used_bytes=usage.total - usage.free)


@dataclass(frozen=True)
class RemovedImage:
    image_id: str
    references: tuple[str, ...]
    size_bytes: int
    unused_for_s: float


@dataclass
class GcResult:
    usage: FilesystemUsage
    bytes_to_free: int = 0
    removed: list[RemovedImage] = field(default_factory=list)
    took_s: float = 0.0

    @property
    def freed_bytes(self) -> int:
        return sum(image.size_bytes for image in self.removed)


@dataclass
class _Seen:
    arrived: float  # when the image came to the node, as far as anyone knows
    last_used: float | None = None

    @property
    def last_active(self) -> float:
        return max(self.arrived, self.last_used or 0.0)


class ImageGc:
    """Call `observe()` as often as convenient (it records which images are in use) and
    `collect()` every GC period; `collect()` observes first."""

    def __init__(
        self,
        client: "docker.DockerClient",
        policy: ImageGcPolicy = ImageGcPolicy(),
        filesystem_usage: Callable[[], FilesystemUsage] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.policy = policy
        self._filesystem_usage = filesystem_usage or (lambda: image_filesystem_usage(client))
        self._clock = clock
        self._seen: dict[str, _Seen] = {}

    def observe(self) -> None:
        now = self._clock()
        images = self.client.api.images()
        for image in images:
            if image["Id"] not in self._seen:
                self._seen[image["Id"]] = _Seen(arrived=min(now, self._arrival(image)))
        for image_id in self._used_image_ids():
            if image_id in self._seen:
                self._seen[image_id].last_used = now
        present = {image["Id"] for image in images}
        for gone in set(self._seen) - present:
            del self._seen[gone]

    def collect(self, keep: Iterable[str] = ()) -> GcResult:
        """Remove unused images when the image filesystem is past the high threshold.

        `keep`: references of images wanted though no container uses them right now (a service
        in backoff between two containers), which a removal would only make pull again.
        """
        started = time.monotonic()
        self.observe()
        usage = self._filesystem_usage()
        result = GcResult(usage=usage)
        if usage.percent < self.policy.high_threshold_percent:
            return result
        result.bytes_to_free = usage.used_bytes - int(usage.capacity_bytes * self.policy.low_threshold_percent / 100)
        log.info(
            "image filesystem %.1f%% used (high threshold %.0f%%): freeing %s to reach %.0f%%",
            usage.percent, self.policy.high_threshold_percent, format_bytes(result.bytes_to_free), self.policy.low_threshold_percent,
        )
        candidates, kept = self._candidates(self._image_ids(keep))
        for image, unused_for in candidates:
            if result.freed_bytes >= result.bytes_to_free:
                break
            removed = self._remove(image, unused_for)
            if removed is not None:
                result.removed.append(removed)
        result.took_s = time.monotonic() - started
        if result.freed_bytes < result.bytes_to_free:
            log.warning(
                "image GC freed %s of the %s needed (%s); the disk stays above %.0f%%",
                format_bytes(result.freed_bytes), format_bytes(result.bytes_to_free), kept, self.policy.low_threshold_percent,
            )
        else:
            log.info("image GC freed %s in %.1f s (%d images)", format_bytes(result.freed_bytes), result.took_s, len(result.removed))
        return result

    def _candidates(self, wanted: set[str]) -> tuple[list[tuple[dict[str, Any], float]], str]:
        """Removable images, least recently active first, and a note on what was kept."""
        now = self._clock()
        in_use = set(self._used_image_ids()) | wanted
        images = self.client.api.images()
        parents = {image["ParentId"] for image in images if image.get("ParentId")}
        candidates, young, used = [], 0, 0
        for image in images:
            if image["Id"] in in_use or image["Id"] in parents:
                used += 1
                continue
            if not self.policy.in_scope(_references(image)):
                continue
            seen = self._seen.get(image["Id"])
            unused_for = now - seen.last_active if seen else 0.0  # arrived since observe()
            if unused_for < self.policy.min_age_s:
                young += 1
                continue
            candidates.append((image, unused_for))
        candidates.sort(key=lambda pair: -pair[1])
        return candidates, f"{used} in use, wanted or a base of another image, {young} unused for less than {self.policy.min_age_s:.0f} s"

    def _remove(self, image: dict[str, Any], unused_for: float) -> RemovedImage | None:
        import docker.errors

        references = _references(image)
        try:
            # Removing each tag removes the image with its last one; an untagged image goes by id.
            for reference in references or [image["Id"]]:
                self.client.api.remove_image(reference)
        except docker.errors.NotFound:
            pass  # removed by someone else meanwhile: the space is free all the same
        except docker.errors.APIError as exc:
            # A container created since the listing holds it (the engine refuses): keep it.
            log.info("image %s kept: %s", ", ".join(references) or image["Id"], exc.explanation or exc)
            return None
        removed = RemovedImage(image["Id"], tuple(references), int(image.get("Size") or 0), unused_for)
        log.info("removed image %s (%s, unused for %.0f s)", ", ".join(references) or image["Id"], format_bytes(removed.size_bytes), unused_for)
        return removed

    def _image_ids(self, references: Iterable[str]) -> set[str]:
        import docker.errors

        ids = set()
        for reference in references:
            try:
                ids.add(self.client.api.inspect_image(reference)["Id"])
            except docker.errors.NotFound:
                continue  # not pulled (yet): nothing to keep
        return ids

    def _used_image_ids(self) -> list[str]:
        return [container["ImageID"] for container in self.client.api.containers(all=True)]

    def _arrival(self, image: dict[str, Any]) -> float:
        stamp = (self.client.api.inspect_image(image["Id"]).get("Metadata") or {}).get("LastTagTime") or ""
        return docker_time(stamp) or float(image.get("Created") or 0)


def _references(image: dict[str, Any]) -> list[str]:
    return [tag for tag in image.get("RepoTags") or [] if tag != "<none>:<none>"]
