"""`berth agent` on a GPU node in production: GPUs from a recorded inventory, the system-disk limit
(measured path), log rotation, `berth logs --previous`, image GC. One agent for the module,
the real Docker engine; timings shortened through the operator config, as an operator would.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from pathlib import Path

import docker
import pytest

from agent.logs import log_files
from tests.harness.agent import Agent, service_spec, unique, wait_state

pytestmark = pytest.mark.docker

INVENTORY = Path(__file__).parent / "data" / "gpu-inventory.json"
NODE_UUIDS = [gpu["uuid"] for gpu in json.loads(INVENTORY.read_text())["gpus"]]
EVICTION_PERIOD_S = 1.0
LOG_MAX_SIZE = 64 * 1024
GC_SCOPE = f"berth-gcagent-{uuid.uuid4().hex[:8]}"
GC_MIN_AGE_S = 5  # time enough to deploy from a freshly built image before GC may take it


@pytest.fixture(scope="module")
def agent(tmp_path_factory, docker_client, python_inference_image):
    running = Agent(
        tmp_path_factory.mktemp("housekeeping"), gpu_inventory_file=str(INVENTORY),
        log_max_size_bytes=LOG_MAX_SIZE, log_max_files=2,
        # GC limited to this module's own images, with thresholds every disk is past: it runs each second.
        image_gc_repositories=[f"{GC_SCOPE}:*"], image_gc_high_threshold_percent=1, image_gc_low_threshold_percent=0,
        image_gc_min_age_s=GC_MIN_AGE_S,
    )
    config = json.loads(running.config_path.read_text())
    config["timings"] = {**config["timings"], "eviction_period_s": EVICTION_PERIOD_S, "image_gc_period_s": 1}
    running.config_path.write_text(json.dumps(config))
    running.start()
    yield running
    try:
        running.remove_all(docker_client)
    finally:
        running.stop()


def events(agent: Agent, name: str | None = None) -> list[dict]:
    query = f"service={name}&" if name else ""
    return [json.loads(line) for line in agent.api("GET", f"/v1/events?{query}follow=false").text.splitlines()]


def test_gpus_are_exclusive_pending_when_taken_refused_beyond_the_node_and_kept_across_restarts(agent, docker_client,
                                                                                               python_inference_image):
    first, second, waiting = unique("gpu-a"), unique("gpu-b"), unique("gpu-c")
    for name in (first, second):
        assert agent.deploy(service_spec(name, python_inference_image, gpu=2)).returncode == 0
    # No NVIDIA runtime here: each instance fails to start, saying how to fix it, and keeps its GPUs.
    held = {}
    for name in (first, second):
        service = wait_state(agent, name, lambda s: s["instances"][0]["state"] == "Failed", 60, "GPU start refused")
        inst = service["instances"][0]
        assert "GpuRuntimeMissing" in inst["reason"] and "NVIDIA Container Toolkit" in inst["reason"]
        held[name] = inst["gpus"]
        requests = docker_client.api.inspect_container(inst["runtime_id"])["HostConfig"]["DeviceRequests"]
        assert requests == [{"Driver": "nvidia", "Count": 0, "DeviceIDs": inst["gpus"], "Capabilities": [["gpu"]],
                             "Options": {}}]
    assert len(held[first]) == len(held[second]) == 2 and not set(held[first]) & set(held[second])
    assert set(held[first]) | set(held[second]) == set(NODE_UUIDS)

    assert agent.deploy(service_spec(waiting, python_inference_image, gpu=1)).returncode == 0
    pending = wait_state(agent, waiting, lambda s: s["instances"][0]["state"] == "Pending", 30, "Pending")
    assert "needs 1 GPU, 0 of 4 free" in pending["instances"][0]["reason"]

    refused = agent.deploy(service_spec(unique("gpu-d"), python_inference_image, gpu=5))
    assert refused.returncode == 2 and "metadata.gpu" in refused.stderr and "this node has 4" in refused.stderr

    node = json.loads(agent.cli("node", "--json").stdout)
    assert {gpu["uuid"]: gpu["instance"] for gpu in node["gpus"]} == {
        **{uuid: f"{first}-0" for uuid in held[first]}, **{uuid: f"{second}-0" for uuid in held[second]}}
    assert "held by" in agent.cli("node").stdout

    agent.kill9()
    agent.start()
    for name in (first, second):
        assert agent.service(name)["instances"][0]["gpus"] == held[name]
    assert wait_state(agent, waiting, lambda s: s["instances"][0]["state"] == "Pending", 30, "still Pending")

    assert agent.cli("rm", first).returncode == 0  # its GPUs go to the instance waiting for one
    after = wait_state(agent, waiting, lambda s: s["instances"][0]["gpus"], 30, "GPU handed over")
    assert after["instances"][0]["gpus"] == held[first][:1]
    for name in (second, waiting):
        assert agent.cli("rm", name).returncode == 0


def test_a_service_writing_past_its_disk_limit_is_evicted_and_restarted(agent, python_inference_image):
    name = unique("disk")
    spec = service_spec(name, python_inference_image, command="echo filling the disk; "
                        "dd if=/dev/zero of=/tmp/fill bs=1M count=40 status=none; exec python3 -m http.server 8000")
    spec["features"] = {"eas.aliyun.com/extra-ephemeral-storage": "20Mi"}
    assert agent.deploy(spec).returncode == 0
    service = wait_state(agent, name, lambda s: s["instances"][0]["restarts"] >= 1, 60, "evicted and restarted")
    seen = events(agent, name)
    started = next(e["at"] for e in seen if e["kind"] == "Started")
    evicted = next(e for e in seen if e["kind"] == "DiskLimitExceeded")
    assert "over the limit of 20.0 MiB" in evicted["message"] and "writable layer" in evicted["message"]
    # Written as it starts (a fraction of a second), then caught by the next housekeeping pass, which
    # may come before or after the instance is Ready: at the latest two periods plus the write and one measurement.
    assert evicted["at"] - started <= 2 * EVICTION_PERIOD_S + 3, evicted["at"] - started
    kinds = [e["kind"] for e in seen]
    assert kinds.index("Evicted") < kinds.index("BackOff", kinds.index("Evicted"))
    assert service["instances"][0]["last_exit"]["reason"] == "DiskLimitExceeded"

    previous = agent.cli("logs", name, "--previous")
    assert previous.returncode == 0 and "filling the disk" in previous.stdout
    fresh = unique("fresh")
    assert agent.deploy(service_spec(fresh, python_inference_image), "--wait").returncode == 0
    none = agent.cli("logs", fresh, "--previous")
    assert none.returncode == 1 and "has not restarted" in none.stderr
    for done in (name, fresh):
        agent.cli("rm", done, "--no-wait")


def test_log_rotation_caps_a_chatty_services_logs(agent, docker_client, python_inference_image):
    name = unique("chatty")
    chatty = "python3 -c \"import sys\nfor n in range(3000): print(n, 'x' * 200)\"; exec python3 -m http.server 8000"
    assert agent.deploy(service_spec(name, python_inference_image, command=chatty), "--wait").returncode == 0
    attrs = docker_client.api.inspect_container(agent.service(name)["instances"][0]["runtime_id"])
    assert attrs["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {"max-size": str(LOG_MAX_SIZE), "max-file": "2"}}
    files = log_files(attrs)
    # 3000 lines of ~250 bytes in json-file framing is about 1 MB; two files of 64 KiB are kept.
    assert 1 <= len(files) <= 2 and sum(path.stat().st_size for path in files) <= 2 * LOG_MAX_SIZE + 4096
    logs = agent.cli("logs", name).stdout
    assert "2999 xxx" in logs and "0 xxx" not in logs.splitlines()[0]
    agent.cli("rm", name, "--no-wait")


def test_image_gc_removes_an_unused_image_past_the_threshold_and_never_one_in_use(agent, docker_client,
                                                                                 python_inference_image):
    def build(tag: str, base: str) -> str:
        reference = f"{GC_SCOPE}:{tag}"
        dockerfile = f"FROM {base}\nLABEL berth.test.gc={reference}\n"
        docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=reference, rm=True)
        return reference

    in_use = build("in-use", python_inference_image)
    name = unique("gc")
    assert agent.deploy(service_spec(name, in_use)).returncode == 0
    unused = build("unused", python_inference_image)
    deadline = time.monotonic() + GC_MIN_AGE_S + 30
    # The low-level list: images.list() inspects each image it lists, and the GC may remove one in between.
    while docker_client.api.images(name=unused) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not docker_client.api.images(name=unused), "the unused image was not collected"
    assert docker_client.api.images(name=in_use)
    wait_state(agent, name, lambda s: s["instances"][0]["state"] == "Ready", 30, "Ready from the kept image")
    collected = [e for e in events(agent) if e["kind"] == "ImagesCollected"]
    assert any(unused in e["message"] for e in collected) and not any(in_use in e["message"] for e in collected)
    assert agent.cli("rm", name).returncode == 0
    for image in docker_client.api.images(name=GC_SCOPE):  # the GC may already have taken it, now unused
        try:
            docker_client.images.remove(image["Id"], force=True)
        except docker.errors.ImageNotFound:
            pass
