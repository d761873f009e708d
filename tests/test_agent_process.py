"""The `process` runtime: `berth boot` as local process groups, no engine; re-adopted after kill -9."""

from __future__ import annotations

import json

import psutil
import requests

from tests.harness.parts import free_port
from tests.harness.agent import Agent, unique, wait_state


def test_process_runtime_runs_readopts_and_stops(tmp_path):
    agent = Agent(tmp_path, runtime="process").start()
    name = unique("proc")
    port = free_port()
    spec = {"metadata": {"name": name, "eas": {"termination_grace_period": 10}},
            "containers": [{"image": "ignored", "command": f"python3 -m http.server {port} --bind 127.0.0.1", "port": port}]}
    try:
        result = agent.deploy(spec, "--wait", "--json")
        assert result.returncode == 0, result.stderr
        service = json.loads(result.stdout)
        assert service["runtime"] == "process"
        endpoint = service["instances"][0]["endpoint"]
        assert requests.get(endpoint + "/", timeout=5).status_code == 200
        (record_path,) = (agent.state_dir / "processes").glob(f"berth-{name}-0-*[!s].json")  # not the .status.json
        record = json.loads(record_path.read_text())
        assert psutil.Process(record["pid"]).is_running()

        clash = agent.deploy({**spec, "metadata": {"name": unique("clash")}})
        assert clash.returncode == 2 and f"app port {port} is already bound" in clash.stderr

        agent.kill9()
        agent = Agent(tmp_path, port=agent.port, runtime="process").start()
        after = wait_state(agent, name, lambda s: s["ready"] == 1, 30, "re-adoption")
        assert after["instances"][0]["restarts"] == 0 and after["instances"][0]["endpoint"] == endpoint
        assert json.loads(record_path.read_text())["pid"] == record["pid"]

        assert agent.cli("rm", name).returncode == 0
        assert not psutil.pid_exists(record["pid"]) or psutil.Process(record["pid"]).status() == psutil.STATUS_ZOMBIE
    finally:
        agent.stop()
