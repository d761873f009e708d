"""Autoscaling benchmark: reaction to a load step, failed requests across scale-in, and the
first response from zero against the instance's own cold start.

Run from the repository root (no Docker needed: the agent's process runtime):

    .venv/bin/python -m bench.autoscale [--rounds 3] [--period 2] [--window 30] [--step-via gateway|instances]

A `berth agent` (process runtime, `autoscale_period_s` --period, `metric_window_s` --window, its
node gateway on) runs tests/apps/scaleapp.py behind `berth boot`: concurrency strategy, threshold
2 per instance, min 1, max 4, scale-down window 10 s. Each round:
- step: 8 clients each keep one request (/work?s=0.5) in flight, through the gateway (the
  autoscaler reads the gateway's counts) or, with --step-via instances, straight to each Ready
  instance on a second agent with its gateway off (the autoscaler sums the instances' proxies);
  times from the step to the first ScaledUp event, to the decision reaching 4, and to 4
  instances Ready;
- scale-in: the clients stop, a light load (40 req/s on /) runs the same way until the service
  is back at 1 instance; its failed requests are counted (target 0);
- from zero: a min-0 service (grace 2 s) goes Idle; then ONE plain request to
  GATEWAY/api/predict/NAME/ is timed from send to answer (the gateway holds it, wakes the
  service and forwards it once an instance is Ready) and set against the same instance's own
  launch-to-Ready (cold_start.ready_s) and the answer's X-Berth-Cold-Start; the agent's events
  split it: send to Activated (the wake call), Activated to Starting (the reconcile loop and the
  launch), Ready to answer (the gateway learning the Ready instance, the forward, the app).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import requests

from tests.harness.agent import Agent, unique
from tests.harness.load import SteadyLoad
from tests.harness.parts import wait_until
from tests.test_autoscaling import autoscaler, events, ready_count, scaled_spec, start_agent


def event_at(agent: Agent, name: str, kind: str, after: float, contains: str = "") -> float | None:
    for event in events(agent, name):
        if event["kind"] == kind and event["at"] >= after and contains in event["message"]:
            return event["at"]
    return None


def step_round(agent: Agent, via_gateway: bool) -> dict:
    name = unique("bench-step")
    if agent.deploy(scaled_spec(name, autoscaler("concurrency", 2, high=4, down_s=10)), "--wait").returncode != 0:
        raise SystemExit("deploy failed")
    time.sleep(3)  # a few quiet samples in the window, as a service idling before its load
    if via_gateway:
        through = f"{agent.gateway_url()}/api/predict/{name}"
        endpoints = lambda: [through]  # noqa: E731
    else:
        endpoints = lambda: agent.service(name)["endpoints"]  # noqa: E731
    with SteadyLoad(endpoints, path="/work?s=0.5", rate_per_s=1000, senders=8) as load:
        stepped = time.time()
        ready_count(agent, name, 4, 180)
        ready = time.time()
    first = event_at(agent, name, "ScaledUp", stepped)
    to_four = event_at(agent, name, "ScaledUp", stepped, "-> 4 ")
    with SteadyLoad(endpoints, path="/", rate_per_s=40, senders=2) as light:
        started = time.time()
        ready_count(agent, name, 1, 180)
        scaled_in = time.time() - started
        time.sleep(1)
    agent.cli("rm", name)
    return {"first_decision_s": first - stepped, "decision_4_s": to_four - stepped, "ready_4_s": ready - stepped,
            "step_failed": len(load.failures()), "scale_in_requests": len(light.outcomes),
            "scale_in_failed": len(light.failures()), "scale_in_s": scaled_in,
            "failures": [o.detail for o in light.failures()[:3]]}


def zero_round(agent: Agent) -> dict:
    """One plain request through the gateway to an idle service, timed from send to answer."""
    name = unique("bench-zero")
    spec = scaled_spec(name, autoscaler("concurrency", 5, low=0, high=1, down_s=0, scaleDownGracePeriodSeconds=2))
    if agent.deploy(spec, "--wait").returncode != 0:
        raise SystemExit("deploy failed")
    wait_until(lambda: agent.service(name)["state"] == "Idle", 60, "idle")
    sent = time.time()
    response = requests.get(f"{agent.gateway_url()}/api/predict/{name}/", timeout=120)
    answered = time.time()
    if response.status_code != 200:
        raise SystemExit(f"{name}: HTTP {response.status_code} through the gateway: {response.text[:200]}")
    ready_s = agent.service(name)["instances"][0]["cold_start"]["ready_s"]  # the agent's launch-to-Ready
    # Where the time went, from the agent's events (wall clock, one machine).
    activated = event_at(agent, name, "Activated", sent)
    starting = event_at(agent, name, "Starting", sent)
    ready = event_at(agent, name, "Ready", sent)
    agent.cli("rm", name)
    first_response = answered - sent
    return {"first_response_s": first_response, "cold_start_s": ready_s, "extra_s": first_response - ready_s,
            "header_s": float(response.headers["X-Berth-Cold-Start"]), "wake_s": activated - sent,
            "to_launch_s": starting - activated, "ready_to_answer_s": answered - ready}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--period", type=float, default=2.0, help="the agent's autoscale_period_s (default 2)")
    parser.add_argument("--window", type=float, default=30.0, help="the agent's metric_window_s (default 30)")
    parser.add_argument("--step-via", choices=("gateway", "instances"), default="gateway",
                        help="where the step round's load goes: the node gateway (the autoscaler reads the gateway's "
                             "counts), or each Ready instance's proxy (an agent with the gateway off: the proxies' sum)")
    args = parser.parse_args()
    timing = {"autoscale_period_s": args.period, "metric_window_s": args.window}
    gateway = {"gateway": "127.0.0.1:0", "gateway_admin": "127.0.0.1:0"}
    agent = start_agent(Path(tempfile.mkdtemp(prefix="bench-autoscale-")), **timing, **gateway)
    stepper = agent if args.step_via == "gateway" else start_agent(Path(tempfile.mkdtemp(prefix="bench-autoscale-")), **timing)
    try:
        steps = [step_round(stepper, args.step_via == "gateway") for _ in range(args.rounds)]
        zeros = [zero_round(agent) for _ in range(args.rounds)]
    finally:
        agent.stop()
        if stepper is not agent:
            stepper.stop()
    print(f"agent: autoscale_period_s {args.period}, metric_window_s {args.window}; step load via {args.step_via}")
    print("| round | first ScaledUp | decision 4 | 4 Ready | failed (step) | scale-in requests | failed | scale-in |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for index, row in enumerate(steps, 1):
        print(f"| {index} | {row['first_decision_s']:.1f} s | {row['decision_4_s']:.1f} s | {row['ready_4_s']:.1f} s | "
              f"{row['step_failed']} | {row['scale_in_requests']} | {row['scale_in_failed']} | {row['scale_in_s']:.1f} s |")
    print("\n| round | send to answer | instance cold start | extra | X-Berth-Cold-Start | send to Activated | "
          "Activated to Starting | Ready to answer |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for index, row in enumerate(zeros, 1):
        print(f"| {index} | {row['first_response_s']:.3f} s | {row['cold_start_s']:.3f} s | {row['extra_s']:+.3f} s | "
              f"{row['header_s']:.3f} s | {row['wake_s']:.3f} s | {row['to_launch_s']:.3f} s | {row['ready_to_answer_s']:.3f} s |")
    print(f"\nmedian extra over the cold start: {statistics.median(r['extra_s'] for r in zeros):+.3f} s; "
          f"failed across scale-in: {sum(r['scale_in_failed'] for r in steps)} of {sum(r['scale_in_requests'] for r in steps)}")
    for row in steps:
        for failure in row["failures"]:
            print("failure:", failure)


if __name__ == "__main__":
    main()
