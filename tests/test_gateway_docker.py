"""Through the gateway, on Docker with bridge networking: a 2-instance service rolled to a new
revision and then scaled in under steady load, by a client that never refreshes anything and
with no drain delay at all (the drain order alone keeps requests off a stopping instance)."""

from __future__ import annotations

import json

import pytest

from tests.harness.agent import Agent, unique, wait_state
from tests.harness.load import SteadyLoad
from tests.harness.parts import free_port

pytestmark = pytest.mark.docker

VERSIONED_APP = "mkdir -p /srv && echo v$VERSION > /srv/version && cd /srv && exec python3 -m http.server 8000"


def versioned_spec(name: str, image: str, version: str, instances: int = 2) -> dict:
    return {"metadata": {"name": name, "instance": instances, "eas": {"termination_grace_period": 30},
                         "rolling_strategy": {"max_surge": 1, "max_unavailable": 0}},
            "containers": [{"image": image, "command": VERSIONED_APP, "env": [{"name": "VERSION", "value": version}]}]}


def test_rollout_and_scale_in_through_the_gateway_fail_nothing(tmp_path, docker_client, python_inference_image):
    agent = Agent(tmp_path, gateway="127.0.0.1:0", gateway_admin="127.0.0.1:0").start()  # env BERTH_DRAIN_DELAY=0
    try:
        name = unique("gwroll")
        assert agent.deploy(versioned_spec(name, python_inference_image, "1"), "--wait").returncode == 0
        gateway = agent.gateway_url()
        v2 = tmp_path / "v2.json"
        v2.write_text(json.dumps(versioned_spec(name, python_inference_image, "2")))
        with SteadyLoad(lambda: [gateway], path=f"/api/predict/{name}/version", rate_per_s=200) as load:
            result = agent.cli("update", name, str(v2), "--wait")
        assert result.returncode == 0, result.stderr
        served = [outcome.detail.strip() for outcome in load.outcomes]
        assert len(served) > 200 and not load.failures(), load.failures()[:5]
        assert served[0] == "v1" and served[-1] == "v2"

        one = tmp_path / "one.json"
        one.write_text(json.dumps(versioned_spec(name, python_inference_image, "2", instances=1)))
        with SteadyLoad(lambda: [gateway], path=f"/api/predict/{name}/version", rate_per_s=200) as load:
            result = agent.cli("update", name, str(one), "--wait", "--json")
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)["instances"]) == 1
        assert len(load.outcomes) > 100 and not load.failures(), load.failures()[:5]
    finally:
        try:
            agent.remove_all(docker_client)
        finally:
            agent.stop()


def test_host_networking_a_command_that_ignores_port_fails_its_second_instance_saying_so(tmp_path, docker_client,
                                                                                         python_inference_image):
    agent = Agent(tmp_path, network="host").start()
    try:
        name, port = unique("hosthard"), free_port()
        spec = {"metadata": {"name": name, "instance": 2, "eas": {"termination_grace_period": 5}},
                "containers": [{"image": python_inference_image, "port": port, "command": f"python3 -m http.server {port}"}]}
        assert agent.deploy(spec).returncode == 0

        def exits_naming_port() -> list[dict]:
            events = agent.api("GET", f"/v1/events?service={name}&follow=false").text
            return [event for event in map(json.loads, events.splitlines())
                    if event["kind"] == "Exited" and "given to the command as PORT" in event["message"]]

        seen = wait_state(agent, name, lambda s: s["ready"] == 1 and exits_naming_port(), 120,
                          "one instance Ready, the other's exit naming PORT")
        ready = [inst["id"] for inst in seen["instances"] if inst["ready"]]
        assert all(event["instance"] not in ready for event in exits_naming_port())
    finally:
        try:
            agent.remove_all(docker_client)
        finally:
            agent.stop()
