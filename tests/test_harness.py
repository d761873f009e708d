"""The real parts the suite stands on: each is used for real here, so a broken part is seen at once."""

from __future__ import annotations

import io
import urllib.request
import uuid

import pytest

from tests.harness.parts import wait_until

pytestmark = pytest.mark.docker


def test_image_pulled_from_the_local_registry_runs_and_answers_http(docker_client, registry, base_image):
    repo = f"{registry}/berth-test/http-echo"
    tag = uuid.uuid4().hex[:8]
    dockerfile = f"FROM {base_image}\nRUN echo pulled-ok > /srv-index.html\nCMD [\"python\", \"-m\", \"http.server\", \"8000\", \"-d\", \"/\"]\n"
    image, _ = docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=f"{repo}:{tag}", rm=True)
    for line in docker_client.images.push(repo, tag=tag, stream=True, decode=True):
        assert "error" not in line, line
    docker_client.images.remove(f"{repo}:{tag}", force=True)
    with pytest.raises(Exception):
        docker_client.images.get(f"{repo}:{tag}")

    pulled = docker_client.images.pull(repo, tag=tag)
    assert pulled.id == image.id
    container = docker_client.containers.run(pulled.id, detach=True, ports={"8000/tcp": ("127.0.0.1", None)})
    try:
        container.reload()
        host_port = int(container.ports["8000/tcp"][0]["HostPort"])

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/srv-index.html", timeout=1) as response:
                    return response.read() == b"pulled-ok\n"
            except OSError:
                return False

        wait_until(answers, 30, "the pulled container answering HTTP")
    finally:
        container.remove(force=True)
        docker_client.images.remove(pulled.id, force=True)


def test_object_round_trips_through_the_s3_server(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    payload = bytes(range(256)) * 4096 + b"tail"
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="models/tiny/weights.bin", Body=payload)
    listed = client.list_objects_v2(Bucket=bucket, Prefix="models/")
    assert [item["Key"] for item in listed["Contents"]] == ["models/tiny/weights.bin"]
    assert client.get_object(Bucket=bucket, Key="models/tiny/weights.bin")["Body"].read() == payload
    ranged = client.get_object(Bucket=bucket, Key="models/tiny/weights.bin", Range="bytes=1000-1999")["Body"].read()
    assert ranged == payload[1000:2000]


def test_fault_proxy_cuts_a_download_midway(s3_server, fault_proxy):
    import boto3
    from botocore.config import Config

    bucket = s3_server.new_bucket()
    payload = b"x" * (2 * 1024 * 1024)
    s3_server.client().put_object(Bucket=bucket, Key="big", Body=payload)
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    proxy = fault_proxy(host, int(port))
    client = boto3.client(
        "s3", endpoint_url=proxy.endpoint, aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key, region_name=s3_server.region,
        config=Config(retries={"max_attempts": 1}),
    )
    assert client.get_object(Bucket=bucket, Key="big")["Body"].read() == payload
    proxy.cut_after(256 * 1024)
    with pytest.raises(Exception):
        client.get_object(Bucket=bucket, Key="big")["Body"].read()
    assert proxy.cuts >= 1
    proxy.cut_after(None)
    assert client.get_object(Bucket=bucket, Key="big")["Body"].read() == payload
