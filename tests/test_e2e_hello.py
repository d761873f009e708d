"""Journey 1, the seed's first quick start, with real everything: a Flask app whose code sits in a
bucket (moto's S3 server standing in for OSS) and whose flask comes from PyPI, deployed with
`berth deploy --wait` as the seed's JSON config to a real `berth agent` that runs it in a
container of images/python-inference; GET /hello through the published proxy port.

The endpoint and keys reach the container as an operator gives them (the agent's `env`), never
in the user's JSON; the container reaches the S3 server on the host's loopback, so this agent
runs instances with host networking.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import requests

from tests.harness.parts import free_port
from tests.harness.agent import Agent

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("image_pull_s", "prepare_s", "download_s", "pip_s", "engine_start_s", "warmup_s", "ready_s")


@pytest.fixture(scope="module")
def hello(tmp_path_factory, docker_client, registry, s3_server, python_inference_image):
    """examples/hello.json deployed once: (agent, the deploy's JSON, the deploy's stderr)."""
    bucket = s3_server.new_bucket("hello")
    s3_server.client().upload_file(str(ROOT / "examples" / "hello" / "app.py"), bucket, "code/app.py")
    # Through the registry, so that the pull phase is a real pull.
    image = f"{registry}/berth-test/hello-{uuid.uuid4().hex[:6]}:1"
    docker_client.images.get(python_inference_image).tag(image)
    docker_client.images.push(image)
    docker_client.images.remove(image)

    agent = Agent(tmp_path_factory.mktemp("hello-agent"), network="host",
                  env={**s3_server.env(), "BERTH_DRAIN_DELAY": "0"}).start()
    spec = json.loads((ROOT / "examples" / "hello.json").read_text())
    spec["metadata"]["name"] = f"hello-{uuid.uuid4().hex[:6]}"
    container = spec["containers"][0]
    container["image"] = image
    # Host networking: the app's port must be free on this host (app.py reads PORT).
    port = free_port()
    container["port"] = port
    container["env"] = [{"name": "PORT", "value": str(port)}]
    spec["storage"][0]["oss"]["path"] = f"oss://{bucket}/code/"
    try:
        result = agent.deploy(spec, "--wait", "--json")
        assert result.returncode == 0, result.stderr + agent.cli("logs", spec["metadata"]["name"]).stdout
        yield agent, json.loads(result.stdout), result.stderr
    finally:
        agent.remove_all(docker_client)
        agent.stop()


def test_hello_world_through_the_published_proxy_port(hello):
    agent, service, progress = hello
    assert "Ready" in progress and "ready in" in progress
    events = agent.api("GET", f"/v1/events?service={service['name']}&follow=false").text
    assert '"kind": "Pulling"' in events and '"kind": "ColdStart"' in events
    (instance,) = service["instances"]
    assert service["runtime"] == "docker" and instance["state"] == "Ready"
    answer = requests.get(f"{instance['endpoint']}/hello", timeout=10)
    assert answer.status_code == 200 and answer.text == "Hello World"


def test_cold_start_breakdown_in_berth_get_and_the_bootstraps_status(hello, s3_server):
    agent, service, _ = hello
    name = service["name"]
    got = agent.cli("get", name, "--json")
    assert got.returncode == 0, got.stderr
    (instance,) = json.loads(got.stdout)["instances"]
    cold = instance["cold_start"]
    assert set(cold) == set(PHASES) and all(isinstance(cold[key], float) for key in PHASES), cold
    # A real pull from the registry, a real download and a real `pip install flask` from PyPI.
    assert cold["image_pull_s"] > 0 and cold["download_s"] > 0 and cold["pip_s"] > 0
    assert cold["prepare_s"] >= cold["download_s"] + cold["pip_s"]
    assert cold["ready_s"] >= cold["image_pull_s"] + cold["prepare_s"] + cold["engine_start_s"] + cold["warmup_s"]

    # The in-container phases are the bootstrap's own /status, not a second clock.
    status = requests.get(f"{instance['admin_endpoint']}/status", timeout=5).json()
    assert status["state"] == "READY"
    assert status["phases"]["prepare"] == cold["prepare_s"] and status["phases"]["launch"] == cold["engine_start_s"]
    assert status["phases"]["warmup"] == cold["warmup_s"]
    steps = status["prepare_steps"]
    assert set(steps) == {"storage /mnt/data", "pip"}, steps
    assert steps["storage /mnt/data"] == cold["download_s"] and steps["pip"] == cold["pip_s"]

    table = agent.cli("get", name)
    assert f"{instance['id']} cold start: pull " in table.stdout and "pip " in table.stdout
    assert s3_server.secret_key not in got.stdout + table.stdout


def test_the_image_runs_the_express_lanes_scans_in_c(hello):
    """images/python-inference builds on a base with no C compiler: images/install-berth borrows
    one for the build, so berth boot's proxy runs the C scans (its start line says which)."""
    agent, service, _ = hello
    logs = agent.cli("logs", service["name"]).stdout
    assert "express lane scans in C)" in logs, logs[-3000:]
