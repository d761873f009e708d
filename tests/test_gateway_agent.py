"""The gateway the agent starts, on the process runtime with berth boot instances of a test app:
routes published and acknowledged, groups, the drain order under load, agent kill -9, hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

from tests.harness.agent import BERTH, Agent, unique, wait_state
from tests.harness.load import SteadyLoad
from tests.harness.parts import free_port, wait_until

SLOWAPP = Path(__file__).parent / "apps" / "slowapp.py"
# Instances run this checkout's berth boot (the process runtime's own venvs see the agent's installed berth).
ENV = {"BERTH_DRAIN_DELAY": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def app_spec(name: str, *, token: str | None = None, start_delay: float = 0, **metadata) -> dict:
    port = free_port()
    spec = {"metadata": {"name": name, "eas": {"termination_grace_period": 10}, **metadata},
            "containers": [{"image": "ignored", "port": port,
                            "command": f"{sys.executable} {SLOWAPP} --port {port} --start-delay {start_delay}"}]}
    if token:
        spec["token"] = token
    return spec


def test_gateway_routes_groups_drain_and_agent_restart(tmp_path):
    agent = Agent(tmp_path, runtime="process", gateway="127.0.0.1:0", gateway_admin="127.0.0.1:0", env=ENV).start()
    try:
        gateway = agent.gateway_url()
        pid = int((agent.state_dir / "gateway.pid").read_text())
        secret, two, three = unique("sec"), unique("two"), unique("three")
        result = agent.deploy(app_spec(secret, token="tok-123"), "--wait", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["gateway_url"] == f"{gateway}/api/predict/{secret}"
        for name in (two, three):
            assert agent.deploy(app_spec(name, group="chat"), "--wait").returncode == 0

        # token: 401 at the gateway, 200 with it (the route table reached the gateway)
        assert requests.get(f"{gateway}/api/predict/{secret}/whoami", timeout=10).status_code == 401
        assert requests.get(f"{gateway}/api/predict/{secret}/whoami", headers={"Authorization": "tok-123"}, timeout=10).status_code == 200
        assert "tok-123" not in requests.get(json.loads((agent.state_dir / "gateway.json").read_text())["admin_url"] + "/routes").text

        # names: a group may not take a service's name; routes name existing services
        clash = agent.cli("group", "apply", "-", stdin=json.dumps({"name": secret, "routes": [{"service": two}]}))
        assert clash.returncode == 2 and "name" in clash.stderr and "service's name" in clash.stderr
        unknown = agent.cli("group", "apply", "-", stdin=json.dumps({"name": "g2", "routes": [{"service": "nope"}]}))
        assert unknown.returncode == 2 and "routes[0].service" in unknown.stderr
        tokenless = agent.cli("group", "apply", "-", stdin=json.dumps({"name": "solo", "routes": [{"service": secret}]}))
        assert tokenless.returncode == 2 and "needs one of its own" in tokenless.stderr, tokenless.stderr
        solo = {"name": "solo", "token": "solo-token", "routes": [{"service": secret}]}
        assert agent.cli("group", "apply", "-", stdin=json.dumps(solo)).returncode == 0
        wait_until(lambda: requests.get(f"{gateway}/api/predict/solo/whoami", headers={"Authorization": "solo-token"},
                                        timeout=10).status_code == 200, 10, "the group served")
        assert agent.cli("group", "rm", "solo").returncode == 0
        wait_until(lambda: requests.get(f"{gateway}/api/predict/solo/whoami", timeout=10).status_code == 404, 10, "the group gone")
        assert agent.cli("group", "get", "solo").returncode != 0
        taken = agent.deploy(app_spec("chat"))
        assert taken.returncode == 2 and "metadata.name" in taken.stderr

        applied = agent.cli("group", "apply", "-", stdin=json.dumps(
            {"name": "chat", "routes": [{"service": two, "weight": 50}, {"service": three, "weight": 50}]}))
        assert applied.returncode == 0, applied.stderr
        table = agent.cli("group", "get", "chat")
        assert table.returncode == 0 and "CONFIGURED %" in table.stdout and two in table.stdout, table.stderr
        listed = agent.cli("group", "ls")
        assert listed.returncode == 0 and "chat" in listed.stdout, listed.stderr
        shown = json.loads(agent.cli("group", "get", "chat", "--json").stdout)
        assert shown["members"] == [two, three] and shown["configured_split_percent"] == {two: 50.0, three: 50.0}

        port_two = int(requests.get(f"{gateway}/api/predict/{two}/whoami", timeout=10).text)
        streamed: list[bytes] = []

        def stream() -> None:  # a long answer in flight across the removal, the agent's kill -9 and its restart
            with requests.get(f"{gateway}/api/predict/{two}/stream?n=14&gap=0.5", stream=True, timeout=30) as response:
                streamed.extend(line for line in response.iter_lines() if line.startswith(b"data:"))

        reader = threading.Thread(target=stream)
        reader.start()
        with SteadyLoad(lambda: [gateway], path="/api/predict/chat/whoami", rate_per_s=100, senders=4) as load:
            time.sleep(1.5)
            assert agent.cli("rm", three).returncode == 0  # drain order: out of the table before SIGTERM
            removed = time.monotonic()
            time.sleep(1.0)
            agent.kill9()
            time.sleep(1.5)  # the gateway serves on from its last table
            agent = Agent(tmp_path, port=agent.port, runtime="process", gateway="127.0.0.1:0", gateway_admin="127.0.0.1:0", env=ENV).start()
            time.sleep(1.5)
        reader.join(30)
        assert load.outcomes and not load.failures(), load.failures()[:5]
        assert len(streamed) == 15 and streamed[-1] == b"data: [DONE]", streamed
        assert {o.detail for o in load.outcomes if o.at > removed} == {str(port_two)}
        assert int((agent.state_dir / "gateway.pid").read_text()) == pid  # found again, not started twice
        assert agent.gateway_url() == gateway
        observed = json.loads(agent.cli("group", "get", "chat", "--json").stdout)["observed_split_percent"]
        assert observed.get(two, 0) > 50, observed  # the last minute's answers, as the gateway saw them

        # hold: a request for a service still starting is answered once it is Ready
        held = unique("held")
        assert agent.deploy(app_spec(held, start_delay=2)).returncode == 0
        started = time.monotonic()
        answer = requests.get(f"{gateway}/api/predict/{held}/", timeout=60)
        assert answer.status_code == 200 and answer.text == "ok", answer.text
        assert time.monotonic() - started > 0.5
        node = json.loads(agent.cli("node", "--json").stdout)
        assert node["gateway"]["url"] == gateway and node["gateway"]["acked_version"] > 0
    finally:
        try:
            agent.remove_all(None)
        finally:
            agent.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_an_external_gateway_started_after_the_agent_serves_and_is_shown(tmp_path):
    """systemd's order: the agent (`--gateway external`) first, then berth-gateway.service's
    command; the agent starts none, learns the gateway's address from it, and `berth gateway
    stop` ends it at once (while its parent, here the test, has not yet collected it)."""
    agent = Agent(tmp_path, runtime="process", gateway="external", env=ENV).start()
    gateway = None
    try:
        name = unique("ext")
        assert agent.deploy(app_spec(name, token="ext-token"), "--wait").returncode == 0
        assert not (agent.state_dir / "gateway.pid").exists()  # the agent started no gateway
        assert json.loads(agent.cli("get", name, "--json").stdout)["gateway_url"] is None  # none known yet
        log = open(tmp_path / "external-gateway.log", "ab")
        gateway = subprocess.Popen([*BERTH, "gateway", "--agent", agent.url, "--token-file", str(agent.state_dir / "token"),
                                    "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", str(agent.state_dir)],
                                   stdout=log, stderr=log)
        wait_until(lambda: json.loads(agent.cli("get", name, "--json").stdout)["gateway_url"] is not None, 30,
                   "the agent knows the external gateway")
        url = json.loads(agent.cli("get", name, "--json").stdout)["gateway_url"]
        assert url == f"{agent.gateway_url()}/api/predict/{name}"
        answer = requests.get(f"{url}/whoami", headers={"Authorization": "Bearer ext-token"}, timeout=10)
        assert answer.status_code == 200, answer.text
        node = json.loads(agent.cli("node", "--json").stdout)["gateway"]
        assert node["mode"] == "external" and node["url"] == agent.gateway_url() and node["acked_version"] > 0
        assert int((agent.state_dir / "gateway.pid").read_text()) == gateway.pid
        began = time.monotonic()
        stopped = agent.cli("gateway", "stop", "--state-dir", str(agent.state_dir))
        assert stopped.returncode == 0, stopped.stderr
        assert time.monotonic() - began < 10  # not its 35 s SIGKILL timeout
        assert gateway.wait(timeout=5) == 0 and not (agent.state_dir / "gateway.pid").exists()
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.kill()
            gateway.wait()
        try:
            agent.remove_all(None)
        finally:
            agent.stop()


def test_a_stale_pidfile_naming_another_process_is_not_taken_for_the_gateway(tmp_path):
    """After a reboot the pidfile's PID may belong to anything: the agent starts its own gateway
    and leaves that process alone."""
    other = subprocess.Popen(["sleep", "120"])
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / "gateway.pid").write_text(f"{other.pid}\n")
        (state / "gateway.json").write_text(json.dumps({"pid": other.pid, "url": "http://127.0.0.1:1", "admin_url": "http://127.0.0.1:2"}))
        agent = Agent(tmp_path, runtime="process", gateway="127.0.0.1:0", gateway_admin="127.0.0.1:0", env=ENV).start()
        try:
            pid = int((state / "gateway.pid").read_text())
            assert pid != other.pid and "gateway" in psutil.Process(pid).cmdline()
            node = json.loads(agent.cli("node", "--json").stdout)["gateway"]
            assert node["url"] == agent.gateway_url() != "http://127.0.0.1:1"
            missing = requests.get(f"{node['url']}/api/predict/nothing-here", timeout=10)
            assert missing.status_code == 404 and "nothing-here" in missing.json()["error"]
        finally:
            agent.stop()
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()


def test_a_gateway_that_does_not_acknowledge_holds_a_removal_at_most_2_s(tmp_path):
    agent = Agent(tmp_path, runtime="process", gateway="127.0.0.1:0", gateway_admin="127.0.0.1:0", env=ENV).start()
    pid = int((agent.state_dir / "gateway.pid").read_text())
    try:
        name = unique("noack")
        assert agent.deploy(app_spec(name), "--wait").returncode == 0
        wait_until(lambda: json.loads(agent.cli("node", "--json").stdout)["gateway"]["acked_version"] > 0, 10, "an ack")
        os.kill(pid, signal.SIGSTOP)  # follows the routes (its stream is open) but acknowledges nothing
        try:
            began = time.monotonic()
            removed = agent.cli("rm", name)
            took = time.monotonic() - began
        finally:
            os.kill(pid, signal.SIGCONT)
        assert removed.returncode == 0, removed.stderr
        assert 2.0 <= took < 10, took  # the 2 s wait for the ack, then the stop as usual
        assert "did not acknowledge routes version" in (tmp_path / "agent.log").read_text()
    finally:
        try:
            agent.remove_all(None)
        finally:
            agent.stop()


def test_gateway_off_starts_nothing(tmp_path):
    agent = Agent(tmp_path, runtime="process", gateway="off", env=ENV).start()
    try:
        name = unique("plain")
        result = agent.deploy(app_spec(name), "--wait", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["gateway_url"] is None
        assert not (agent.state_dir / "gateway.pid").exists()
        table = agent.api("GET", "/v1/routes").json()
        assert table["services"][name]["instances"][0]["url"].startswith("http://127.0.0.1:")
    finally:
        try:
            agent.remove_all(None)
        finally:
            agent.stop()


def test_route_stream_and_ack(tmp_path):
    """The agent's side alone: a watcher gets a new whole table per change and acknowledges it."""
    agent = Agent(tmp_path, runtime="process", gateway="off", env=ENV).start()
    tables: list[dict] = []
    token = (agent.state_dir / "token").read_text().strip()

    def watch() -> None:
        with requests.get(agent.url + "/v1/routes?watch=1", headers={"Authorization": f"Bearer {token}"}, stream=True,
                          timeout=30) as response:
            for line in response.iter_lines():
                if line:
                    tables.append(json.loads(line))
                    requests.post(agent.url + "/v1/gateway/ack", json={"version": tables[-1]["version"]},
                                  headers={"Authorization": f"Bearer {token}"}, timeout=5)
                    if any(t["services"].get("w", {}).get("instances") for t in tables) and not tables[-1]["services"].get("w"):
                        return

    thread = threading.Thread(target=watch, daemon=True)
    try:
        thread.start()
        assert agent.deploy(app_spec("w"), "--wait").returncode == 0
        wait_state(agent, "w", lambda s: s["ready"] == 1)
        assert agent.cli("rm", "w").returncode == 0
        thread.join(20)
        versions = [t["version"] for t in tables]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        assert agent.api("POST", "/v1/gateway/ack", json={"version": "x"}).status_code == 422
        assert agent.api("GET", "/v1/node").json()["gateway"]["acked_version"] == versions[-1]
    finally:
        try:
            agent.remove_all(None)
        finally:
            agent.stop()


def test_two_instances_under_the_process_runtime_each_on_its_own_port(tmp_path):
    agent = Agent(tmp_path, runtime="process", gateway="127.0.0.1:0", gateway_admin="127.0.0.1:0", env=ENV).start()
    try:
        name = unique("pair")
        spec = app_spec(name, instance=2)
        spec_port = spec["containers"][0]["port"]
        spec["containers"][0]["command"] = f"{sys.executable} {SLOWAPP} --port $PORT"
        result = agent.deploy(spec, "--wait", "--json")
        assert result.returncode == 0, result.stderr
        gateway = agent.gateway_url()
        session = requests.Session()
        ports = {int(session.get(f"{gateway}/api/predict/{name}/whoami", timeout=10).text) for _ in range(40)}
        assert len(ports) == 2 and spec_port in ports  # the first instance keeps the spec's port

    finally:
        try:
            agent.remove_all(None)
        finally:
            agent.stop()


def test_a_command_that_ignores_port_fails_its_second_instance_saying_so(tmp_path):
    """The command binds the spec's port whatever PORT says: one instance serves; the other
    (whichever lost the race for the port) fails, and its state, events and `berth get` say why."""
    agent = Agent(tmp_path, runtime="process", gateway="off", env=ENV).start()
    try:
        name = unique("hardport")
        spec = app_spec(name, instance=2)
        spec_port = spec["containers"][0]["port"]
        assert agent.deploy(spec).returncode == 0

        def settled(service: dict) -> bool:
            first, second = sorted(service["instances"], key=lambda inst: inst["id"])
            return first["ready"] and "PORT" in second["reason"]

        seen = wait_state(agent, name, settled, timeout=90, what="the first instance Ready, the second naming PORT")
        second = sorted(seen["instances"], key=lambda inst: inst["id"])[1]
        assert not second["ready"] and second["state"] != "Ready"
        message = second["last_exit"]["message"]
        assert "given to the command as PORT" in message and f"spec's port {spec_port}" in message, message
        shown = agent.cli("get", name)
        assert shown.returncode == 0 and "given to the command as PORT" in shown.stdout, shown.stdout
        events = agent.api("GET", f"/v1/events?service={name}&follow=false").text
        exits = [event for event in map(json.loads, events.splitlines()) if event["kind"] == "Exited" and event["instance"] == second["id"]]
        assert exits and "given to the command as PORT" in exits[-1]["message"], exits
    finally:
        try:
            agent.remove_all(None)
        finally:
            agent.stop()
