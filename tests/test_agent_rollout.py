"""`berth update`: a rolling update of a 2-instance service under steady load fails no request and
ends on the new revision; a failing new revision pauses the rollout and `--rollback` restores
the old. A real agent, the real Docker engine, the suite's own load client (tests/harness/load.py).
"""

from __future__ import annotations

import json

import pytest

from tests.harness.load import SteadyLoad
from tests.harness.agent import Agent, unique

pytestmark = pytest.mark.docker

# The app serves its version as /version. The drain delay (the bootstrap's, 5 s by default; 1 s
# here, from the operator's env) covers a client whose endpoint list is up to 100 ms old; it fits in the grace period
# only when that exceeds the bootstrap's 10 s stop timeout (the default 30 s does).
VERSIONED_APP = "mkdir -p /srv && echo v$VERSION > /srv/version && cd /srv && exec python3 -m http.server 8000"


def versioned_spec(name: str, image: str, version: str, command: str = VERSIONED_APP) -> dict:
    return {"metadata": {"name": name, "instance": 2, "eas": {"termination_grace_period": 30},
                         "rolling_strategy": {"max_surge": 1, "max_unavailable": 0}},
            "containers": [{"image": image, "command": command,
                            "env": [{"name": "VERSION", "value": version}]}]}


@pytest.fixture(scope="module")
def agent(tmp_path_factory, docker_client, python_inference_image):
    running = Agent(tmp_path_factory.mktemp("rollout"), env={"BERTH_DRAIN_DELAY": "1"}).start()
    yield running
    try:
        running.remove_all(docker_client)
    finally:
        running.stop()


def test_rollout_under_load_fails_no_request_then_a_failing_revision_pauses_and_rollback_restores(agent, tmp_path,
                                                                                                  python_inference_image):
    name = unique("roll")
    assert agent.deploy(versioned_spec(name, python_inference_image, "1"), "--wait").returncode == 0
    before = agent.service(name)

    new_config = tmp_path / "v2.json"
    new_config.write_text(json.dumps(versioned_spec(name, python_inference_image, "2")))
    with SteadyLoad(lambda: agent.service(name)["endpoints"], path="/version", rate_per_s=250) as load:
        result = agent.cli("update", name, str(new_config), "--wait", "--json")
    assert result.returncode == 0, result.stderr
    served = [outcome.detail.strip() for outcome in load.outcomes]
    assert len(served) > 250 and not load.failures(), load.failures()[:5]
    assert served[0] == "v1" and served[-1] == "v2" and set(served) == {"v1", "v2"}

    after = json.loads(result.stdout)
    assert after["revision"] != before["revision"] and after["rollout"]["state"] == "Complete"
    assert [(i["revision"], i["state"]) for i in after["instances"]] == [(after["revision"], "Ready")] * 2
    assert len(set(after["endpoints"])) == 2 and not set(after["endpoints"]) & set(before["endpoints"])
    kinds = [e["kind"] for e in map(json.loads, agent.api("GET", f"/v1/events?service={name}&follow=false").text.splitlines())]
    # Each old instance is stopped only after a new one became Ready (surge 1, unavailable 0).
    updating = kinds.index("Updating")
    assert kinds[updating:].index("Ready") < kinds[updating:].index("Stopping")

    broken = tmp_path / "v3.json"
    broken.write_text(json.dumps(versioned_spec(name, python_inference_image, "3", command="echo bad config; exit 3")))
    paused = agent.cli("update", name, str(broken), "--wait")
    assert paused.returncode == 1 and "rollout paused" in paused.stderr and "exit code 3" in paused.stderr
    service = agent.service(name)
    assert service["rollout"]["state"] == "Paused" and "bad config" in service["rollout"]["reason"]
    # The old instances never stopped serving.
    assert [(i["runtime_id"], i["ready"]) for i in service["instances"]] == [(i["runtime_id"], True) for i in after["instances"]]

    rolled_back = agent.cli("update", "--rollback", name, "--wait", "--json")
    assert rolled_back.returncode == 0, rolled_back.stderr
    restored = json.loads(rolled_back.stdout)
    assert restored["revision"] == after["revision"] and restored["rollout"]["state"] == "Complete"
    assert [i["runtime_id"] for i in restored["instances"]] == [i["runtime_id"] for i in after["instances"]]

    again = agent.cli("update", "--rollback", name, "--wait")  # back to the newest other revision: the broken one
    assert again.returncode == 1 and "rollout paused" in again.stderr
    usage = agent.cli("update", name)
    assert usage.returncode == 2 and "--rollback" in usage.stderr
