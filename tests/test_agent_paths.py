"""`berth agent` paths that need a fault or a second part to be seen: registry credentials
(`dockerAuth`) against a registry that asks for them, the pull stall timeout behind a proxy
that stops forwarding, a restart on failed liveness, and the stray-container reaper.

One real agent for the module, its timings shortened through the operator config.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import time
import uuid

import pytest

from tests.harness.parts import unavailable, wait_until
from tests.harness.registry import AuthRegistry
from tests.harness.agent import TIMINGS, Agent, service_spec, unique, wait_state

pytestmark = pytest.mark.docker

STALL_S = 2
STRAY_GRACE_S = 6
PATH_TIMINGS = {**TIMINGS, "pull_stall_timeout_s": STALL_S, "pull_timeout_s": 120, "stray_grace_s": STRAY_GRACE_S,
                "reaper_period_s": 0.5}
USER, PASSWORD = "berth-puller", "registry-pw-never-shown"


@pytest.fixture(scope="module")
def agent(tmp_path_factory, docker_client, python_inference_image):
    running = Agent(tmp_path_factory.mktemp("agent-paths"), timings=PATH_TIMINGS).start()
    yield running
    try:
        running.remove_all(docker_client)
    finally:
        running.stop()


@pytest.fixture(scope="module")
def upstream_image(docker_client, registry, python_inference_image) -> str:
    """The inference image in the suite's registry, under this module's own repository path."""
    path = f"berth-test/paths-{uuid.uuid4().hex[:6]}"
    docker_client.images.get(python_inference_image).tag(f"{registry}/{path}", "1")
    docker_client.images.push(f"{registry}/{path}", "1")
    docker_client.images.remove(f"{registry}/{path}:1")
    return path


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory, registry):
    try:
        running = AuthRegistry(tmp_path_factory.mktemp("auth-registry"), registry, {USER: PASSWORD})
        address = running.start()
    except (ImportError, RuntimeError) as exc:
        unavailable("a registry that asks for credentials", str(exc))
    yield address
    running.stop()


def events(agent: Agent, name: str) -> list[dict]:
    text = agent.api("GET", f"/v1/events?service={name}&follow=false").text
    return [json.loads(line) for line in text.splitlines()]


def test_docker_auth_pulls_from_a_registry_that_asks_for_credentials_and_never_shows_them(
        agent, docker_client, auth_registry, upstream_image):
    image = f"{auth_registry}/{upstream_image}:1"
    wrong = base64.b64encode(f"{USER}:not-the-password".encode()).decode()
    right = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    names = []
    try:
        for auth, expected in ((None, "no basic auth credentials"), (wrong, "authentication required")):
            name = unique("noauth")
            names.append(name)
            spec = service_spec(name, image)
            if auth:
                spec["dockerAuth"] = auth
            failed = agent.deploy(spec, "--wait")
            assert failed.returncode == 1, failed.stderr
            assert image in failed.stderr and "ErrImagePull" in failed.stderr and expected in failed.stderr
            assert "dockerAuth" in failed.stderr  # says what to set
            inst = agent.service(name)["instances"][0]
            assert inst["state"] == "Failed"  # a credential problem is not retried forever

        name = unique("auth")
        names.append(name)
        spec = service_spec(name, image)
        spec["dockerAuth"] = right
        pulled = agent.deploy(spec, "--wait", "--json")
        assert pulled.returncode == 0, pulled.stderr
        assert json.loads(pulled.stdout)["instances"][0]["state"] == "Ready"
        docker_client.images.get(image)  # pulled from the registry that asked for credentials

        shown = [agent.cli("get", n, "--json").stdout for n in names] + [json.dumps(events(agent, n)) for n in names]
        shown += [agent.cli("ls").stdout, (agent.root / "agent.log").read_text()]
        for secret in (PASSWORD, right, wrong, "not-the-password"):
            assert not any(secret in text for text in shown), secret
    finally:
        for name in names:
            agent.cli("rm", name)
        try:
            docker_client.images.remove(image)
        except Exception:  # noqa: BLE001 - not pulled when the test failed before
            pass


def _image_with_a_layer_of_its_own(docker_client, base_image: str, size: int) -> str:
    """A new image on the base, with one layer of random bytes no other image has."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (("Dockerfile", f"FROM {base_image}\nCOPY blob /blob\n".encode()), ("blob", os.urandom(size))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    image, _ = docker_client.images.build(fileobj=context, custom_context=True, rm=True)
    return image.id


def test_a_stalled_pull_fails_after_the_stall_timeout_not_the_overall_one(
        agent, docker_client, registry, base_image, fault_proxy):
    path = f"berth-test/stall-{uuid.uuid4().hex[:6]}"
    image_id = _image_with_a_layer_of_its_own(docker_client, base_image, 4 << 20)
    docker_client.images.get(image_id).tag(f"{registry}/{path}", "1")
    docker_client.images.push(f"{registry}/{path}", "1")
    docker_client.images.remove(image_id, force=True)  # its own layer must now come through the proxy
    host, port = registry.split(":")
    proxy = fault_proxy(host, int(port))
    proxy.stall_after(256 << 10)  # past the manifest and config, inside the 4 MiB layer
    name = unique("stall")
    agent.deploy(service_spec(name, f"127.0.0.1:{proxy.port}/{path}:1"))
    stalled = wait_state(agent, name, lambda s: "pull_stall_timeout_s" in s["instances"][0]["reason"], 30, "stall")
    inst = stalled["instances"][0]
    assert inst["state"] == "BackOff" and "ErrImagePull" in inst["reason"], inst
    assert f"no progress for {STALL_S} s" in inst["reason"] and path in inst["reason"]
    assert proxy.stalled.is_set()
    seen = events(agent, name)
    began = next(e["at"] for e in seen if e["kind"] == "Pulling")
    first_stall = next(e["at"] for e in seen if e["kind"] == "Pulling" and "retry 1 of" in e["message"])
    # The first attempt gives up one stall timeout after its last progress, long before pull_timeout_s.
    assert STALL_S * 0.9 <= first_stall - began <= STALL_S + 3, seen
    agent.cli("rm", name)


def test_failed_liveness_restarts_the_instance(agent, docker_client, python_inference_image):
    name = unique("live")
    spec = service_spec(name, python_inference_image)
    spec["containers"][0]["liveness_check"] = {"exec": {"command": "test ! -e /tmp/sick"}, "period_seconds": 0.5,
                                               "failure_threshold": 2}
    assert agent.deploy(spec, "--wait").returncode == 0
    before = agent.service(name)["instances"][0]
    container = docker_client.containers.get(before["runtime_id"])
    assert container.exec_run(["touch", "/tmp/sick"]).exit_code == 0
    after = wait_state(agent, name, lambda s: s["instances"][0]["restarts"] == 1 and s["instances"][0]["state"] == "Ready",
                       60, "restart after failed liveness")["instances"][0]
    assert after["runtime_id"] != before["runtime_id"]  # a new container: /tmp/sick is gone with the old one
    assert after["last_exit"]["reason"] == "LivenessProbeFailed"
    liveness = [e for e in events(agent, name) if e["kind"] == "LivenessFailed"]
    assert len(liveness) == 1 and "liveness probe failed 2 times" in liveness[0]["message"]
    agent.cli("rm", name)


def test_stray_containers_are_removed_after_the_grace_and_not_before(agent, docker_client, base_image):
    def stray(service: str):
        labels = {"berth.service": service, "berth.instance": "0", "berth.revision": "v1-0000000000000000",
                  "berth.gpus": "", "berth.grace": "1", "berth.agent": str(agent.state_dir.resolve())}
        return docker_client.containers.run(base_image, ["sleep", "300"], labels=labels, detach=True)

    def exists(container) -> bool:
        return bool(docker_client.containers.list(all=True, filters={"id": container.id}))

    old = stray(unique("stray-old"))
    other_agent = docker_client.containers.run(base_image, ["sleep", "300"], detach=True, labels={
        "berth.service": unique("other-agent"), "berth.instance": "0", "berth.agent": "/var/lib/another-berth"})
    young = None
    try:
        time.sleep(STRAY_GRACE_S - 2)
        young = stray(unique("stray-young"))
        started = time.monotonic()
        wait_until(lambda: not exists(old), 10, "the old stray removed")
        assert time.monotonic() - started < STRAY_GRACE_S - 1, "removed only once the young one was past the grace"
        assert exists(young), "a stray inside the grace was removed"
        assert exists(other_agent), "another agent's container was taken for a stray"
        removed = [e for e in events(agent, old.labels["berth.service"]) if e["kind"] == "StrayRemoved"]
        assert len(removed) == 1 and old.id[:12] in removed[0]["message"]
    finally:
        for container in (old, young, other_agent):
            if container is not None and exists(container):
                container.remove(force=True)
