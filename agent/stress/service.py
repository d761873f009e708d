"""Where `berth stress` sends, and what it reads from the service side while it does.

TARGET is a URL (sent as is; no service-side data) or a service or group name, looked up on
the agent as the other client commands find it. A service is sent to through the node
gateway (`gateway_url` of `GET /v1/services/NAME`, path `/api/predict/NAME`); without a
gateway, round-robin over its Ready `endpoints`, refreshed every 100 ms. Meanwhile a sampler
reads, every second, the instances from the agent and each Ready instance's admin /metrics:
the proxy's in-flight requests and requests answered, and vLLM's running and waiting.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from bootstrap.errors import CommandFailed, UsageError

SAMPLE_PERIOD_S = 1.0
# Admin /metrics series -> the sample's key (summed over label sets, e.g. vLLM's per-model series).
SERIES = {"berth_inflight_requests": "inflight", "berth_requests_total": "requests",
          "vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting"}


@dataclass
class Target:
    label: str  # what the report calls it
    urls: Callable[[], list[str]]  # base URLs to send to (picklable: --workers processes call it)
    route: str  # how requests reach it, in words
    services: list[str] = field(default_factory=list)  # whose instances the sampler reads (none for a URL)
    client: Any = None  # the agent's client (None for a URL)
    default_path: str = "/"  # without --data/--openai: GET this (a URL target's own path is its prefix)


def resolve(target: str, agent_url: str | None, state_dir: str | None) -> Target:
    if target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        if not parts.hostname:
            raise UsageError(f"TARGET {target!r}: the URL names no host")
        prefix = parts.path.rstrip("/")
        default_path = ("" if prefix else "/") + (f"?{parts.query}" if parts.query else "")
        return Target(target, partial(_static, [f"{parts.scheme}://{parts.netloc}{prefix}"]), f"the URL {target}",
                      default_path=default_path)
    if "://" in target:
        raise UsageError(f"TARGET {target!r}: give an http:// or https:// URL, or a service or group name")
    from agent.client import AgentClient, ApiError, find_token

    client = AgentClient(agent_url, find_token(state_dir))
    try:
        view = client.call("GET", f"/v1/services/{quote(target)}")
        members = [target]
    except ApiError as exc:
        if exc.status != 404:
            raise CommandFailed(f"the agent answered {exc}") from None
        view, members = _group(client, target)
    gateway = view.get("gateway_url")  # the service's own address on the gateway: GATEWAY/api/predict/NAME
    if gateway:
        url = f"{gateway.split('/api/predict/')[0].rstrip('/')}/api/predict/{quote(target)}"  # a group's name for a group
        return Target(target, partial(_static, [url]), f"the gateway {url}", members, client)
    if members != [target]:
        raise CommandFailed(f"{target!r} is a group: its requests go through the gateway, and the agent names none "
                            "(start the agent with --gateway)")
    if not view.get("endpoints"):
        raise CommandFailed(f"service {target!r} has no Ready instance (berth get {target}) and no gateway to hold requests")
    return Target(target, partial(service_endpoints, client, target),
                  f"service {target}'s Ready endpoints (no gateway: refreshed every 100 ms)", members, client)


def _group(client, name: str) -> tuple[dict, list[str]]:
    from agent.client import ApiError

    try:
        group = client.call("GET", f"/v1/groups/{quote(name)}")
    except ApiError as exc:
        if exc.status == 404:
            raise UsageError(f"no service or group named {name!r} on the agent at {client.url} (berth ls)") from None
        raise CommandFailed(f"the agent answered {exc}") from None
    members = sorted({route["service"] for route in group.get("routes", []) if route.get("service")})
    if not members:
        raise CommandFailed(f"group {name!r} routes to no service")
    return client.call("GET", f"/v1/services/{quote(members[0])}"), members


def _static(urls: list[str]) -> list[str]:
    return urls


def service_endpoints(client, name: str) -> list[str]:
    return client.call("GET", f"/v1/services/{quote(name)}")["endpoints"]


def scrape(admin: str, timeout: float = 1.0) -> dict[str, float]:
    """The series of SERIES from an admin /metrics, summed over label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{admin}/metrics", timeout=timeout) as response:
        text = response.read().decode(errors="replace")
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = SERIES.get(sample.name)
            if key is not None:
                found[key] = found.get(key, 0.0) + sample.value
    if "inflight" in found:  # berth's proxy: no request counted yet is 0, not unknown
        found.setdefault("requests", 0.0)
    return found


class Sampler:
    """Every second, the service's instances and their admin /metrics, in a thread of its own."""

    def __init__(self, target: Target, origin: float) -> None:
        self.target = target
        self.origin = origin  # perf_counter of the run's start: samples' `t` counts from it
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="berth-stress-sampler", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def between(self, start_s: float, end_s: float) -> list[dict]:
        return [s for s in list(self.samples) if start_s <= s["t"] <= end_s]

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                self.samples.append(self.sample())
            except Exception:  # noqa: BLE001 - a slow or restarting agent costs a sample, not the run
                pass
            self._stop.wait(max(0.0, SAMPLE_PERIOD_S - (time.perf_counter() - began)))

    def sample(self) -> dict:
        t = time.perf_counter() - self.origin
        instances: dict[str, dict] = {}
        ready = total = 0
        for name in self.target.services:
            view = self.target.client.call("GET", f"/v1/services/{quote(name)}")
            for inst in view.get("instances", []):
                total += 1
                if not inst.get("ready"):
                    continue
                ready += 1
                figures: dict[str, float | None] = {"inflight": None, "requests": None, "running": None, "waiting": None}
                if inst.get("admin_endpoint"):
                    try:
                        figures.update(scrape(inst["admin_endpoint"]))
                    except OSError:
                        pass
                instances[f"{name}/{inst['id']}"] = figures
        return {"t": round(t, 3), "ready": ready, "total": total, "instances": instances}
