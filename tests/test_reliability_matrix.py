"""The fault matrix (docs/reliability.md), one test per row, with real parts: the S3 server,
a filesystem that fills, real `berth agent` and `berth boot` processes, the registry.
The state database rows are in tests/test_reliability_agent.py."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from bootstrap.prepare import PrepareError
from tests.harness.agent import Agent, unique, wait_state
from tests.harness.parts import free_port, unavailable, wait_until
from tests.prepare_support import assert_tree, endpoint_env, model_tree, object_spec, run_prepare


@pytest.fixture
def model(s3_server, tmp_path: Path):
    bucket = s3_server.new_bucket()
    files = model_tree(tmp_path / "src")
    s3_server.upload_tree(bucket, "model", tmp_path / "src")
    return f"s3://{bucket}/model/", files


def _visible(cache: Path) -> list[Path]:
    """What a service could see of the cache: built trees' files (not staging, locks or leases)."""
    return [path for path in cache.rglob("trees/*/**/*") if path.is_file()]


def test_s3_endpoint_down_at_prepare_retries_names_the_endpoint_and_leaves_nothing_half_made(
        model, s3_server, fault_proxy, tmp_path: Path):
    url, files = model
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    proxy = fault_proxy(host, int(port))
    proxy.faults.refuse = True
    env = endpoint_env(s3_server.env(), proxy.endpoint)
    started = time.monotonic()
    with pytest.raises(PrepareError, match=rf"after 3 tries: .* from {proxy.endpoint}"):
        run_prepare(object_spec(url, tmp_path / "mnt"), tmp_path / "cache", env)
    assert time.monotonic() - started > 0.04  # backed off between tries
    assert proxy.connections == 0 and not _visible(tmp_path / "cache") and not (tmp_path / "mnt").exists()
    proxy.faults.refuse = False
    run_prepare(object_spec(url, tmp_path / "mnt"), tmp_path / "cache", env)
    assert_tree(tmp_path / "mnt", files)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs made for the test and removed after it."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        unavailable("a tmpfs mount (root)", made.stderr.strip())
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_node_cache_disk_full_names_the_directory_and_bytes_needed_and_harms_no_one(
        model, s3_server, small_disk: Path, tmp_path: Path):
    url, _ = model
    cache = small_disk / "cache"
    small = s3_server.new_bucket()
    small_files = model_tree(tmp_path / "small-src", big_size=100_000)
    s3_server.upload_tree(small, "model", tmp_path / "small-src")
    # Another service's model is in the cache already and must stay whole.
    run_prepare(object_spec(f"s3://{small}/model/", tmp_path / "other", name="other"), cache, s3_server.env())
    with pytest.raises(PrepareError, match=rf"the node cache {cache} needs \d+ bytes .* for {url}, and its disk has \d+ bytes"):
        run_prepare(object_spec(url, tmp_path / "mnt"), cache, s3_server.env())
    assert not list(cache.rglob("*.partial")), "a download began on a disk that could not hold it"
    assert_tree(tmp_path / "other", small_files)
    run_prepare(object_spec(f"s3://{small}/model/", tmp_path / "other-again", name="other"), cache, s3_server.env())
    assert_tree(tmp_path / "other-again", small_files)
