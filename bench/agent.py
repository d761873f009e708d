"""Agent benchmark: deploy-to-ready against plain `docker run` + a readiness poll, exit-detection
latency, and re-adoption time for many instances after `kill -9` of the agent.

Run from the repository root (needs dockerd; builds the python-inference test image if absent):

    .venv/bin/python -m bench.agent [--rounds 5] [--adopt 20]

Both sides run the same image and command (`berth boot -- python3 -m http.server 8000`);
the baseline polls /ready every 10 ms (tighter than the agent's 100 ms start probe), so the
ratio is what the agent's API, pull check, create and probing cost on top of Docker itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import docker
import requests

from tests.harness.images import python_inference_image
from tests.harness.parts import free_port, wait_until

COMMAND = "python3 -m http.server 8000"
TIMINGS = {"backoff_initial_s": 0.2, "backoff_max_s": 0.2, "probe_period_s": 1, "stray_grace_s": 3600}


class Agent:
    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        (root / "agent.json").write_text(json.dumps({
            "listen": f"127.0.0.1:{port}", "state_dir": str(root / "state"), "cache_dir": str(root / "cache"),
            "runtime": "docker", "env": {"BERTH_DRAIN_DELAY": "0"}, "timings": TIMINGS,
        }))
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> float:
        """Start the agent; seconds until its API answers."""
        started = time.monotonic()
        log = open(self.root / "agent.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "bootstrap.cli", "agent", "--config", str(self.root / "agent.json")],
                                        stdout=log, stderr=log, start_new_session=True)
        wait_until(self._healthy, 60, "agent start", interval=0.01)
        self.token = (self.root / "state" / "token").read_text().strip()
        return time.monotonic() - started

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                return True
        except OSError:
            return False

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=60, **kwargs)

    def wait_event(self, service: str, kind: str, since: int) -> dict:
        with self.api("GET", f"/v1/events?service={service}&since={since}&follow=true", stream=True) as response:
            for line in response.iter_lines():
                event = json.loads(line)
                if event["kind"] == kind:
                    return event
        raise RuntimeError(f"event stream ended before {kind}")

    def last_event_id(self) -> int:
        events = self.api("GET", "/v1/events?follow=false").text.splitlines()
        return json.loads(events[-1])["id"] if events else 0

    def remove(self, name: str) -> None:
        self.api("DELETE", f"/v1/services/{name}")
        wait_until(lambda: self.api("GET", f"/v1/services/{name}").status_code == 404, 120, "removal", interval=0.1)

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def spec(name: str, image: str, instances: int = 1) -> dict:
    return {"metadata": {"name": name, "instance": instances}, "containers": [{"image": image, "command": COMMAND}]}


def docker_run_to_ready(image: str) -> float:
    name = f"bench-plain-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    container = subprocess.run(
        ["docker", "run", "-d", "--name", name, "-p", "127.0.0.1::8080", "-p", "127.0.0.1::9090",
         "-e", "BERTH_SPEC=" + json.dumps(spec("plain", image)),
         image, "--", "sh", "-c", COMMAND],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    port = subprocess.run(["docker", "port", container, "9090/tcp"], check=True, capture_output=True, text=True).stdout
    admin = f"http://{port.splitlines()[0].strip()}/ready"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(admin, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    wait_until(ready, 120, "plain container ready", interval=0.01)
    took = time.monotonic() - started
    subprocess.run(["docker", "rm", "-f", container], check=True, capture_output=True)
    return took


def agent_deploy_to_ready(agent: Agent, image: str) -> float:
    name = f"bench-{uuid.uuid4().hex[:6]}"
    since = agent.last_event_id()
    started = time.monotonic()
    response = agent.api("POST", "/v1/services", data=json.dumps(spec(name, image)))
    response.raise_for_status()
    agent.wait_event(name, "Ready", since)
    took = time.monotonic() - started
    agent.remove(name)
    return took


def exit_detection(agent: Agent, image: str, client: docker.DockerClient, rounds: int) -> list[float]:
    name = f"bench-exit-{uuid.uuid4().hex[:6]}"
    since = agent.last_event_id()
    agent.api("POST", "/v1/services", data=json.dumps(spec(name, image))).raise_for_status()
    agent.wait_event(name, "Ready", since)
    latencies = []
    for _ in range(rounds):
        since = agent.last_event_id()
        container_id = agent.api("GET", f"/v1/services/{name}").json()["instances"][0]["runtime_id"]
        killed = time.time()
        client.api.kill(container_id)
        exited = agent.wait_event(name, "Exited", since)
        latencies.append(exited["at"] - killed)
        agent.wait_event(name, "Ready", exited["id"])
    agent.remove(name)
    return latencies


def readoption(agent: Agent, image: str, instances: int) -> tuple[float, float, float]:
    name = f"bench-adopt-{uuid.uuid4().hex[:6]}"
    agent.api("POST", "/v1/services", data=json.dumps(spec(name, image, instances))).raise_for_status()
    started = time.monotonic()
    wait_until(lambda: agent.api("GET", f"/v1/services/{name}").json()["ready"] == instances, 600, "all ready", interval=0.2)
    first_start = time.monotonic() - started
    agent.kill9()
    restarted = time.monotonic()
    api_up = agent.start()
    wait_until(lambda: agent.api("GET", f"/v1/services/{name}").json()["ready"] == instances, 120, "re-adopted",
               interval=0.02)
    all_ready = time.monotonic() - restarted
    restarts = sum(i["restarts"] for i in agent.api("GET", f"/v1/services/{name}").json()["instances"])
    assert restarts == 0, "re-adoption restarted instances"
    agent.remove(name)
    return first_start, api_up, all_ready


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--adopt", type=int, default=20, help="instances for the re-adoption measurement")
    args = parser.parse_args()
    client = docker.from_env(timeout=300)
    image = python_inference_image(client)
    root = Path(tempfile.mkdtemp(prefix="berth-bench-agent-"))
    agent = Agent(root, free_port())
    agent.start()
    try:
        docker_run_to_ready(image)  # warm caches on both paths before measuring
        agent_deploy_to_ready(agent, image)
        plain, berth = [], []
        for _ in range(args.rounds):  # alternating, so drift on a shared machine hits both alike
            plain.append(docker_run_to_ready(image))
            berth.append(agent_deploy_to_ready(agent, image))
        p, b = statistics.median(plain), statistics.median(berth)
        print(f"deploy-to-ready, median of {args.rounds}: docker run + poll {p:.3f} s, berth agent {b:.3f} s, "
              f"ratio {b / p:.2f} (target <= 1.2)")
        print(f"  docker run: {', '.join(f'{x:.3f}' for x in plain)}")
        print(f"  berth:      {', '.join(f'{x:.3f}' for x in berth)}")
        latencies = exit_detection(agent, image, client, args.rounds)
        print(f"exit detection (docker kill -> Exited event), median of {args.rounds}: "
              f"{1000 * statistics.median(latencies):.0f} ms, max {1000 * max(latencies):.0f} ms")
        first, api_up, all_ready = readoption(agent, image, args.adopt)
        print(f"re-adoption of {args.adopt} instances after kill -9: API up in {api_up:.2f} s, all {args.adopt} Ready "
              f"in {all_ready:.2f} s, 0 restarted (their first start took {first:.1f} s)")
    finally:
        agent.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
