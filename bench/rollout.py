"""Rolling-update benchmark: `berth update` of a 2-instance service under steady load, and the
reaction time of disk-limit eviction.

Run from the repository root (needs dockerd; builds the python-inference test image if absent):

    .venv/bin/python -m bench.rollout [--rounds 3] [--rate 300] [--eviction-period 10]

Rollout: the suite's load client (tests/harness/load.py) sends `--rate` requests/s over the
service's current endpoints (from the agent, refreshed every 100 ms, a new connection each);
each round updates the service to a new revision (max_surge 1, max_unavailable 0, the
bootstrap's default 5 s drain delay) and reports failed requests, p99 latency during the
rollout against the 5 s before it, and the rollout's duration.
Eviction: a service writes 40 MiB past a 20 MiB system-disk limit just before it becomes
Ready; the reaction time is from Ready to the DiskLimitExceeded event, at the kubelet's 10 s
housekeeping period by default (anchors: "checked every 10 s").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker

from tests.harness.images import python_inference_image
from tests.harness.load import SteadyLoad, percentile
from tests.harness.parts import wait_until
from tests.test_agent_docker import Agent, service_spec
from tests.test_agent_rollout import versioned_spec


def rollout_round(agent: Agent, name: str, image: str, version: int, rate: float, folder: Path) -> dict:
    config = folder / f"v{version}.json"
    spec = versioned_spec(name, image, str(version))
    config.write_text(json.dumps(spec))
    with SteadyLoad(lambda: agent.service(name)["endpoints"], path="/version", rate_per_s=rate) as load:
        time.sleep(5)
        started = time.monotonic()
        result = agent.cli("update", name, str(config), "--wait")
        finished = time.monotonic()
        time.sleep(1)
    if result.returncode != 0:
        raise SystemExit(f"update failed: {result.stderr}")
    before = [o.latency_s for o in load.between(started - 5, started)]
    during = [o.latency_s for o in load.between(started, finished)]
    return {"requests": len(load.outcomes), "failed": len(load.failures()),
            "rate": len(load.between(started, finished)) / (finished - started),
            "p99_before_ms": 1000 * percentile(before, 0.99), "p99_during_ms": 1000 * percentile(during, 0.99),
            "duration_s": finished - started, "failures": [o.detail for o in load.failures()[:3]]}


def eviction_reaction(agent: Agent, image: str) -> float:
    name = f"bench-evict-{uuid.uuid4().hex[:6]}"
    spec = service_spec(name, image, command="dd if=/dev/zero of=/tmp/fill bs=1M count=40 status=none; "
                                             "exec python3 -m http.server 8000")
    spec["features"] = {"eas.aliyun.com/extra-ephemeral-storage": "20Mi"}
    agent.deploy(spec)
    events: list[dict] = []

    def evicted() -> bool:
        events[:] = [json.loads(line) for line in
                     agent.api("GET", f"/v1/events?service={name}&follow=false").text.splitlines()]
        return any(e["kind"] == "DiskLimitExceeded" for e in events)

    wait_until(evicted, 120, "eviction", interval=0.2)
    ready = next(e["at"] for e in events if e["kind"] == "Ready")
    reaction = next(e["at"] for e in events if e["kind"] == "DiskLimitExceeded") - ready
    agent.cli("rm", name)
    return reaction


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=300, help="requests per second (300)")
    parser.add_argument("--eviction-period", type=float, default=10, help="eviction_period_s (10, the kubelet's)")
    parser.add_argument("--evictions", type=int, default=3)
    args = parser.parse_args()
    client = docker.from_env()
    image = python_inference_image(client)
    with tempfile.TemporaryDirectory(prefix="berth-bench-rollout-") as root:
        agent = Agent(Path(root))
        config = json.loads(agent.config_path.read_text())
        config["env"] = {}  # the bootstrap's default drain delay (5 s)
        config["timings"] = {**config["timings"], "eviction_period_s": args.eviction_period}
        agent.config_path.write_text(json.dumps(config))
        agent.start()
        try:
            name = f"bench-roll-{uuid.uuid4().hex[:6]}"
            first = versioned_spec(name, image, "0")
            if agent.deploy(first, "--wait").returncode != 0:
                raise SystemExit("deploy failed")
            rounds = [rollout_round(agent, name, image, n + 1, args.rate, Path(root)) for n in range(args.rounds)]
            for n, row in enumerate(rounds, 1):
                print(f"round {n}: {row['requests']} requests, {row['failed']} failed, {row['rate']:.0f} req/s during, "
                      f"p99 {row['p99_before_ms']:.1f} ms before / {row['p99_during_ms']:.1f} ms during "
                      f"({row['p99_during_ms'] / row['p99_before_ms']:.2f}x), rollout {row['duration_s']:.1f} s"
                      + (f"; failures: {row['failures']}" if row["failures"] else ""))
            agent.cli("rm", name)
            reactions = [eviction_reaction(agent, image) for _ in range(args.evictions)]
            print(f"eviction reaction (Ready -> DiskLimitExceeded, period {args.eviction_period:.0f} s): "
                  + ", ".join(f"{r:.1f} s" for r in reactions) + f"; median {statistics.median(reactions):.1f} s")
            print(json.dumps({"rollouts": rounds, "eviction_reaction_s": reactions}), file=sys.stderr)
        finally:
            agent.remove_all(client)
            agent.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
