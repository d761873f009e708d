"""prepare() against a real S3 server (moto), through a fault-injecting proxy where faults matter."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from bootstrap import objectstore
from bootstrap.cache import NodeCache
from bootstrap.download import DownloadError, TransferSettings, fetch_all
from bootstrap.objectstore import RemoteObject
from bootstrap.prepare import PrepareError
from bootstrap.progress import Progress
from bootstrap.spec import OssStore
from tests.harness.parts import free_port, port_open, unavailable, wait_until
from tests.prepare_support import BIG_SIZE, assert_tree, endpoint_env, model_tree, object_spec, run_prepare

BIG = "weights/model-00001.safetensors"


@pytest.fixture
def model(s3_server, tmp_path: Path):
    """A bucket holding a model-like tree under model/; returns (url, files)."""
    bucket = s3_server.new_bucket()
    files = model_tree(tmp_path / "src")
    s3_server.upload_tree(bucket, "model", tmp_path / "src")
    return f"oss://{bucket}/model/", files


@pytest.fixture
def proxy(s3_server, fault_proxy):
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    return fault_proxy(host, int(port))


def test_round_trip_is_byte_exact_with_parallel_ranged_gets(model, proxy, s3_server, tmp_path: Path) -> None:
    url, files = model
    mount = tmp_path / "mnt" / "data"
    steps = run_prepare(object_spec(url, mount), tmp_path / "cache", endpoint_env(s3_server.env(), proxy.endpoint))

    assert_tree(mount, files)
    assert mount.is_symlink() and Path(os.readlink(mount)).is_relative_to(tmp_path / "cache")  # no second copy
    assert os.stat(mount / BIG).st_mode & 0o222 == 0  # read-only in the cache
    assert proxy.peak_requests_in_flight() >= 3, "the large file should arrive through parallel ranged GETs"
    assert f"storage {mount}" in steps


def test_second_boot_on_a_warm_cache_downloads_nothing(model, proxy, s3_server, tmp_path: Path) -> None:
    url, files = model
    env = endpoint_env(s3_server.env(), proxy.endpoint)
    run_prepare(object_spec(url, tmp_path / "a"), tmp_path / "cache", env)
    before = proxy.bytes_down

    run_prepare(object_spec(url, tmp_path / "b"), tmp_path / "cache", env)

    assert proxy.bytes_down - before < 20_000  # the listing only
    assert_tree(tmp_path / "b", files)


def test_a_changed_object_is_fetched_again_and_unchanged_ones_are_not(model, proxy, s3_server, tmp_path: Path) -> None:
    url, files = model
    env = endpoint_env(s3_server.env(), proxy.endpoint)
    run_prepare(object_spec(url, tmp_path / "mnt"), tmp_path / "cache", env)
    bucket = url.split("/")[2]
    files["config.json"] = b'{"architectures": ["changed"]}'
    s3_server.client().put_object(Bucket=bucket, Key="model/config.json", Body=files["config.json"])
    before = proxy.bytes_down

    run_prepare(object_spec(url, tmp_path / "mnt"), tmp_path / "cache", env)

    assert_tree(tmp_path / "mnt", files)
    assert proxy.bytes_down - before < BIG_SIZE / 4  # the large file was not fetched again


def test_an_object_replaced_after_listing_is_fetched_whole_under_its_new_etag(s3_server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    new = os.urandom(700_000)
    s3_server.client().put_object(Bucket=bucket, Key="m/w.bin", Body=new)
    location = objectstore.resolve(OssStore(path=f"oss://{bucket}/m/", readOnly=True), s3_server.env())
    stale = RemoteObject("m/w.bin", 1_000_000, '"0123456789abcdef0123456789abcdef"')  # as listed before the replacement
    cache = NodeCache(tmp_path / "cache", "services/svc")

    async def fetch() -> list[RemoteObject]:
        async with objectstore.client(location) as s3:
            progress = Progress("test", stale.size, 1, interval=60)
            return await fetch_all(s3, location, [stale], cache, TransferSettings(part_size=256 * 1024), progress)

    [fetched] = asyncio.run(fetch())

    assert fetched.size == len(new) and fetched.etag != stale.etag  # If-Match answered 412
    assert cache.blob(cache.blob_key(location, fetched)).read_bytes() == new
    assert not cache.has_blob(cache.blob_key(location, stale), stale.size)


def test_cut_connections_give_up_cleanly_then_resume_without_refetching(model, proxy, s3_server, tmp_path: Path) -> None:
    url, files = model
    env = {**endpoint_env(s3_server.env(), proxy.endpoint), "BERTH_DOWNLOAD_ATTEMPTS": "2"}
    mount, cache = tmp_path / "mnt", tmp_path / "cache"
    proxy.cut_after(BIG_SIZE * 2 // 3)  # mid-download; what a reset drops from socket buffers is lost too

    with pytest.raises(PrepareError) as failed:
        run_prepare(object_spec(url, mount), cache, env)

    assert BIG in str(failed.value) and "gave up" in str(failed.value)
    assert not mount.exists() and not mount.is_symlink()
    blobs = cache / "weights/services/svc/blobs"
    visible = [p.name for p in blobs.iterdir() if p.stat().st_size == BIG_SIZE and "." not in p.name]
    assert visible == [], "no half-written file may be visible as a blob"
    assert not list((cache / "weights/services/svc/trees").glob("*.json"))

    proxy.cut_after(None)
    before = proxy.bytes_down
    run_prepare(object_spec(url, mount), cache, env)

    assert proxy.bytes_down - before < 0.6 * BIG_SIZE
    assert_tree(mount, files)


def test_a_boot_rides_out_cut_connections_and_resumes_each_part(model, proxy, s3_server, tmp_path: Path) -> None:
    url, files = model
    env = {**endpoint_env(s3_server.env(), proxy.endpoint), "BERTH_DOWNLOAD_ATTEMPTS": "10", "BERTH_DOWNLOAD_BACKOFF": "0.1"}
    proxy.cut_after(BIG_SIZE // 2)

    def heal_a_moment_after_the_cut() -> None:
        wait_until(lambda: proxy.cuts > 0, 30, "a cut")
        time.sleep(0.3)
        proxy.cut_after(None)

    threading.Thread(target=heal_a_moment_after_the_cut, daemon=True).start()

    run_prepare(object_spec(url, tmp_path / "mnt"), tmp_path / "cache", env)

    assert proxy.cuts > 0
    assert proxy.bytes_down < 1.6 * BIG_SIZE  # what was cut was not fetched again
    assert_tree(tmp_path / "mnt", files)


def _fetch_through(proxy, s3_server, bucket: str, tmp_path: Path, settings: TransferSettings):
    location = objectstore.resolve(OssStore(path=f"oss://{bucket}/m/", endpoint=proxy.endpoint, readOnly=True),
                                   s3_server.env())
    head = s3_server.client().head_object(Bucket=bucket, Key="m/w.bin")
    obj = RemoteObject("m/w.bin", head["ContentLength"], head["ETag"])
    cache = NodeCache(tmp_path / "cache", "services/svc")

    async def fetch() -> None:
        async with objectstore.client(location) as s3:
            await fetch_all(s3, location, [obj], cache, settings, Progress("test", obj.size, 1, interval=60))

    asyncio.run(fetch())
    return cache.blob(cache.blob_key(location, obj))


def test_slowdown_is_retried_after_the_delay_oss_asks_for(s3_server, proxy, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    data = os.urandom(600_000)
    s3_server.client().put_object(Bucket=bucket, Key="m/w.bin", Body=data)
    proxy.fail_requests(3, 503, "SlowDown", {"x-oss-qos-delay-time": "300"})
    started = time.monotonic()

    blob = _fetch_through(proxy, s3_server, bucket, tmp_path, TransferSettings(part_size=256 * 1024, backoff_base=0.001))

    assert proxy.errors_sent == 3
    assert time.monotonic() - started >= 0.3  # x-oss-qos-delay-time (ms) was honoured
    assert blob.read_bytes() == data


def test_the_last_retry_gives_a_clear_error_naming_the_object(s3_server, proxy, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="m/w.bin", Body=b"x" * 1000)
    proxy.fail_requests(100, 500, "InternalError")

    with pytest.raises(DownloadError, match=r"m/w\.bin: gave up after 2 tries without progress \(InternalError 500\)"):
        _fetch_through(proxy, s3_server, bucket, tmp_path, TransferSettings(attempts=2, backoff_base=0.001))


def test_a_missing_bucket_is_a_clear_error(s3_server, tmp_path: Path) -> None:
    spec = object_spec("oss://no-such-bucket-berth/model/", tmp_path / "mnt")

    with pytest.raises(PrepareError, match=r"storage .*/mnt: oss://no-such-bucket-berth/model/: list failed: bucket 'no-such-bucket-berth' does not exist"):
        run_prepare(spec, tmp_path / "cache", s3_server.env())


def test_an_empty_prefix_is_a_clear_error(s3_server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    with pytest.raises(PrepareError, match="holds no objects; check the bucket and prefix"):
        run_prepare(object_spec(f"s3://{bucket}/nothing/", tmp_path / "mnt"), tmp_path / "cache", s3_server.env())


def test_missing_endpoint_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="set OSS_ENDPOINT"):
        run_prepare(object_spec("oss://b/m/", tmp_path / "mnt"), tmp_path / "cache", {})


def test_services_do_not_share_private_weights_unless_the_operator_makes_them_public(model, proxy, s3_server, tmp_path: Path) -> None:
    url, files = model
    env = endpoint_env(s3_server.env(), proxy.endpoint)
    cache = tmp_path / "cache"
    run_prepare(object_spec(url, tmp_path / "a", name="alpha"), cache, env)
    before = proxy.bytes_down
    run_prepare(object_spec(url, tmp_path / "b", name="beta"), cache, env)

    assert proxy.bytes_down - before > BIG_SIZE  # beta fetched its own copy, never read alpha's
    assert "services/beta/" in os.readlink(tmp_path / "b")

    public = {**env, "BERTH_CACHE_SHARED_PREFIXES": url.rsplit("/", 2)[0] + "/"}
    run_prepare(object_spec(url, tmp_path / "c", name="gamma"), cache, public)
    before = proxy.bytes_down
    run_prepare(object_spec(url, tmp_path / "d", name="delta"), cache, public)

    assert proxy.bytes_down - before < 20_000  # the node-wide pool served delta
    assert "/shared/" in os.readlink(tmp_path / "d")
    assert_tree(tmp_path / "d", files)


# --- credentials: a server that checks signatures ------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """moto with authentication enforced after its first three requests (the IAM setup below)."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("auth") / "moto.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, stdout=log, stderr=log)
    try:
        wait_until(lambda: port_open("127.0.0.1", port) or process.poll() is not None, 30, "moto start")
        if process.poll() is not None:
            unavailable("an S3 server that checks signatures (moto)", f"exited {process.returncode}")
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                           region_name="us-east-1")
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1")
        s3.create_bucket(Bucket="private")
        s3.put_object(Bucket="private", Key="model/config.json", Body=b"{}")
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize(("wrong", "message"), [
    ("secret", "the secret key is wrong"),
    ("key", "the access key is not known to the server"),
])
def test_bad_credentials_are_a_clear_error_without_any_secret(auth_server, tmp_path: Path, caplog, wrong: str, message: str) -> None:
    endpoint, access, secret = auth_server
    given_access = "AKIAWRONGWRONGWRONG1" if wrong == "key" else access
    given_secret = "wrong-secret-do-not-print" if wrong == "secret" else secret
    env = {"OSS_ENDPOINT": endpoint, "OSS_ACCESS_KEY_ID": given_access, "OSS_ACCESS_KEY_SECRET": given_secret}
    caplog.set_level(logging.DEBUG)

    with pytest.raises(PrepareError, match=message) as failed:
        run_prepare(object_spec("oss://private/model/", tmp_path / "mnt"), tmp_path / "cache", env)

    shown = str(failed.value) + caplog.text
    for value in (given_access, given_secret, secret):
        assert value not in shown


def test_good_credentials_on_the_checking_server_work(auth_server, tmp_path: Path) -> None:
    endpoint, access, secret = auth_server
    env = {"OSS_ENDPOINT": endpoint, "OSS_ACCESS_KEY_ID": access, "OSS_ACCESS_KEY_SECRET": secret}
    run_prepare(object_spec("oss://private/model/", tmp_path / "mnt"), tmp_path / "cache", env)
    assert (tmp_path / "mnt" / "config.json").read_bytes() == b"{}"
