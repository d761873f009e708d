"""The agent under faults, with real parts: idle log followers, the state database, disk full,
half-made virtualenvs, `deploy --wait` of zero instances. The process runtime runs the
instances (real `berth boot` process groups); no engine is needed."""

from __future__ import annotations

import json
import signal
import threading
import time

import psutil
import requests

from tests.harness.agent import Agent, unique, wait_state
from tests.harness.parts import free_port, wait_until


def http_service(name: str, port: int | None = None, **metadata) -> dict:
    port = port or free_port()
    return {"metadata": {"name": name, "eas": {"termination_grace_period": 5}, **metadata},
            "containers": [{"image": "ignored", "command": f"python3 -m http.server {port} --bind 127.0.0.1", "port": port}]}


def test_twenty_idle_log_followers_starve_nothing_and_the_agent_exits_within_2_s(tmp_path):
    agent = Agent(tmp_path, runtime="process").start()
    name = unique("quiet")
    followers: list[requests.Response] = []
    try:
        assert agent.deploy(http_service(name), "--wait").returncode == 0
        token = (agent.state_dir / "token").read_text().strip()
        for _ in range(20):
            response = requests.get(f"{agent.url}/v1/services/{name}/logs?follow=true", stream=True, timeout=10,
                                    headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200
            followers.append(response)
        started = time.monotonic()
        node = agent.cli("node", "--json")
        assert node.returncode == 0, node.stderr
        second = agent.deploy(http_service(unique("beside")), "--wait", "--timeout", "60")
        assert second.returncode == 0, second.stderr
        assert time.monotonic() - started < 30
        agent.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        agent.process.wait(timeout=20)
        assert time.monotonic() - stopped < 2.0, "the agent took more than 2 s to exit with 20 idle followers"
    finally:
        for response in followers:
            response.close()
        _remove_everything(agent)


def _remove_everything(agent: Agent) -> None:
    """Start the agent again if needed, remove every service, stop it."""
    if agent.process.poll() is not None:
        agent.start()
    try:
        for svc in agent.api("GET", "/v1/services").json():
            agent.cli("rm", svc["name"])
    finally:
        agent.stop()
