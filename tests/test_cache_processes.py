"""The node cache shared by real processes: concurrent fills, leases, least-recent-use eviction."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.prepare_support import BIG_SIZE, assert_tree, endpoint_env, model_tree, object_spec, start_prepare_process


@pytest.fixture
def proxy(s3_server, fault_proxy):
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    return fault_proxy(host, int(port))


def _finish(process, timeout: float = 120) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return out + err


def test_two_instances_booting_at_once_download_once(s3_server, proxy, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    files = model_tree(tmp_path / "src")
    s3_server.upload_tree(bucket, "model", tmp_path / "src")
    env = endpoint_env(s3_server.env(), proxy.endpoint)
    url, cache = f"oss://{bucket}/model/", tmp_path / "cache"

    first = start_prepare_process(object_spec(url, tmp_path / "a"), cache, env)
    second = start_prepare_process(object_spec(url, tmp_path / "b"), cache, env)
    output = _finish(first) + _finish(second)

    total = sum(len(data) for data in files.values())
    assert proxy.bytes_down < 1.2 * total, "each object is downloaded by one instance only"
    assert_tree(tmp_path / "a", files)
    assert_tree(tmp_path / "b", files)
    assert os.readlink(tmp_path / "a") == os.readlink(tmp_path / "b")
    for secret in (s3_server.secret_key, s3_server.access_key):
        assert secret not in output


def test_eviction_frees_least_recently_used_trees_but_never_one_in_use(s3_server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    for name in ("old", "running", "new"):
        client.put_object(Bucket=bucket, Key=f"{name}/w.bin", Body=os.urandom(BIG_SIZE))
    cache = tmp_path / "cache"
    # Room for two of the three trees.
    env = {**s3_server.env(), "BERTH_CACHE_MAX_SIZE": str(int(2.5 * BIG_SIZE))}

    def boot(name: str, *, hold: bool = False):
        return start_prepare_process(object_spec(f"oss://{bucket}/{name}/", tmp_path / name), cache, env, hold=hold)

    running = boot("running", hold=True)  # used first, so the least recent, but in use all along
    try:
        assert running.stdout.readline().strip() == "prepared"
        time.sleep(0.05)  # distinct last-use times
        _finish(boot("old"))
        time.sleep(0.05)
        output = _finish(boot("new"))

        assert "cache eviction: removed" in output
        assert (tmp_path / "running" / "w.bin").stat().st_size == BIG_SIZE  # leased: kept though least recent
        assert not (tmp_path / "old").resolve().exists()  # not in use: evicted
        assert (tmp_path / "new" / "w.bin").stat().st_size == BIG_SIZE
    finally:
        running.stdin.close()
        running.wait(timeout=30)
