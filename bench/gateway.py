"""The node gateway against nginx, and a rollout through it against today's endpoint polling.

    .venv/bin/python -m bench.gateway [--seconds 10] [--rounds 3] [--rate 500] [--rollout-rate 300] [--part all]

One run, same machine, side by side, the targets alternating round by round, medians of the
rounds:

- Proxying: two nginx processes (1 worker each) return a constant; in front of both, nginx
  (1 worker, `least_conn`, keep-alive upstream) and `berth gateway --routes-file` (one process)
  serve the same path, /api/predict/c/. Added p50/p99 at a fixed rate from berth's load
  generator, open loop (bench/proxy.py's open_loop; latency from each scheduled send) against one backend direct; maximum
  rate from h2load over HTTP/1.1 with 64 connections, and each proxy's CPU per request.
- Rollout (needs dockerd; builds the python-inference test image if absent): a 2-instance
  service rolled to a new revision under `--rollout-rate` requests/s, alternating (a) through
  the gateway by a client that never refreshes (the agent's default 1 s drain delay with the
  gateway) and (b) today's client, which polls `berth get`'s endpoints every 100 ms, with the
  bootstrap's default 5 s drain delay. Failed requests and rollout seconds per instance.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from bench.proxy import NGINX_CONF, UPSTREAM_BODY as BACKEND, cpu_seconds, free_port, h2load_max, open_loop, percentile, wait_port

REPO = Path(__file__).resolve().parents[1]
PATH = "/api/predict/c/"
LEAST_CONN = """\
upstream app {{ least_conn; server 127.0.0.1:{a}; server 127.0.0.1:{b}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location /api/predict/c/ {{ proxy_pass http://app/; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}"""


def nginx(prefix: Path, name: str, body: str) -> subprocess.Popen:
    conf = prefix / f"{name}.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, name=name, body=body))
    return subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf)], stderr=subprocess.DEVNULL)


def routes_file(prefix: Path, a: int, b: int) -> Path:
    """`berth gateway --routes-file`'s table: service "c" on the backends at ports a and b."""
    routes = prefix / "routes.json"
    routes.write_text(json.dumps({"services": {"c": {"instances": [{"id": "a", "url": f"http://127.0.0.1:{a}"},
                                                                   {"id": "b", "url": f"http://127.0.0.1:{b}"}]}}}))
    return routes


def proxying(args: argparse.Namespace) -> list[str]:
    prefix = Path(tempfile.mkdtemp(prefix="berth-bench-gateway-"))
    a, b, front, gateway_port, admin_port = (free_port() for _ in range(5))
    processes = [nginx(prefix, "a", BACKEND.format(port=a)), nginx(prefix, "b", BACKEND.format(port=b)),
                 nginx(prefix, "front", LEAST_CONN.format(a=a, b=b, port=front))]
    routes = routes_file(prefix, a, b)
    try:
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "bootstrap.cli", "gateway", "--routes-file", str(routes), "--listen", f"127.0.0.1:{gateway_port}",
             "--admin", f"127.0.0.1:{admin_port}"], cwd=REPO, stderr=open(prefix / "gateway.log", "wb")))
        for port in (a, b, front, gateway_port):
            wait_port(port)
        front_worker = psutil.Process(processes[2].pid).children()[0].pid
        targets = {"direct (one backend)": (a, None), "nginx least_conn": (front, front_worker),
                   "berth gateway": (gateway_port, processes[3].pid)}
        lines = [f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; "
                 f"nginx 1 worker per process; {args.seconds:g} s per run, {args.rounds} rounds alternating", "",
                 f"| target at {args.rate:g} req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors | CPU us/req |",
                 "|---|---|---|---|---|---|---|"]
        p50s: dict[str, list[float]] = {name: [] for name in targets}
        p99s: dict[str, list[float]] = {name: [] for name in targets}
        errors = dict.fromkeys(targets, 0)
        cpu = dict.fromkeys(targets, 0.0)
        for _ in range(args.rounds):
            for name, (port, pid) in targets.items():
                before = cpu_seconds(pid) if pid else 0.0
                latencies, failed = open_loop(port, args.rate, args.seconds, PATH)
                cpu[name] += cpu_seconds(pid) - before if pid else 0.0
                p50s[name].append(percentile(latencies, 0.5))
                p99s[name].append(percentile(latencies, 0.99))
                errors[name] += failed
        base50, base99 = (statistics.median(p50s["direct (one backend)"]) * 1000, statistics.median(p99s["direct (one backend)"]) * 1000)
        for name, (_, pid) in targets.items():
            p50, p99 = statistics.median(p50s[name]) * 1000, statistics.median(p99s[name]) * 1000
            added = "- | -" if pid is None else f"{p50 - base50:.2f} | {p99 - base99:.2f}"
            per = f"{cpu[name] / (args.rate * args.seconds * args.rounds) * 1e6:.0f}" if pid else "-"
            lines.append(f"| {name} | {p50:.2f} | {p99:.2f} | {added} | {errors[name]} | {per} |")
        lines += ["", f"| target | max req/s (h2load, 64 conns, median of {args.rounds}) | each round | vs nginx | CPU us/req |",
                  "|---|---|---|---|---|"]
        runs: dict[str, list[tuple[float, float | None]]] = {"nginx least_conn": [], "berth gateway": []}
        for _ in range(args.rounds):
            for name in runs:
                port, pid = targets[name]
                runs[name].append(h2load_max(port, args.seconds, pid, PATH))
        nginx_max = statistics.median(rate for rate, _ in runs["nginx least_conn"])
        for name, measured in runs.items():
            rate = statistics.median(r for r, _ in measured)
            cpus = [c for _, c in measured if c is not None]
            lines.append(f"| {name} | {rate:.0f} | {', '.join(f'{r:.0f}' for r, _ in measured)} | {rate / nginx_max:.0%} | "
                         f"{statistics.median(cpus):.0f} |")
        lines.append(f"load average {os.getloadavg()[0]:.1f} at the end")
        return lines
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def rollout(args: argparse.Namespace) -> list[str]:
    import docker

    from tests.harness.agent import Agent
    from tests.harness.images import python_inference_image
    from tests.harness.load import SteadyLoad
    from tests.test_gateway_docker import versioned_spec

    image = python_inference_image(docker.from_env())
    rows = ["| client | round | requests | failed | rollout s | s per instance |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="berth-bench-gwroll-") as root:
        agent = Agent(Path(root), gateway="127.0.0.1:0", gateway_admin="127.0.0.1:0")
        config = json.loads(agent.config_path.read_text())
        config["env"] = {}  # the agent's defaults: drain delay 1 s with the gateway on
        agent.config_path.write_text(json.dumps(config))
        agent.start()
        name = f"bench-gw-{uuid.uuid4().hex[:6]}"
        try:
            deployed = agent.deploy(versioned_spec(name, image, "0"), "--wait")
            if deployed.returncode != 0:
                raise SystemExit(f"deploy failed: {deployed.stderr}")
            gateway = agent.gateway_url()
            version = 0
            for round_number in range(1, args.rounds + 1):
                for client in ("gateway, never refreshes", "endpoint polling every 100 ms"):
                    version += 1
                    spec = versioned_spec(name, image, str(version))
                    if client.startswith("endpoint"):  # today's setup: the bootstrap's default drain delay
                        spec["containers"][0]["env"].append({"name": "BERTH_DRAIN_DELAY", "value": "5"})
                    path = Path(root) / f"v{version}.json"
                    path.write_text(json.dumps(spec))
                    if client.startswith("gateway"):
                        load = SteadyLoad(lambda: [gateway], path=f"/api/predict/{name}/version", rate_per_s=args.rollout_rate)
                    else:
                        load = SteadyLoad(lambda: agent.service(name)["endpoints"], path="/version", rate_per_s=args.rollout_rate)
                    with load:
                        time.sleep(2)
                        started = time.monotonic()
                        result = agent.cli("update", name, str(path), "--wait")
                        took = time.monotonic() - started
                        time.sleep(1)
                    if result.returncode != 0:
                        raise SystemExit(f"update failed: {result.stderr}")
                    rows.append(f"| {client} | {round_number} | {len(load.outcomes)} | {len(load.failures())} | {took:.1f} | "
                                f"{took / 2:.1f} |")
        finally:
            agent.cli("rm", name)
            agent.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500, help="the fixed rate for added latency (500)")
    parser.add_argument("--rollout-rate", type=float, default=300)
    parser.add_argument("--part", choices=["all", "proxying", "rollout"], default="all",
                        help="proxying needs nginx and h2load; rollout needs dockerd (default: both)")
    args = parser.parse_args()
    if args.part in ("all", "proxying"):
        print("\n".join(proxying(args)), flush=True)
    if args.part in ("all", "rollout"):
        print("\n".join(["", *rollout(args)]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
