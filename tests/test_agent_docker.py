"""`berth agent` end to end: a real agent process, the real Docker engine and registry, images
built from the test base with `berth boot` as their entrypoint, and the `berth` client commands.
Timings are shortened through the operator config file, as an operator would.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest
import requests

from tests.harness.agent import Agent, service_spec, unique, wait_state
from tests.harness.parts import wait_until

pytestmark = pytest.mark.docker

SIGTERM_APP = (
    "import http.server, os, signal\n"
    "def stop(*_):\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "    os.write(os.open('/mnt/out/sigterm', os.O_WRONLY | os.O_CREAT | os.O_APPEND), b'got SIGTERM')\n"
    "    os._exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "http.server.HTTPServer(('127.0.0.1', 8000), http.server.SimpleHTTPRequestHandler).serve_forever()\n"
)


@pytest.fixture(scope="module")
def agent(tmp_path_factory, docker_client, python_inference_image):
    root = tmp_path_factory.mktemp("agent")
    allowed = root / "allowed"
    allowed.mkdir()
    running = Agent(root, allow_host_paths=[str(allowed)]).start()
    running.allowed = allowed
    yield running
    try:
        running.remove_all(docker_client)
    finally:
        running.stop()


def test_two_instances_pulled_once_ready_and_answering_through_their_proxy_ports(agent, docker_client, registry,
                                                                                python_inference_image):
    # Through the registry: the image is pushed, then the local name dropped, so the agent must pull it.
    repository = f"{registry}/berth-test/agent-{uuid.uuid4().hex[:6]}"
    docker_client.images.get(python_inference_image).tag(repository, "1")
    docker_client.images.push(repository, "1")
    docker_client.images.remove(f"{repository}:1")
    name = unique("web")
    spec = service_spec(name, f"{repository}:1", instance=2)
    spec["token"] = "svc-token-never-shown"
    result = agent.deploy(spec, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    assert "Ready" in result.stderr and "ready in" in result.stderr  # progress was shown

    service = json.loads(result.stdout)
    assert service["runtime"] == "docker" and service["revision"].startswith("v1-")
    endpoints = {inst["endpoint"] for inst in service["instances"]}
    assert len(endpoints) == 2 and None not in endpoints
    for inst in service["instances"]:
        assert inst["state"] == "Ready" and inst["restarts"] == 0 and inst["gpus"] == []
        # The token is the proxy's: without it 401, with it the app answers through the proxy port.
        assert requests.get(inst["endpoint"] + "/", timeout=5).status_code == 401
        answer = requests.get(inst["endpoint"] + "/", headers={"Authorization": "svc-token-never-shown"}, timeout=5)
        assert answer.status_code == 200 and "Directory listing" in answer.text

    events = agent.api("GET", f"/v1/events?service={name}&follow=false").text
    assert events.count('"kind": "Pulling"') >= 2 and "joined a pull of this image already under way" in events

    containers = docker_client.containers.list(filters={"label": f"berth.service={name}"})
    assert len(containers) == 2
    for container in containers:
        labels = container.labels
        assert labels["berth.revision"] == service["revision"] and labels["berth.grace"] == "20"
        assert labels["berth.instance"] in ("0", "1") and labels["berth.gpus"] == ""
        config = container.attrs
        assert config["HostConfig"]["RestartPolicy"]["Name"] == "no" and config["Config"]["StopTimeout"] == 20
        assert "svc-token-never-shown" not in json.dumps([config["Config"]["Env"], labels])
    listing = agent.cli("get", name)
    assert "svc-token-never-shown" not in listing.stdout and service["instances"][0]["endpoint"] in listing.stdout


def test_rm_stops_with_sigterm_first(agent, python_inference_image):
    name = unique("term")
    out = agent.allowed / name
    out.mkdir()
    spec = service_spec(name, python_inference_image, command="python3 /mnt/out/app.py")
    (out / "app.py").write_text(SIGTERM_APP)
    spec["storage"] = [{"mount_path": "/mnt/out", "local": {"path": str(out), "readOnly": False}}]
    assert agent.deploy(spec, "--wait").returncode == 0
    started = time.monotonic()
    result = agent.cli("rm", name)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert (out / "sigterm").read_text().startswith("got SIGTERM")
    assert took < 15, f"rm took {took:.1f} s: the app had to be killed, not stopped"  # grace is 20 s
    assert agent.api("GET", f"/v1/services/{name}").status_code == 404


def test_crashing_command_backs_off_doubling_to_the_cap(agent, python_inference_image):
    name, blocked = unique("crash"), unique("blocked")
    agent.deploy(service_spec(name, python_inference_image, command="echo about to fail; exit 7"))
    spec = service_spec(blocked, python_inference_image, command="exit 7")
    spec["runtime"] = {"enable_crash_block": True}
    agent.deploy(spec)
    wait_state(agent, name, lambda s: s["instances"][0]["restarts"] >= 4, 60, "four restarts")
    events = [json.loads(line) for line in agent.api("GET", f"/v1/events?service={name}&follow=false").text.splitlines()]
    exits = [e["at"] for e in events if e["kind"] == "Exited"]
    starts = [e["at"] for e in events if e["kind"] == "Started"]
    delays = [start - exited for exited, start in zip(exits, starts[1:])]
    # backoff 0.5 s doubling, capped at 2 s (the config); each restart no sooner than its delay.
    for delay, expected in zip(delays, [0.5, 1, 2, 2]):
        assert expected * 0.9 <= delay <= expected + 1.5, delays
    inst = agent.service(name)["instances"][0]
    assert inst["last_exit"]["code"] == 7 and inst["last_exit"]["reason"] == "Error"
    assert "about to fail" in "\n".join(inst["last_exit"]["log_tail"])
    # The last ended run's logs are kept; the current run may not have printed yet (it restarts in ms).
    assert "about to fail" in agent.cli("logs", name, "--previous").stdout
    wait_until(lambda: "about to fail" in agent.cli("logs", name).stdout, 10, "the current run's logs")
    assert f'berth_agent_restarts_total{{service="{name}"}}' in agent.api("GET", "/metrics").text
    failed = wait_state(agent, blocked, lambda s: s["instances"][0]["state"] == "Failed", 30, "crash block")
    assert failed["instances"][0]["restarts"] == 0 and "enable_crash_block" in failed["instances"][0]["reason"]
    fail = agent.deploy(service_spec(unique("waitfail"), python_inference_image, command="exit 5"), "--wait")
    assert fail.returncode == 1 and "exit code 5" in fail.stderr


def test_shm_size_and_memory_limit_are_visible_inside(agent, docker_client, python_inference_image):
    name = unique("limits")
    result = agent.deploy(service_spec(name, python_inference_image, memory=300, shm_size=0.5, cpu=1.5), "--wait")
    assert result.returncode == 0, result.stderr
    container = docker_client.containers.get(agent.service(name)["instances"][0]["runtime_id"])
    shm = container.exec_run(["df", "-k", "/dev/shm"]).output.decode().splitlines()[1].split()[1]
    assert int(shm) == 512 * 1024
    memory = container.exec_run(["sh", "-c", "cat /sys/fs/cgroup/memory.max 2>/dev/null || "
                                              "cat /sys/fs/cgroup/memory/memory.limit_in_bytes"]).output.decode().strip()
    assert int(memory) == 300 * 1024 * 1024
    assert container.attrs["HostConfig"]["NanoCpus"] == 1_500_000_000


def test_each_service_sees_only_its_own_part_of_the_node_cache(agent, docker_client, python_inference_image):
    mine, theirs = unique("cache-a"), unique("cache-b")
    for name in (mine, theirs):
        result = agent.deploy(service_spec(name, python_inference_image), "--wait")
        assert result.returncode == 0, result.stderr
    weights = agent.root / "cache" / "weights"
    (weights / "services" / theirs / "private.bin").write_bytes(b"their weights")
    container = docker_client.containers.get(agent.service(mine)["instances"][0]["runtime_id"])
    seen = container.exec_run(["sh", "-c", f"ls {weights}/services; ls {weights}/shared {agent.root}/cache/pip >/dev/null && echo pools-ok"])
    assert seen.exit_code == 0, seen.output
    assert seen.output.decode().split() == [mine, "pools-ok"]
    peek = container.exec_run(["cat", str(weights / "services" / theirs / "private.bin")])
    assert peek.exit_code != 0 and b"their weights" not in peek.output
    for name in (mine, theirs):
        agent.cli("rm", name)


def test_without_the_proxy_clients_reach_the_apps_own_port(agent, docker_client, python_inference_image):
    name = unique("direct")
    spec = service_spec(name, python_inference_image)
    spec["containers"][0]["proxy"] = False
    result = agent.deploy(spec, "--wait")
    assert result.returncode == 0, result.stderr
    instance = agent.service(name)["instances"][0]
    container = docker_client.containers.get(instance["runtime_id"])
    assert set(container.attrs["NetworkSettings"]["Ports"]) == {"8000/tcp", "9090/tcp"}  # no 8080: no proxy
    app_port = int(container.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"])
    assert instance["endpoint"] == f"http://127.0.0.1:{app_port}"
    with urllib.request.urlopen(instance["endpoint"] + "/", timeout=5) as response:
        assert response.status == 200 and b"Directory listing" in response.read()
    agent.cli("rm", name)


def test_bad_inputs_give_clear_errors_and_disturb_nothing(agent, python_inference_image, base_image, registry):
    name = unique("keep")
    assert agent.deploy(service_spec(name, python_inference_image), "--wait").returncode == 0
    before = agent.service(name)["instances"][0]

    missing = agent.deploy(service_spec(unique("noimage"), f"{registry}/berth-test/does-not-exist:1"), "--wait")
    assert missing.returncode == 1
    assert "does-not-exist" in missing.stderr and "ErrImagePull" in missing.stderr and "not found" in missing.stderr.lower()

    spec = service_spec(unique("hostpath"), python_inference_image)
    spec["storage"] = [{"mount_path": "/mnt/etc", "local": {"path": "/etc"}}]
    refused = agent.deploy(spec)
    assert refused.returncode == 2
    assert "storage[0].local.path" in refused.stderr and "--allow-host-path" in refused.stderr

    invalid = agent.deploy({"metadata": {"name": "x"}, "containers": [{"image": "a", "port": 8080}]})
    assert invalid.returncode == 2 and "containers[0].port" in invalid.stderr

    bad_token = agent.cli("ls", BERTH_TOKEN="not-the-token")
    assert bad_token.returncode == 1 and "refused the token" in bad_token.stderr
    assert requests.get(f"{agent.url}/v1/services", timeout=5).status_code == 401

    no_berth = agent.deploy(service_spec(unique("noberth"), base_image), "--wait")
    assert no_berth.returncode == 1 and "has no `berth` command" in no_berth.stderr and "bootstrap" in no_berth.stderr

    node = agent.cli("node")
    assert node.returncode == 0 and "runtime   docker" in node.stdout and python_inference_image in node.stdout

    after = agent.service(name)["instances"][0]
    assert after["state"] == "Ready" and after["runtime_id"] == before["runtime_id"] and after["restarts"] == 0


def test_agent_killed_and_restarted_readopts_without_restarting(tmp_path, docker_client, python_inference_image):
    first = Agent(tmp_path).start()
    name = unique("adopt")
    try:
        assert first.deploy(service_spec(name, python_inference_image, instance=2), "--wait").returncode == 0
        before = first.service(name)
        started = {c.id: c.attrs["State"]["StartedAt"] for c in docker_client.containers.list(filters={"label": f"berth.service={name}"})}
        first.kill9()
        second = Agent(tmp_path, port=first.port).start()
        after = wait_state(second, name, lambda s: s["ready"] == 2, 30, "re-adoption")
        assert after["revision"] == before["revision"] and after["spec"] == before["spec"]
        assert [i["runtime_id"] for i in after["instances"]] == [i["runtime_id"] for i in before["instances"]]
        assert all(i["restarts"] == 0 for i in after["instances"])
        now = {c.id: c.attrs["State"]["StartedAt"] for c in docker_client.containers.list(filters={"label": f"berth.service={name}"})}
        assert now == started  # same containers, never restarted
        assert "Adopted" in second.api("GET", f"/v1/events?service={name}&follow=false").text
        second.remove_all(docker_client)
    finally:
        first.stop()
        if "second" in locals():
            second.stop()
