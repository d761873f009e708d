"""A real `berth agent` process for tests: its own state directory, port and operator config
(short timings, as an operator would set them), and the `berth` client pointed at it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import requests

from tests.harness.parts import free_port, wait_until

BERTH = [sys.executable, "-m", "bootstrap.cli"]
TIMINGS = {"probe_period_s": 0.5, "backoff_initial_s": 0.5, "backoff_max_s": 2, "pull_retries": 1,
           "pull_retry_delay_s": 0.2, "stray_grace_s": 3600}

def _run_marker() -> dict[str, str]:
    return {"BERTH_TEST_RUN": os.environ["BERTH_TEST_RUN"]} if "BERTH_TEST_RUN" in os.environ else {}


class Agent:
    """One `berth agent` process with its own state directory, port and config file."""

    def __init__(self, root: Path, port: int | None = None, **config) -> None:
        self.root = root
        self.port = port or free_port()
        self.state_dir = root / "state"
        self.config_path = root / "agent.json"
        self.config_path.write_text(json.dumps({
            "listen": f"127.0.0.1:{self.port}", "state_dir": str(self.state_dir), "cache_dir": str(root / "cache"),
            "runtime": "docker", "timings": TIMINGS, "gateway": "off", **config,
            # The suite's marker reaches the instances too (the process runtime gives them a clean environment).
            "env": {"BERTH_DRAIN_DELAY": "0", **_run_marker(), **config.get("env", {})},
        }))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *flags: str, env: dict[str, str] | None = None) -> "Agent":
        log = open(self.root / "agent.log", "ab")
        self.process = subprocess.Popen([*BERTH, "agent", "--config", str(self.config_path), *flags], stdout=log, stderr=log,
                                        env={**os.environ, **(env or {})},
                                        start_new_session=True)
        wait_until(lambda: self._healthy() or self.process.poll() is not None, 30, "agent start")
        assert self.process.poll() is None, (self.root / "agent.log").read_text()[-3000:]
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        if (self.state_dir / "gateway.pid").exists():  # the gateway outlives its agent: stop it too
            subprocess.run([*BERTH, "gateway", "stop", "--state-dir", str(self.state_dir)], capture_output=True, timeout=60)

    def gateway_url(self) -> str:
        return json.loads((self.state_dir / "gateway.json").read_text())["url"]

    def cli(self, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
        environ = {**os.environ, "BERTH_AGENT_URL": self.url, "BERTH_STATE_DIR": str(self.state_dir), **env}
        if "BERTH_TOKEN" not in env:
            environ.pop("BERTH_TOKEN", None)
        return subprocess.run([*BERTH, *args], input=stdin, capture_output=True, text=True, env=environ, timeout=180)

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        token = (self.state_dir / "token").read_text().strip()
        return requests.request(method, self.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30, **kwargs)

    def service(self, name: str) -> dict:
        response = self.api("GET", f"/v1/services/{name}")
        assert response.status_code == 200, response.text
        return response.json()

    def deploy(self, spec: dict, *args: str) -> subprocess.CompletedProcess:
        return self.cli("deploy", "-", *args, stdin=json.dumps(spec))

    def remove_all(self, docker_client) -> None:
        for svc in self.api("GET", "/v1/services").json():
            self.api("DELETE", f"/v1/services/{svc['name']}")
        wait_until(lambda: not self.api("GET", "/v1/services").json(), 60, "services removed")


def service_spec(name: str, image: str, command: str = "python3 -m http.server 8000", **metadata) -> dict:
    return {"metadata": {"name": name, "eas": {"termination_grace_period": 20}, **metadata},
            "containers": [{"image": image, "command": command}]}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def wait_state(agent: Agent, name: str, check, timeout: float = 60, what: str = "state") -> dict:
    seen: dict = {}

    def done() -> bool:
        seen.update(agent.service(name))
        return check(seen)

    try:
        wait_until(done, timeout, what, interval=0.1)
    except TimeoutError:
        raise AssertionError(f"{what}: {json.dumps(seen, indent=1)[:3000]}") from None
    return seen
