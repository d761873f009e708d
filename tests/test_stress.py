"""`berth stress` against real services: a test app of known capacity (50 ms a request, 4 at a
time, the rest queued: 80 req/s), run as a URL and as a service of a real agent (process
runtime); the HTML report opened in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.stress.generator import Generator, Load, Request, Result, Run, percentile
from bootstrap.spec import ScaleStrategy, parse_spec
from tests.harness.agent import Agent, unique
from tests.harness.parts import free_port, port_open, unavailable, wait_until

REPO = Path(__file__).resolve().parents[1]
BERTH = [sys.executable, "-m", "bootstrap.cli"]
pytestmark = pytest.mark.slow


def start_app(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.apps.capacity", "--port", str(port), *args], cwd=REPO,
                               stdout=subprocess.DEVNULL)
    wait_until(lambda: port_open("127.0.0.1", port), 20, "the capacity app listening")
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def capacity_app():
    process, url = start_app("--service-ms", "50", "--concurrency", "4")
    yield url
    process.kill()
    process.wait()


def stress(*args: str, timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BERTH, "stress", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env}, cwd=REPO)


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def assert_valid_autoscaler(strategy: dict) -> None:
    """The strategy as the autoscaler block of an EAS service config, through berth's one spec model."""
    spec = {"metadata": {"name": "svc", "instance": 1}, "containers": [{"image": "img", "command": "serve", "port": 8000}],
            "autoscaler": {"min": 1, "max": 4, "scaleStrategies": [strategy]}}
    parsed = parse_spec(spec)  # raises SpecError on an invalid autoscaler
    (read,) = parsed.spec.autoscaler.scale_strategies
    assert (read.metric_name, read.threshold) == ("concurrency", strategy["threshold"])
    with pytest.raises(ValidationError):  # the model does refuse what is not a strategy
        ScaleStrategy.model_validate({**strategy, "threshold": 0})
    assert strategy["metricName"] == "concurrency" and isinstance(strategy["threshold"], (int, float)) and strategy["threshold"] > 0


def test_find_reports_the_known_capacity(capacity_app: str, tmp_path: Path):
    result = stress(capacity_app, "--mode", "find", "--slo", "p99<=500ms", "--step", "3", "--precision", "0.1",
                    "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = report_of(tmp_path)
    found = report["saturation"]
    assert 64 <= found["rate"] <= 96, (found, result.stdout)
    assert found["limit"] == "p99" and found["first_failing_rate"] > found["rate"]
    assert found["per_instance"] is None and report["target"]["kind"] == "url"
    # Every verdict stands on two agreeing trials: each value probed at least twice.
    probed = [step["value"] for step in report["steps"] if step["kind"] == "rate"]
    assert all(probed.count(value) >= 2 for value in probed)
    assert "p99 crossed 500 ms at" in result.stdout and "no per-instance figure" in result.stdout
    line = next(l for l in result.stdout.splitlines() if l.startswith("autoscaler"))
    strategy = json.loads(line[line.index("{"):])
    assert strategy == report["autoscaler"]["strategy"]
    assert strategy["threshold"] == pytest.approx(0.7 * found["concurrency"], abs=0.051)
    assert_valid_autoscaler(strategy)


@pytest.fixture(scope="module")
def scan_report(capacity_app: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("scan")
    result = stress(capacity_app, "--slo", "p99<=500ms", "--step", "2.5", "--start-rate", "20", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_scan_stops_after_the_breach(scan_report):
    out, result = scan_report
    report = report_of(out)
    steps = report["steps"]
    assert [step["kind"] for step in steps] == ["rate"] * len(steps)  # --start-rate given: no calibration step
    rates = [step["value"] for step in steps]
    assert rates == pytest.approx([20 * 1.5 ** i for i in range(len(steps))])
    assert all(step["slo"]["passed"] for step in steps[:-1]) and not steps[-1]["slo"]["passed"]
    assert report["saturation"]["step"] == len(steps) - 2 and report["saturation"]["limit"] == "p99"
    assert 40 <= report["saturation"]["rate"] <= 96
    assert {"latency_ms", "achieved_rate", "offered_rate", "concurrency", "statuses", "generator"} <= set(steps[0])
    assert report["requests"] and report["timeline"]
    for chart in ("latency_vs_rate", "throughput_vs_concurrency", "knee", "errors", "timeline"):
        assert (out / f"{chart}.png").stat().st_size > 5000, chart


def test_html_report_renders_offline_in_headless_chromium(scan_report, tmp_path: Path):
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        unavailable("chromium", "apt-get install chromium (scripts/test installs it)")
    out, _ = scan_report
    page = (out / "report.html").read_text()
    assert not re.search(r"<script[^>]+src\s*=\s*[\"']?https?://", page, re.I)
    assert not re.search(r"<link[^>]+href\s*=\s*[\"']?https?://", page, re.I)
    assert not re.search(r"(src|href)\s*=\s*[\"']?https?:|url\(\s*[\"']?https?:|@import", page, re.I), "the page loads from the network"
    assert page.count("data:image/png;base64,") == 5

    def screenshot(html: Path) -> Image.Image:
        shot = tmp_path / f"{html.stem}.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / ('profile-' + html.stem)}",
                        "--window-size=1400,3000", f"--screenshot={shot}", html.as_uri()],
                       capture_output=True, timeout=120, check=True)
        return Image.open(shot).convert("RGB")

    def chart_pixels(image: Image.Image) -> int:
        # matplotlib's first two line colours (tab:blue, tab:orange): only a drawn chart has them.
        colours = image.getcolors(maxcolors=1 << 24)
        return sum(count for count, (r, g, b) in colours
                   if (abs(r - 31) < 30 and abs(g - 119) < 30 and abs(b - 180) < 30) or (abs(r - 255) < 20 and abs(g - 127) < 30 and b < 60))

    with_charts = screenshot(out / "report.html")
    blank = tmp_path / "nocharts.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', page))
    assert chart_pixels(with_charts) > 3000, "the charts did not render"
    assert chart_pixels(screenshot(blank)) < 100  # the same page without its images has none of them


def test_duration_bounds_every_mode_and_ctrl_c_writes_the_report(tmp_path: Path):
    fast, url = start_app("--service-ms", "1", "--concurrency", "100")
    try:
        started = time.monotonic()
        bounded = stress(url, "--start-rate", "20", "--step", "2", "--duration", "7", "--out", str(tmp_path / "bounded"))
        assert bounded.returncode == 0, bounded.stdout + bounded.stderr
        assert time.monotonic() - started < 25
        report = report_of(tmp_path / "bounded")
        assert report["saturation"]["limit"] == "duration" and 2 <= len(report["steps"]) <= 4

        out = tmp_path / "interrupted"
        process = subprocess.Popen([*BERTH, "stress", url, "--mode", "rate", "--rate", "50,50,50", "--step", "20", "--out", str(out)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        header = ""
        while "mode rate" not in header and process.poll() is None:  # the run has begun (on a loaded box, seconds after the start)
            header = process.stdout.readline()
        time.sleep(2)  # into the first 20 s step
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        report = report_of(out)
        assert report["interrupted"] and len(report["steps"]) == 1 and report["steps"][0]["interrupted"]
        assert 50 <= report["steps"][0]["requests"] <= 400
        assert "interrupted: writing the report" in output
    finally:
        fast.kill()
        fast.wait()


def test_bad_options_name_what_to_fix(capacity_app: str):
    for args, expected in (
        (["--slo", "p98<=1s"], "--slo 'p98<=1s': unknown limit 'p98'"),
        (["--slo", "ttft_p99<=1s"], "token timings need --openai"),
        (["--slo", "p99<500"], "write NAME<=VALUE with a unit"),
        (["--mode", "rate"], "--mode rate needs --rate"),
        (["--data", "/nonexistent.jsonl"], "--data: warmup file /nonexistent.jsonl"),
    ):
        result = stress(capacity_app, *args)
        assert result.returncode == 2 and expected in result.stderr, (args, result.stderr)
    for content, expected in (("not json", "not JSON"), ("[]", "no conversation with a prompt and a reply")):
        bad = Path(os.environ.get("TMPDIR", "/tmp")) / f"sharegpt-{os.getpid()}.json"
        bad.write_text(content)
        result = stress(capacity_app, "--sharegpt", str(bad))
        bad.unlink()
        assert result.returncode == 2 and f"--sharegpt {bad}" in result.stderr and expected in result.stderr, result.stderr
    missing = stress("no-such-service", "--agent", f"http://127.0.0.1:{free_port()}")
    assert missing.returncode == 1 and "cannot reach the agent" in missing.stderr


def test_open_loop_counts_from_the_scheduled_send_and_closed_loop_does_not(capacity_app: str):
    """At 120 req/s against 80 req/s of capacity the queue grows; the open loop shows it, the
    closed loop (4 senders) sees only the service time."""
    with Generator([Request("/")], capacity_app, workers=2) as generator:
        over = generator.run(Load(rate=120, seconds=3))
        closed = generator.run(Load(concurrency=4, seconds=3))
    assert {r.worker for r in over.results} == {0, 1}
    assert percentile(over.latencies(), 0.99) > 0.5
    assert percentile(closed.latencies(), 0.99) < 0.2
    assert 300 <= len(over.results) <= 420 and over.errors == 0
    assert over.cpu_s > 0 and all(r.lag >= 0 for r in over.results)


def test_the_generator_says_when_it_was_the_limit():
    def run(cpu_s: float, lag: float) -> Run:
        results = [Result(scheduled=i / 100, lag=lag if i % 10 == 0 else 0.0005, latency=0.01, status=200, ok=True) for i in range(100)]
        return Run(Load(rate=100, seconds=1), results, wall_s=1.0, cpu_s=cpu_s, workers=1)

    assert run(0.3, 0.001).generator_limit() is None
    assert "CPU at 95% of 1 core" in run(0.95, 0.001).generator_limit()
    assert "p99 send lag 50.0 ms" in run(0.3, 0.050).generator_limit()


@pytest.mark.parametrize("gateway", ["127.0.0.1:0", "off"])
def test_a_service_target_reads_its_instances(tmp_path: Path, gateway: str):
    """Through the node gateway when the agent runs one; else over the service's Ready endpoints."""
    agent = Agent(tmp_path, runtime="process", gateway=gateway, **({"gateway_admin": "127.0.0.1:0"} if gateway != "off" else {})).start()
    name = unique("stress")
    port = free_port()
    spec = {"metadata": {"name": name, "eas": {"termination_grace_period": 10}},
            "containers": [{"image": "ignored", "port": port, "env": [{"name": "PYTHONPATH", "value": str(REPO)}],
                            "command": f"{sys.executable} -m tests.apps.capacity --port {port} --service-ms 50 --concurrency 4"}]}
    try:
        deployed = agent.deploy(spec, "--wait")
        assert deployed.returncode == 0, deployed.stderr
        out = tmp_path / "out"
        result = agent.cli("stress", name, "--mode", "rate", "--rate", "20,40", "--step", "3", "--out", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        report = report_of(out)
        assert report["target"]["kind"] == "service"
        if gateway == "off":
            assert "Ready endpoints" in report["target"]["route"]
        else:
            assert report["target"]["route"] == f"the gateway {agent.gateway_url()}/api/predict/{name}"
        assert report["service_samples"] and all(s["ready"] == 1 for s in report["service_samples"])
        # The proxy's in-flight and request counts were read from the instance's admin /metrics.
        counted = [i["requests"] for s in report["service_samples"] for i in s["instances"].values()]
        assert counted[-1] - counted[0] >= 60
        last = report["steps"][-1]
        assert last["service"]["instances_ready_avg"] == 1
        assert last["service"]["per_instance"]["rate"] == pytest.approx(last["achieved_rate"], rel=0.01)
        found = report["saturation"]
        assert found["per_instance"]["concurrency"] == pytest.approx(found["concurrency"], rel=0.01)
        assert "per instance" in result.stdout and report["autoscaler"]["basis"].startswith("per Ready instance")
        assert_valid_autoscaler(report["autoscaler"]["strategy"])
    finally:
        agent.cli("rm", name)
        agent.stop()


def test_a_group_target_goes_through_the_gateway_and_reads_every_member(tmp_path: Path):
    """A group's name: sent to the gateway's group address, split by the group's weights, and
    the service-side figures summed over every member's instances."""
    agent = Agent(tmp_path, runtime="process", gateway="127.0.0.1:0", gateway_admin="127.0.0.1:0").start()
    members = [unique("stress-a"), unique("stress-b")]
    group = unique("stress-g")
    try:
        for name in members:
            port = free_port()
            spec = {"metadata": {"name": name, "eas": {"termination_grace_period": 10}},
                    "containers": [{"image": "ignored", "port": port, "env": [{"name": "PYTHONPATH", "value": str(REPO)}],
                                    "command": f"{sys.executable} -m tests.apps.capacity --port {port} --service-ms 20 --concurrency 4"}]}
            deployed = agent.deploy(spec, "--wait")
            assert deployed.returncode == 0, deployed.stderr
        routes = {"name": group, "routes": [{"service": members[0], "weight": 50}, {"service": members[1], "weight": 50}]}
        assert agent.cli("group", "apply", "-", stdin=json.dumps(routes)).returncode == 0
        out = tmp_path / "out"
        result = agent.cli("stress", group, "--mode", "rate", "--rate", "40", "--step", "4", "--out", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        report = report_of(out)
        assert report["target"]["kind"] == "group"
        assert report["target"]["route"] == f"the gateway {agent.gateway_url()}/api/predict/{group}"
        assert report["steps"][0]["errors"] == 0
        last = report["service_samples"][-1]
        assert last["ready"] == 2 and {key.split("/")[0] for key in last["instances"]} == set(members)
        # Both members served a share of the run (their proxies' request counts grew).
        first = report["service_samples"][0]["instances"]
        grew = {key.split("/")[0]: last["instances"][key]["requests"] - first[key]["requests"] for key in last["instances"]}
        assert all(count >= 20 for count in grew.values()), grew
        assert report["steps"][0]["service"]["instances_ready_avg"] == 2
    finally:
        agent.cli("group", "rm", group)
        for name in members:
            agent.cli("rm", name)
        agent.stop()


def test_data_file_requests_and_expect_status(capacity_app: str, tmp_path: Path):
    """--data lines go round-robin; a line's expect_status is its success criterion, so half the
    requests fail here and the errors limit breaks."""
    data = tmp_path / "requests.jsonl"
    data.write_text('{"method": "POST", "path": "/predict", "body": {"x": 1}}\n'
                    '{"path": "/other", "expect_status": 201, "repeat": 5, "concurrency": 3}\n')
    result = stress(capacity_app, "--data", str(data), "--mode", "rate", "--rate", "20", "--step", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    (step,) = report_of(tmp_path / "out")["steps"]
    assert step["statuses"] == {"200": step["requests"]} and step["error_kinds"] == {"HTTP 200": step["errors"]}
    assert abs(step["errors"] - step["requests"] / 2) <= 1
    assert step["slo"]["broken"][0]["limit"] == "errors" and report_of(tmp_path / "out")["saturation"]["limit"] == "errors"
