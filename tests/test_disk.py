"""The system-disk limit: quota detection on the real engine, and the measured path with eviction."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from docker.types import Mount

from agent.disk import (
    DISK_LIMIT_EXCEEDED,
    DiskLimitPolicy,
    DiskUsage,
    QuotaSupport,
    directory_usage,
    measure_instance_disk,
    storage_quota_support,
)
from bootstrap.spec import parse_spec
from bootstrap.units import MIB
from tests.harness.parts import wait_until

LAYER_MIB = 24
SCRATCH_MIB = 8
VOLUME_MIB = 4


@pytest.fixture
def containers(docker_client):
    """Run containers for a test; each is removed afterwards."""
    made = []

    def run(image: str, command: list[str], **kwargs):
        container = docker_client.containers.run(
            image, command, name=f"berth-test-disk-{uuid.uuid4().hex[:8]}", detach=True, **kwargs
        )
        made.append(container)
        return container

    yield run
    for container in made:
        container.remove(force=True)


@pytest.fixture(scope="module")
def filled(docker_client, base_image: str, tmp_path_factory: pytest.TempPathFactory):
    """A running container that wrote LAYER_MIB into its writable layer, SCRATCH_MIB and
    VOLUME_MIB into two empty_dirs (a host directory bound at /scratch, an anonymous Docker
    volume at /volume, the agent's way) and a few log lines."""
    scratch = tmp_path_factory.mktemp("empty-dir")
    script = (
        f"dd if=/dev/urandom of=/fill bs=1M count={LAYER_MIB} status=none && "
        f"dd if=/dev/urandom of=/scratch/fill bs=1M count={SCRATCH_MIB} status=none && "
        f"dd if=/dev/urandom of=/volume/fill bs=1M count={VOLUME_MIB} status=none && "
        "seq 1 2000 && touch /done && exec sleep 300"
    )
    container = docker_client.containers.run(
        base_image, ["sh", "-c", script], name=f"berth-test-disk-{uuid.uuid4().hex[:8]}", detach=True,
        mounts=[Mount("/scratch", str(scratch), type="bind"), Mount("/volume", None, type="volume")],
    )
    try:
        wait_until(lambda: container.exec_run(["test", "-f", "/done"]).exit_code == 0, 60, "the container's writes")
        yield container
    finally:
        container.remove(v=True, force=True)


def test_the_quota_path_is_detected_by_asking_the_engine(docker_client, base_image: str) -> None:
    support = storage_quota_support(docker_client, base_image)
    info = docker_client.info()
    driver = info["Driver"]
    backing = dict(info.get("DriverStatus") or []).get("Backing Filesystem", "unknown")
    assert driver in support.reason
    if driver == "overlay2" and backing != "xfs":
        assert not support.supported
        assert "xfs" in support.reason  # the engine's own words: overlay over xfs with 'pquota'
    assert not docker_client.containers.list(all=True, filters={"name": "berth-quota-probe-"})  # the probe is gone
    assert support.create_options(MIB) == ({"storage_opt": {"size": str(MIB)}} if support.supported else {})
    assert QuotaSupport(True, "").create_options(None) == {}


@pytest.mark.xfs_quota
def test_the_engine_enforces_the_quota_where_supported(docker_client, base_image: str, containers) -> None:
    support = storage_quota_support(docker_client, base_image)
    assert support.supported, support.reason
    container = containers(
        base_image, ["sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=64 2>&1; sleep 300"],
        **support.create_options(32 * MIB),
    )
    wait_until(lambda: b"No space left" in container.logs(), 60, "dd hitting the quota")


def test_measuring_sees_the_writable_layer_the_empty_dir_and_the_logs(docker_client, filled) -> None:
    usage = measure_instance_disk(docker_client, filled.id, ["/scratch", "/volume", "/not-mounted"])
    assert LAYER_MIB * MIB <= usage.writable_layer < (LAYER_MIB + 2) * MIB
    assert SCRATCH_MIB * MIB <= usage.empty_dirs["/scratch"] < (SCRATCH_MIB + 1) * MIB
    assert VOLUME_MIB * MIB <= usage.empty_dirs["/volume"] < (VOLUME_MIB + 1) * MIB
    assert "/not-mounted" not in usage.empty_dirs
    assert usage.logs > 0  # 2000 lines of seq in the json-file log
    assert usage.total == usage.writable_layer + sum(usage.empty_dirs.values()) + usage.logs
    assert "writable layer 24.0 MiB" in usage.describe()


def test_the_policy_evicts_over_the_limit_and_not_under(docker_client, filled) -> None:
    usage = measure_instance_disk(docker_client, filled.id, ["/scratch"])
    eviction = DiskLimitPolicy(limit_bytes=16 * MIB).check(usage)
    assert eviction is not None
    assert eviction.reason == DISK_LIMIT_EXCEEDED == "DiskLimitExceeded"
    assert "over the limit of 16.0 MiB" in eviction.message
    assert "extra-ephemeral-storage" in eviction.message
    over = usage.total - 16 * MIB
    assert f"by {over / MIB:.1f} MiB" in eviction.message

    assert DiskLimitPolicy(limit_bytes=64 * MIB, empty_dirs={"/scratch": None}).check(usage) is None
    by_volume = DiskLimitPolicy(limit_bytes=None, empty_dirs={"/scratch": 4 * MIB}).check(usage)
    assert by_volume is not None and by_volume.reason == DISK_LIMIT_EXCEEDED
    assert "empty_dir /scratch uses 8.0 MiB, over its size_limit of 4.0 MiB" in by_volume.message


def test_growth_after_a_measurement_is_seen_by_the_next(docker_client, base_image: str, containers) -> None:
    container = containers(base_image, ["sh", "-c", "sleep 300"])
    policy = DiskLimitPolicy(limit_bytes=8 * MIB)
    assert policy.check(measure_instance_disk(docker_client, container.id)) is None
    container.exec_run(["dd", "if=/dev/urandom", "of=/grow", "bs=1M", "count=10", "status=none"])
    eviction = policy.check(measure_instance_disk(docker_client, container.id))
    assert eviction is not None and "over the limit of 8.0 MiB" in eviction.message


def test_the_policy_comes_from_the_spec() -> None:
    spec = parse_spec(
        {
            "metadata": {"name": "disky", "instance": 1},
            "containers": [{"image": "example:1", "command": "python app.py", "port": 8000}],
            "features": {"eas.aliyun.com/extra-ephemeral-storage": "20Gi"},
            "storage": [
                {"mount_path": "/scratch", "empty_dir": {"size_limit": "1Gi"}},
                {"mount_path": "/cache", "empty_dir": {}},
                {"mount_path": "/mnt/ram", "empty_dir": {"medium": "memory", "size_limit": "1Gi"}},
            ],
        }
    ).spec
    policy = DiskLimitPolicy.from_spec(spec)
    assert policy.limit_bytes == 20 * 1024**3
    assert policy.empty_dirs == {"/scratch": 1024**3, "/cache": None}  # tmpfs counts as memory, not disk
    assert policy.enforced
    unlimited = parse_spec({"metadata": {"name": "free", "instance": 1}, "containers": [{"image": "example:1", "command": "x"}]})
    assert not DiskLimitPolicy.from_spec(unlimited.spec).enforced


def test_directory_usage_counts_blocks_and_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * MIB)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * MIB)
    (tmp_path / "sub" / "b-link").hardlink_to(tmp_path / "sub" / "b")
    with open(tmp_path / "sparse", "wb") as sparse:
        sparse.truncate(100 * MIB)  # apparent size only: no blocks on the disk
    assert 2 * MIB <= directory_usage(tmp_path) < 2 * MIB + 64 * 1024
    assert directory_usage(tmp_path / "missing") == 0
    assert DiskUsage(writable_layer=1, empty_dirs={"/a": 2}, logs=3).total == 6
