"""Image GC against real images built from the test base image, on the real engine.

GC is scoped to this test's own repository (the policy's `repositories`), so the shared
engine's other images are never candidates.
"""

from __future__ import annotations

import io
import uuid

import docker.errors
import pytest

from agent.imagegc import FilesystemUsage, ImageGc, ImageGcPolicy


@pytest.fixture
def throwaway(docker_client, base_image: str):
    """`build(name)` makes a small image FROM the base under this test's own repository."""
    repository = f"berth-gctest-{uuid.uuid4().hex[:8]}"
    containers = []

    def build(name: str) -> str:
        reference = f"{repository}:{name}"
        dockerfile = f"FROM {base_image}\nLABEL berth.test.gc={reference}\n"
        docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=reference, rm=True)
        return reference

    def use(reference: str, start: bool):
        container = docker_client.containers.create(reference, ["sleep", "300"], name=f"{repository}-{uuid.uuid4().hex[:6]}")
        containers.append(container)
        if start:
            container.start()
        return container

    build.repository = repository
    build.use = use
    yield build
    for container in containers:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass  # the test removed it
    for image in docker_client.images.list(name=repository):
        docker_client.images.remove(image.id, force=True)


def _exists(docker_client, reference: str) -> bool:
    return bool(docker_client.images.list(name=reference))


def test_gc_removes_unused_images_and_never_one_in_use(docker_client, base_image: str, throwaway) -> None:
    unused = [throwaway(f"old-{n}") for n in range(3)]
    created, running, wanted = throwaway("created"), throwaway("running"), throwaway("wanted")
    throwaway.use(created, start=False)
    throwaway.use(running, start=True)
    # Thresholds lowered by configuration so this disk is "full": free everything that may go.
    policy = ImageGcPolicy(high_threshold_percent=1, low_threshold_percent=0, min_age_s=0, repositories=(f"{throwaway.repository}:*",))

    result = ImageGc(docker_client, policy).collect(keep=[wanted, "berth-gctest-never-pulled:1"])

    assert result.bytes_to_free > 0
    assert sorted(ref for image in result.removed for ref in image.references) == sorted(unused)
    assert not any(_exists(docker_client, reference) for reference in unused)
    assert _exists(docker_client, created) and _exists(docker_client, running)
    assert _exists(docker_client, wanted)  # a service in backoff between containers still wants it
    assert _exists(docker_client, base_image)


def test_gc_goes_least_recently_used_first_and_stops_at_the_low_threshold(docker_client, throwaway) -> None:
    first, second, third = (throwaway(name) for name in ("first", "second", "third"))
    held = throwaway("held")
    throwaway.use(held, start=False)
    size = max(docker_client.images.get(ref).attrs["Size"] for ref in (first, second, third))
    # An image filesystem at exactly the high threshold, 1.5 images' worth above the low one.
    reading = FilesystemUsage(capacity_bytes=100 * size, used_bytes=85 * size)
    policy = ImageGcPolicy(high_threshold_percent=85, low_threshold_percent=83.5, min_age_s=0, repositories=(f"{throwaway.repository}:*",))
    gc = ImageGc(docker_client, policy, filesystem_usage=lambda: reading)

    user = throwaway.use(first, start=False)  # the oldest image is the most recently used
    gc.observe()
    user.remove(force=True)

    result = gc.collect()

    assert result.bytes_to_free == pytest.approx(1.5 * size, abs=1)
    assert [image.references for image in result.removed] == [(second,), (third,)]
    assert _exists(docker_client, first) and _exists(docker_client, held)


def test_gc_keeps_images_younger_than_the_minimum_age(docker_client, throwaway) -> None:
    fresh = throwaway("fresh")
    policy = ImageGcPolicy(high_threshold_percent=1, low_threshold_percent=0, min_age_s=3600, repositories=(f"{throwaway.repository}:*",))
    result = ImageGc(docker_client, policy).collect()
    assert result.bytes_to_free > 0 and result.removed == []
    assert _exists(docker_client, fresh)


def test_gc_does_nothing_below_the_high_threshold(docker_client, throwaway) -> None:
    idle = throwaway("idle")
    reading = FilesystemUsage(capacity_bytes=1000, used_bytes=849)
    policy = ImageGcPolicy(min_age_s=0, repositories=(f"{throwaway.repository}:*",))
    result = ImageGc(docker_client, policy, filesystem_usage=lambda: reading).collect()
    assert result.bytes_to_free == 0 and result.removed == []
    assert _exists(docker_client, idle)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"high_threshold_percent": 80, "low_threshold_percent": 85}, "image_gc_low_threshold_percent"),
        ({"high_threshold_percent": 101}, "image_gc_high_threshold_percent"),
        ({"min_age_s": -1}, "image_gc_min_age_s"),
    ],
)
def test_bad_gc_settings_name_the_setting(settings: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ImageGcPolicy(**settings)


def test_scope_patterns_match_every_reference() -> None:
    policy = ImageGcPolicy(repositories=("registry.example.com/*",))
    assert policy.in_scope(["registry.example.com/team/model:1"])
    assert not policy.in_scope(["registry.example.com/team/model:1", "other/model:1"])
    assert not policy.in_scope([])  # untagged images are out of a limited scope
    assert ImageGcPolicy().in_scope([])
