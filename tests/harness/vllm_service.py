"""A vLLM service as a node runs it: `berth boot --vllm` in the Dockerfile.vllm image, the model
in a bucket of the S3 server, the node cache a host directory. Used by the journey tests and
by bench/cold_start.py.

The container uses the host's network, because the S3 server listens on the host's loopback;
its ports are free ones given as flags.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.harness.parts import free_port
from tests.harness.s3 import S3Server

log = logging.getLogger("tests.vllm")

MODEL_MOUNT = "/mnt/data/tiny-llama"
SERVED_NAME = "tiny-llama"  # the spec's metadata.name
STARTUP_LIMIT_S = 480
# vLLM's CPU backend sizes its KV cache from this (GiB); its default, 4, is more than a CI box spares.
# One core kept from the engine's OpenMP threads for the API server, the proxy and the client,
# as vLLM's CPU guidance advises for serving: without it the threads starve the API server,
# whose parsing, tokenizing and streaming lie outside vLLM's own TTFT clock.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
# The node cache as torch fills it: inductor's compiled graphs under the engine build's key.
COMPILED = "compile/*/inductor"


@dataclass
class Service:
    container: "docker.models.containers.Container"  # noqa: F821
    proxy: str
    admin: str
    ready_after_s: float

    def logs(self) -> str:
        return self.container.logs().decode(errors="replace")


@dataclass(frozen=True)
class Node:
    """What stays between instances on one node: the bucket with the model, the node cache."""

    s3: S3Server
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
