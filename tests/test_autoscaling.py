"""Autoscaling on one node with real parts: a `berth agent` on the process runtime, `berth boot`
in front of a test app with a concurrency limit and its own /metrics gauge (tests/apps/scaleapp.py),
the suite's load client. Windows of a few seconds in the services' JSON; the agent decides every
0.5 s on 2 s of metrics (its config, as an operator would set it).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest
import requests

from agent.scaling import GatewayCounts, MetricWindow, Scrape, Stabilizer, fired_job, parse_scrape, recommend
from bootstrap.spec import Autoscaler, CronScaler
from serving.admin import AppMetrics
from tests.harness.agent import Agent, unique, wait_state
from tests.harness.load import SteadyLoad
from tests.harness.parts import free_port, port_open, wait_until

ROOT = Path(__file__).resolve().parent.parent
APP = f"{sys.executable} -m tests.apps.scaleapp --port $PORT --limit 2"
INVENTORY = Path(__file__).parent / "data" / "gpu-inventory.json"


def scaled_spec(name: str, autoscaler: dict | None = None, **metadata) -> dict:
    # The first instance listens on the spec's port, each other one on its own (berth boot's PORT).
    spec = {"metadata": {"name": name, "eas": {"termination_grace_period": 10}, **metadata},
            "containers": [{"image": "ignored", "command": APP, "port": free_port()}]}
    if autoscaler is not None:
        spec["autoscaler"] = autoscaler
    return spec


def autoscaler(metric: str, threshold: float, *, low: int = 1, high: int = 4, down_s: int = 2, **on_zero) -> dict:
    return {"min": low, "max": high, "scaleStrategies": [{"metricName": metric, "threshold": threshold}],
            "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0}, "scaleDown": {"stabilizationWindowSeconds": down_s},
                         **({"onZero": on_zero} if on_zero else {})}}


def events(agent: Agent, name: str) -> list[dict]:
    return [json.loads(line) for line in agent.api("GET", f"/v1/events?service={name}&follow=false").text.splitlines()]


def ready_count(agent: Agent, name: str, count: int, timeout: float = 60) -> dict:
    return wait_state(agent, name, lambda s: s["instance"] == count and s["ready"] == count and len(s["instances"]) == count,
                      timeout, f"{count} instance(s) Ready")


def start_agent(root: Path, port: int | None = None, **config) -> Agent:
    """The drain delay (1 s, the operator's env) covers a load client's endpoint list, up to 100 ms old."""
    settings = {"autoscale_period_s": 0.5, "metric_window_s": 2, **config}
    return Agent(root, port=port, runtime="process", env={"BERTH_DRAIN_DELAY": "1", "PYTHONPATH": str(ROOT)},
                 **settings).start()


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    running = start_agent(tmp_path_factory.mktemp("autoscale"))
    yield running
    try:
        for svc in running.api("GET", "/v1/services").json():
            running.api("DELETE", f"/v1/services/{svc['name']}")
    finally:
        running.stop()


# --- the decision, on its own --------------------------------------------------------------------


def test_decision_is_the_hpas_total_over_threshold_with_tolerance_and_windows():
    scaler = Autoscaler.model_validate({"max": 10, "scaleStrategies": [{"metricName": "concurrency", "threshold": 10},
                                                                       {"metricName": "qps", "threshold": 100}]})
    wanted = recommend(scaler, {"concurrency": 38.0, "qps": 120.0}, ready=1)
    assert wanted.count == 4 and wanted.why.startswith("concurrency 38.0")
    assert recommend(scaler, {"concurrency": 42.0, "qps": 0.0}, ready=4).count == 4  # within 10%: stays
    assert recommend(scaler, {"concurrency": 45.0, "qps": 0.0}, ready=4).count == 5
    assert recommend(scaler, {"concurrency": None, "qps": None}, ready=1) is None

    stable = Stabilizer()
    assert stable.decide(0, 4, 1, up_window_s=0, down_window_s=5) == 4  # up at once
    assert stable.decide(1, 1, 4, 0, 5) == 4  # down: the largest of the last 5 s
    assert stable.decide(4, 2, 4, 0, 5) == 4
    assert stable.decide(7, 2, 4, 0, 5) == 2  # the 4 of t=0 and t=1 left the window... the 2s remain
    assert stable.decide(8, 6, 2, up_window_s=3, down_window_s=5) == 2  # up: the smallest of the last 3 s (2 at t=7)
    assert stable.decide(11, 6, 2, 3, 5) == 6


def test_rates_come_from_each_instances_counters_and_gauges_are_summed():
    window = MetricWindow(window_s=10)
    text = "# TYPE berth_requests counter\nberth_requests_total{code=\"200\"} %d\n# TYPE queue_depth gauge\nqueue_depth %d\n"
    window.add(0, {"a": parse_scrape(text % (100, 4), 0), "b": parse_scrape(text % (10, 1), 0)}, 1.0, None, None)
    sample = window.add(2, {"a": parse_scrape(text % (140, 4), 2), "b": parse_scrape(text % (30, 1), 2)}, 1.0, None, None)
    assert sample.values["qps"] == 30 and sample.values["custom[queue_depth]"] == 5 and sample.active
    # An instance that left does not count; one that came has no rate yet.
    sample = window.add(4, {"b": parse_scrape(text % (30, 1), 4), "c": Scrape(4, requests=500)}, 1.0, None, None)
    assert sample.values["qps"] == 0 and not sample.active
    assert window.average("qps") == 10


def test_with_the_gateway_its_counts_replace_the_proxies_sum_and_held_requests_are_demand():
    window = MetricWindow(window_s=10)
    window.add(0, {}, 1.0, None, GatewayCounts(requests_total=50, inflight=0, held=0))
    # The gateway's in-flight count holds its held requests (the gateway test below shows it): counted once.
    sample = window.add(2, {}, 1.0, None, GatewayCounts(requests_total=50, inflight=3, held=3))
    assert sample.values["concurrency"] == 3 and sample.values["qps"] == 0 and sample.active  # zero instances, 3 held
    sample = window.add(4, {}, 1.0, None, GatewayCounts(requests_total=90, inflight=2, held=0))
    assert sample.values["qps"] == 20 and sample.values["concurrency"] == 2


def test_cron_jobs_fire_once_and_skip_excluded_days():
    scaler = CronScaler.model_validate({"ScaleJobs": [
        {"Name": "day", "Schedule": "0 9 * * *", "TargetSize": 3, "TimeZone": "Asia/Shanghai"},
        {"Name": "night", "Schedule": "0 0 21 * * *", "TargetSize": 1, "TimeZone": "Asia/Shanghai"}],
        "ExcludeDates": ["* * 1 1 *"]})
    nine = datetime(2026, 3, 2, 1, 0, tzinfo=timezone.utc)  # 09:00 in Shanghai
    job, at = fired_job(scaler, (nine - timedelta(minutes=1)).timestamp(), (nine + timedelta(seconds=5)).timestamp())
    assert job.name == "day" and at == nine.timestamp()
    assert fired_job(scaler, (nine + timedelta(seconds=5)).timestamp(), (nine + timedelta(hours=1)).timestamp()) is None
    new_year = datetime(2027, 1, 1, 1, 0, tzinfo=timezone.utc)
    assert fired_job(scaler, (new_year - timedelta(minutes=1)).timestamp(), new_year.timestamp()) is None


# --- with the agent --------------------------------------------------------------------------------


def test_concurrency_step_scales_out_to_four_and_back_in_without_a_failed_request(agent):
    name = unique("conc")
    spec = scaled_spec(name, autoscaler("concurrency", 2, high=4, down_s=3))
    assert agent.deploy(spec, "--wait").returncode == 0
    endpoints = lambda: agent.service(name)["endpoints"]  # noqa: E731
    # 8 clients, each with one request in flight at all times: 8 in flight over a threshold of 2 per instance.
    with SteadyLoad(endpoints, path="/work?s=0.5", rate_per_s=1000, senders=8) as load:
        stepped = time.monotonic()
        service = ready_count(agent, name, 4, 60)
        took = time.monotonic() - stepped
    assert not load.failures(), load.failures()[:3]
    scaled_up = [e for e in events(agent, name) if e["kind"] == "ScaledUp"]
    assert scaled_up and "concurrency" in scaled_up[0]["message"] and "-> 4" in scaled_up[-1]["message"], scaled_up
    assert service["autoscaler"]["max"] == 4 and service["autoscaler"]["decision"]["to"] == 4, service["autoscaler"]
    print(f"load step to 4 Ready: {took:.1f} s")

    shown = agent.cli("get", name)
    assert "autoscaler 1..4" in shown.stdout and "concurrency" in shown.stdout and "last decision" in shown.stdout, shown.stdout

    refused = agent.cli("scale", name, "2")
    assert refused.returncode == 1 and "autoscaler" in refused.stderr, refused.stderr

    # Light load through the scale-in: every request answered while three instances drain.
    with SteadyLoad(endpoints, path="/", rate_per_s=40, senders=2) as light:
        ready_count(agent, name, 1, 60)
        time.sleep(0.5)
    assert len(light.outcomes) > 40 and not light.failures(), light.failures()[:3]
    scaled_down = [e for e in events(agent, name) if e["kind"] == "ScaledDown"]
    assert scaled_down and "-> 1" in scaled_down[-1]["message"], scaled_down
    assert agent.cli("rm", name).returncode == 0


def test_custom_gauge_of_the_apps_own_metrics_scales(agent):
    name = unique("gauge")
    spec = scaled_spec(name, autoscaler("custom[queue_depth]", 3, high=4, down_s=1))
    spec["cronscaler"] = {"ScaleJobs": [{"Name": "new-year", "Schedule": "0 0 1 1 *", "TargetSize": 9}]}
    deployed = agent.deploy(spec, "--wait")
    assert deployed.returncode == 0, deployed.stderr
    assert "cronscaler.ScaleJobs[0].TargetSize: 9 is above autoscaler.max (4); clamped to 4" in deployed.stderr
    first = agent.service(name)["instances"][0]
    admin = requests.get(first["admin_endpoint"] + "/metrics", timeout=5).text
    assert "berth_requests_total" in admin and "queue_depth 0.0" in admin  # the app's own page, re-exported
    assert requests.get(first["endpoint"] + "/set?queue_depth=9", timeout=5).text == "set"
    ready_count(agent, name, 3, 60)  # 9 / 3 per instance
    assert requests.get(first["endpoint"] + "/set?queue_depth=0", timeout=5).text == "set"
    ready_count(agent, name, 1, 60)
    assert agent.cli("rm", name).returncode == 0


def test_qps_and_cpu_scale(agent):
    qps, cpu = unique("qps"), unique("cpu")
    assert agent.deploy(scaled_spec(qps, autoscaler("qps", 15, high=3, down_s=1)), "--wait").returncode == 0
    # The scale-down window outlasts the load's dips on a shared machine's 2 cores.
    assert agent.deploy(scaled_spec(cpu, autoscaler("cpu", 40, high=2, down_s=6), cpu=1), "--wait").returncode == 0
    with SteadyLoad(lambda: agent.service(qps)["endpoints"], path="/", rate_per_s=40, senders=4) as load:
        service = wait_state(agent, qps, lambda s: s["ready"] >= 2, 60, "qps scale-out")
    assert not load.failures()
    assert "qps" in service["autoscaler"]["decision"]["why"], service["autoscaler"]
    # Two clients keep the single-threaded app spinning: about 100% of its 1-CPU request, over 40% per instance.
    with SteadyLoad(lambda: agent.service(cpu)["endpoints"], path="/burn?s=0.2", rate_per_s=100, senders=2):
        service = wait_state(agent, cpu, lambda s: s["ready"] == 2, 60, "cpu scale-out")
    assert any(e["kind"] == "ScaledUp" and "cpu" in e["message"] for e in events(agent, cpu)), service["autoscaler"]
    ready_count(agent, qps, 1, 60)
    ready_count(agent, cpu, 1, 60)
    assert agent.cli("rm", qps).returncode == 0 and agent.cli("rm", cpu).returncode == 0


def test_min_zero_goes_idle_then_a_wake_activates_it(agent):
    name = unique("zero")
    spec = scaled_spec(name, autoscaler("concurrency", 5, low=0, high=2, down_s=0, scaleDownGracePeriodSeconds=2,
                                        scaleUpActivationReplicas=1))
    assert agent.deploy(spec, "--wait").returncode == 0
    idle = wait_state(agent, name, lambda s: s["state"] == "Idle", 30, "idle")
    assert idle["instance"] == 0 and idle["instances"] == []
    assert any(e["kind"] == "ScaledToZero" and "no request for 2 s" in e["message"] for e in events(agent, name))
    assert agent.cli("get", name).stdout.startswith(f"{name}  Idle")
    assert "0/0 (idle)" in agent.cli("ls").stdout

    woke = agent.api("POST", f"/v1/services/{name}/wake", json={"held": 3})
    assert woke.status_code == 200, woke.text
    answer = woke.json()
    assert answer["activated"] and answer["began"] and answer["desired"] == 1 and time.time() - answer["since"] < 5
    again = agent.api("POST", f"/v1/services/{name}/wake", json={"held": 1}).json()
    assert again["activated"] and not again["began"] and again["since"] == answer["since"]  # the same cold start
    service = ready_count(agent, name, 1, 30)
    assert requests.get(service["endpoints"][0] + "/", timeout=5).text == "ok"
    assert agent.api("POST", f"/v1/services/{name}/wake", json={"held": 1}).json()["activated"] is False
    activated = [e for e in events(agent, name) if e["kind"] == "Activated"]
    assert activated and "3 request(s) held" in activated[0]["message"] and "0 -> 1" in activated[0]["message"]

    unauthorized = requests.post(f"{agent.url}/v1/services/{name}/wake", json={"held": 1}, timeout=5)
    assert unauthorized.status_code == 401
    assert agent.cli("rm", name).returncode == 0


def test_scale_and_a_cron_job_set_the_count(agent):
    name, floor = unique("cron"), unique("cronmin")
    fire = datetime.now(timezone.utc) + timedelta(seconds=20)
    jobs = {"ScaleJobs": [{"Name": "soon", "Schedule": f"{fire.second} {fire.minute} {fire.hour} * * *",
                           "TargetSize": 3, "TimeZone": "UTC"}]}
    spec = {**scaled_spec(name), "cronscaler": jobs}
    assert agent.deploy(spec, "--wait").returncode == 0
    # With an autoscaler the job sets its min: no load, yet 3 instances from the firing on.
    assert agent.deploy({**scaled_spec(floor, autoscaler("concurrency", 100, high=4)), "cronscaler": jobs}, "--wait").returncode == 0
    scaled = agent.cli("scale", name, "2", "--wait")
    assert scaled.returncode == 0, scaled.stderr
    assert len(agent.service(name)["endpoints"]) == 2 or time.time() >= fire.timestamp()  # held until the job fires
    service = ready_count(agent, name, 3, 60)
    assert service["autoscaler"]["cron"]["job"] == "soon" and time.time() >= fire.timestamp()
    assert any(e["kind"] == "ScaledUp" and "cron job 'soon'" in e["message"] for e in events(agent, name))
    held = ready_count(agent, floor, 3, 30)
    assert held["autoscaler"]["floor"] == 3 and "held at min 3" in held["autoscaler"]["decision"]["why"], held["autoscaler"]
    assert agent.cli("rm", name).returncode == 0 and agent.cli("rm", floor).returncode == 0


def test_an_agent_killed_mid_scale_resumes(tmp_path):
    agent = start_agent(tmp_path)
    name = unique("resume")
    try:
        assert agent.deploy(scaled_spec(name), "--wait").returncode == 0
        first = agent.service(name)["instances"][0]["runtime_id"]
        assert agent.cli("scale", name, "3").returncode == 0
        agent.kill9()  # the new instances are being started
        agent = start_agent(tmp_path, port=agent.port)
        service = ready_count(agent, name, 3, 60)
        assert first in [inst["runtime_id"] for inst in service["instances"]]  # adopted, not restarted

        assert agent.cli("scale", name, "1").returncode == 0
        agent.kill9()  # two instances draining
        agent = start_agent(tmp_path, port=agent.port)
        service = ready_count(agent, name, 1, 60)
        assert service["instances"][0]["runtime_id"] == first
        boots = [p for p in psutil.process_iter(["cmdline"]) if f"berth-{name}-" in " ".join(p.info["cmdline"] or [])]
        assert len(boots) <= 1, boots
    finally:
        agent.api("DELETE", f"/v1/services/{name}")
        wait_state_gone(agent, name)
        agent.stop()


def wait_state_gone(agent: Agent, name: str) -> None:
    wait_until(lambda: agent.api("GET", f"/v1/services/{name}").status_code == 404, 60, "service removed")


def test_gpu_bound_service_stops_at_the_free_gpus_and_gpu_util_scales(tmp_path):
    inventory = tmp_path / "gpus.json"
    shutil.copy(INVENTORY, inventory)
    gpus = len(json.loads(inventory.read_text())["gpus"])
    agent = start_agent(tmp_path, gpu_inventory_file=str(inventory))
    name = unique("gpu")
    try:
        spec = scaled_spec(name, autoscaler("gpu[util]", 50, high=gpus + 1, down_s=1), gpu=1)
        assert agent.deploy(spec, "--wait").returncode == 0
        record = json.loads(inventory.read_text())
        for gpu in record["gpus"]:
            gpu["utilization_percent"] = 90
        inventory.write_text(json.dumps(record))
        service = wait_state(agent, name, lambda s: s["ready"] == gpus and len(s["instances"]) == gpus + 1, 60,
                             "every GPU taken")
        pending = [inst for inst in service["instances"] if inst["state"] == "Pending"]
        assert len(pending) == 1 and f"0 of {gpus} free" in pending[0]["reason"], pending
        assert "gpu[util]" in service["autoscaler"]["decision"]["why"]
        shown = agent.cli("get", name).stdout
        assert "Pending" in shown and "GPU" in shown
    finally:
        agent.api("DELETE", f"/v1/services/{name}")
        wait_state_gone(agent, name)
        agent.stop()


def test_app_metrics_are_reexported_until_the_app_answers_404_or_not_prometheus(tmp_path):
    (tmp_path / "plain").write_text("done\n")  # an app that answers every path with its own text
    with_metrics, without = free_port(), free_port()
    apps = [subprocess.Popen([sys.executable, "-m", "tests.apps.scaleapp", "--port", str(with_metrics)], cwd=ROOT),
            subprocess.Popen([sys.executable, "-m", "http.server", str(without), "--bind", "127.0.0.1"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for port in (with_metrics, without):
            wait_until(lambda: port_open("127.0.0.1", port), 20, f"app on {port}")

        async def scrape() -> tuple[str, str, str | None, str, str | None]:
            served, missing, plain = (AppMetrics(with_metrics, "/metrics"), AppMetrics(without, "/metrics"),
                                      AppMetrics(without, "/plain"))
            try:
                return await served.text(), await missing.text(), missing.url, await plain.text(), plain.url
            finally:
                for scraper in (served, missing, plain):
                    await scraper.close()

        text, nothing, url_after, not_metrics, plain_after = asyncio.run(scrape())
        assert "queue_depth 0.0" in text and nothing == "" and url_after is None  # 404: off for good
        assert not_metrics == "" and plain_after is None  # not Prometheus text: never re-exported
    finally:
        for app in apps:
            app.terminate()
            app.wait(timeout=10)


def test_a_request_through_the_gateway_wakes_an_idle_service_and_is_answered(tmp_path):
    agent = start_agent(tmp_path, gateway="127.0.0.1:0", gateway_admin="127.0.0.1:0")
    name = unique("wake")
    try:
        spec = scaled_spec(name, autoscaler("concurrency", 5, low=0, high=2, down_s=0, scaleDownGracePeriodSeconds=2))
        assert agent.deploy(spec, "--wait").returncode == 0
        wait_state(agent, name, lambda s: s["state"] == "Idle", 30, "idle")
        with ThreadPoolExecutor(1) as pool:
            sent = pool.submit(requests.get, f"{agent.gateway_url()}/api/predict/{name}/", timeout=60)
            # While it is held, the gateway counts it in flight and held alike (the autoscaler counts it once).
            seen: list[dict] = []
            wait_until(lambda: seen.append(gateway_stats(agent)["services"].get(name, {})) or seen[-1].get("held") == 1,
                       30, "the request held")
            assert seen[-1]["inflight"] == 1, seen[-1]
            answer = sent.result()
        assert answer.status_code == 200 and answer.text == "ok", answer.text
        assert float(answer.headers["X-Berth-Cold-Start"]) > 0, answer.headers
        assert any(e["kind"] == "Activated" for e in events(agent, name))
    finally:
        agent.api("DELETE", f"/v1/services/{name}")
        wait_state_gone(agent, name)
        agent.stop()


def gateway_stats(agent: Agent) -> dict:
    admin = json.loads((agent.state_dir / "gateway.json").read_text())["admin_url"]
    return requests.get(f"{admin}/v1/stats", timeout=5).json()


def test_with_the_gateway_a_step_through_it_scales_on_the_gateways_counts(tmp_path):
    agent = start_agent(tmp_path, gateway="127.0.0.1:0", gateway_admin="127.0.0.1:0")
    name = unique("gwstep")
    try:
        # max 6: the count the load asks for (8 in flight over 2 per instance: 4), not the cap.
        assert agent.deploy(scaled_spec(name, autoscaler("concurrency", 2, high=6, down_s=3)), "--wait").returncode == 0
        through = f"{agent.gateway_url()}/api/predict/{name}"
        # Straight to the instance, past the gateway: the gateway's counts are what the autoscaler reads, so no demand.
        with SteadyLoad(lambda: agent.service(name)["endpoints"], path="/work?s=0.5", rate_per_s=1000, senders=8) as past:
            time.sleep(3)  # more than the 2 s window, six periods
            service = agent.service(name)
        assert len(past.outcomes) > 8 and service["instance"] == 1, service["autoscaler"]
        assert service["autoscaler"]["metrics"][0]["value"] < 1, service["autoscaler"]

        with SteadyLoad(lambda: [through], path="/work?s=0.5", rate_per_s=1000, senders=8) as load:
            ready_count(agent, name, 4, 60)
            time.sleep(2)  # a window more at 8 in flight: 4 stays the count
            service = agent.service(name)
        assert not load.failures(), load.failures()[:3]
        assert service["instance"] == 4 and service["autoscaler"]["decision"]["to"] == 4, service["autoscaler"]
        scaled_up = [e for e in events(agent, name) if e["kind"] == "ScaledUp"]
        assert scaled_up and "concurrency" in scaled_up[0]["message"] and "-> 4" in scaled_up[-1]["message"], scaled_up
        assert gateway_stats(agent)["services"][name]["requests_total"] >= len(load.outcomes)

        with SteadyLoad(lambda: [through], path="/", rate_per_s=40, senders=2) as light:
            ready_count(agent, name, 1, 60)
            time.sleep(0.5)
        assert len(light.outcomes) > 40 and not light.failures(), light.failures()[:3]
        assert any(e["kind"] == "ScaledDown" and "-> 1" in e["message"] for e in events(agent, name))
    finally:
        agent.api("DELETE", f"/v1/services/{name}")
        wait_state_gone(agent, name)
        agent.stop()


def test_a_count_change_during_a_rollout_applies_at_once(agent, tmp_path):
    name = unique("rollscale")
    assert agent.deploy(scaled_spec(name, instance=2), "--wait").returncode == 0
    slow = scaled_spec(name, instance=2)
    slow["containers"][0]["command"] = f"sleep 5 && {APP}"  # each new instance takes 5 s more: a long rollout
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    assert agent.cli("update", name, str(tmp_path / "slow.json")).returncode == 0
    wait_state(agent, name, lambda s: (s["rollout"] or {}).get("state") == "Progressing", 30, "rollout under way")
    assert agent.cli("scale", name, "4").returncode == 0
    done = wait_state(agent, name, lambda s: s["rollout"]["state"] == "Complete" and s["ready"] == 4, 90, "rollout and scale")
    assert {inst["revision"] for inst in done["instances"]} == {done["revision"]}
    seen = events(agent, name)
    complete = next(index for index, e in enumerate(seen) if e["kind"] == "RolloutComplete")
    started = {e["instance"] for e in seen[:complete] if e["kind"] == "Started"}
    # The two new slots started while the rollout replaced the first two, not after it.
    assert {f"{name}-2", f"{name}-3"} <= started, [(e["kind"], e["instance"]) for e in seen]

    assert agent.cli("scale", name, "1", "--wait").returncode == 0
    assert agent.cli("rm", name).returncode == 0


def test_a_count_change_during_a_paused_rollout_runs_the_serving_revision(agent, tmp_path):
    name = unique("pausescale")
    assert agent.deploy(scaled_spec(name, instance=2), "--wait").returncode == 0
    serving = agent.service(name)["revision"]
    broken = scaled_spec(name, instance=2)
    broken["containers"][0]["command"] = "echo bad config; exit 3"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    assert agent.cli("update", name, str(tmp_path / "broken.json"), "--wait").returncode == 1
    assert agent.service(name)["rollout"]["state"] == "Paused"
    assert agent.cli("scale", name, "3").returncode == 0
    service = wait_state(agent, name, lambda s: s["ready"] == 3, 60, "3 Ready while the rollout is paused")
    assert service["rollout"]["state"] == "Paused" and [i["revision"] for i in service["instances"]] == [serving] * 3, service
    rolled_back = agent.cli("update", "--rollback", name, "--wait", "--json")
    assert rolled_back.returncode == 0, rolled_back.stderr
    restored = json.loads(rolled_back.stdout)  # an update sets the spec's count again, as `kubectl apply` does
    assert restored["revision"] == serving and restored["rollout"]["state"] == "Complete" and restored["ready"] == 2, restored
    assert agent.cli("rm", name).returncode == 0


def test_new_slots_of_a_rollout_that_pauses_run_the_serving_revision(agent, tmp_path):
    name = unique("pausenew")
    spec = scaled_spec(name, instance=2)
    assert agent.deploy(spec, "--wait").returncode == 0
    serving = agent.service(name)["revision"]
    failing = json.loads(json.dumps(spec))
    failing["containers"][0]["command"] = "sleep 4; echo bad config; exit 3"  # fails after the scale below
    (tmp_path / "failing.json").write_text(json.dumps(failing))
    assert agent.cli("update", name, str(tmp_path / "failing.json")).returncode == 0
    wait_state(agent, name, lambda s: (s["rollout"] or {}).get("state") == "Progressing", 30, "rollout under way")
    assert agent.cli("scale", name, "3").returncode == 0  # slot 2 starts at the new revision, not yet known to fail
    service = wait_state(agent, name, lambda s: s["rollout"]["state"] == "Paused" and s["ready"] == 3
                         and [i["revision"] for i in s["instances"]] == [serving] * 3, 60, "3 Ready on the serving revision")
    assert "bad config" in service["rollout"]["reason"], service["rollout"]
    assert agent.cli("rm", name).returncode == 0
