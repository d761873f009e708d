"""The gateway with real processes: `berth gateway --routes-file` in front of slowapp backends."""

from __future__ import annotations

import collections
import re
import threading
import time

import pytest
import requests

from serving.gateway import Stats
from serving.metrics import LATENCY_BUCKETS
from tests.harness.gateway import Backend, Gateway, service
from tests.harness.load import SteadyLoad
from tests.harness.parts import free_port, wait_until


@pytest.fixture
def backends(tmp_path):
    started = [Backend(tmp_path) for _ in range(3)]
    yield started
    for backend in started:
        backend.stop()


@pytest.fixture
def gateways(tmp_path):
    started: list[Gateway] = []

    def start(routes: dict, *extra: str) -> Gateway:
        started.append(Gateway(tmp_path, routes, *extra))
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


def whoami_counts(gateway: Gateway, path: str, count: int, **kwargs) -> collections.Counter:
    session = requests.Session()
    counts: collections.Counter = collections.Counter()
    for _ in range(count):
        response = session.get(gateway.url + path, timeout=10, **kwargs)
        assert response.status_code == 200, response.text
        counts[int(response.text)] += 1
    return counts


def test_token_paths_and_forwarded_headers(backends, gateways):
    a = backends[0]
    gateway = gateways({"services": {"hello": service(a, token="s3cret-token")}})
    assert gateway.get("/api/predict/hello/echo").status_code == 401
    assert gateway.get("/api/predict/hello/echo", headers={"Authorization": "Bearer wrong"}).status_code == 401
    for value in ("s3cret-token", "Bearer s3cret-token"):
        response = gateway.get("/api/predict/hello/echo?x=1&y=2", headers={
            "Authorization": value, "X-Forwarded-For": "6.6.6.6", "traceparent": "00-abc-def-01"})
        assert response.status_code == 200, response.text
        seen = response.json()
        assert seen["path"] == "/echo?x=1&y=2"
        assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"  # the client's own claim replaced
        assert seen["headers"]["traceparent"] == "00-abc-def-01"
        assert seen["headers"]["X-Forwarded-Proto"] == "http"
        assert seen["headers"]["X-Forwarded-Host"] == gateway.url.removeprefix("http://")  # the Host the client asked for
    root = gateway.get("/api/predict/hello?q=1", headers={"Authorization": "s3cret-token"})
    assert root.status_code == 200 and root.text == "ok"
    missing = gateway.get("/api/predict/nobody/x")
    assert missing.status_code == 404 and "nobody" in missing.json()["error"]
    assert gateway.get("/elsewhere").status_code == 404
    routes = gateway.admin("/routes").text
    metrics = gateway.admin("/metrics").text
    assert "s3cret-token" not in routes and "***" in routes
    assert "s3cret-token" not in metrics and "s3cret-token" not in gateway.log_path.read_text()
    assert 'berth_gateway_requests_total{code="401",instance="-",name="hello",service="-"} 2.0' in metrics, metrics
    assert re.search(r'berth_gateway_request_duration_seconds_count\{name="hello",service="hello"\} [2-9]', metrics), metrics
    stats = gateway.admin("/v1/stats").json()["services"]["hello"]
    assert stats["requests_total"] >= 3 and stats["inflight"] == 0 and stats["held"] == 0


def test_trust_forwarded_keeps_the_chain_a_proxy_in_front_started(backends, gateways):
    gateway = gateways({"services": {"hello": service(backends[0])}}, "--trust-forwarded")
    seen = gateway.get("/api/predict/hello/echo", headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "models.example"}).json()
    assert seen["headers"]["X-Forwarded-For"] == "6.6.6.6, 127.0.0.1"
    assert seen["headers"]["X-Forwarded-Host"] == "models.example"


def test_the_official_openai_client_works_with_the_gateway_as_base_url(backends, gateways):
    import openai

    gateway = gateways({"services": {"llm": service(backends[0], token="llm-token")}})
    client = openai.OpenAI(base_url=f"{gateway.url}/api/predict/llm/v1", api_key="llm-token", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    answer = client.chat.completions.create(model="m", messages=messages)
    assert answer.choices[0].message.content == "hello from berth"
    pieces = [chunk.choices[0].delta.content for chunk in client.chat.completions.create(model="m", messages=messages, stream=True)]
    assert pieces == ["hello", " from", " berth"]  # streamed chunk by chunk
    wrong = openai.OpenAI(base_url=f"{gateway.url}/api/predict/llm/v1", api_key="not-it", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="m", messages=messages)


def test_only_what_never_reached_the_app_is_retried(backends, gateways, tmp_path):
    """berth boot's own refusal (503 with X-Berth-Reject) goes to another instance; the app's
    own 503, and a connection the app broke after reading the request, go back as they are."""
    from tests.apps.runner import Boot

    starting = Boot(tmp_path, app_args=("--start-delay", "60"))
    try:
        wait_until(lambda: starting.ready_status() == 503, 20, "berth boot up, its app not ready yet")
        a, b, c = backends
        gateway = gateways({"services": {"s": {"instances": [{"id": "starting", "url": starting.proxy}, {"id": "a", "url": a.url}]},
                                         "own": service(a, b), "broken": service(b, c)}})
        assert whoami_counts(gateway, "/api/predict/s/whoami", 30) == {a.port: 30}
        for _ in range(10):
            own = gateway.get("/api/predict/own/status?code=503")
            assert own.status_code == 503 and own.text == "the app's own 503"
        crashed = requests.post(gateway.url + "/api/predict/broken/crash?code=1", timeout=30)
        assert crashed.status_code == 502, crashed.text
        assert sum(backend.process.poll() is not None for backend in (b, c)) == 1  # sent once: one instance died
        retries = re.findall(r'berth_gateway_retries_total\{service="(\w+)"\} ([0-9.]+)', gateway.admin("/metrics").text)
        assert [name for name, _ in retries] == ["s"], retries
    finally:
        starting.close()


def test_a_stream_survives_its_instance_leaving_the_routes(backends, gateways):
    a, b = backends[:2]
    gateway = gateways({"services": {"a": service(a), "b": service(b)},
                        "groups": {"chat": {"routes": [{"service": "a", "weight": 100}, {"service": "b", "weight": 0}]}}})
    events = []
    with requests.get(gateway.url + "/api/predict/chat/stream?n=8&gap=0.4", stream=True, timeout=20) as response:
        for line in response.iter_lines():
            if not line.startswith(b"data:"):
                continue
            events.append(line)
            if len(events) == 2:  # mid-stream: its instance leaves the table, the group turns to b
                gateway.routes({"services": {"b": service(b)}, "groups": {"chat": {"routes": [{"service": "b", "weight": 100}]}}})
                wait_until(lambda: gateway.get("/api/predict/chat/whoami").text == str(b.port), 5, "the new routes applied")
    assert len(events) == 9 and events[-1] == b"data: [DONE]", events


def mirror_outcomes(gateway, service: str) -> dict[str, float]:
    """The gateway's mirror copies to `service` by outcome (sent, failed, dropped), from its /metrics."""
    pattern = rf'berth_gateway_mirror_requests_total\{{outcome="(\w+)",service="{service}"\}} ([0-9.]+)'
    return {outcome: float(value) for outcome, value in re.findall(pattern, gateway.admin("/metrics").text)}


def test_group_split_80_20(backends, gateways):
    a, b = backends[:2]
    gateway = gateways({"services": {"a": service(a), "b": service(b)},
                        "groups": {"chat": {"routes": [{"service": "a", "weight": 80}, {"service": "b", "weight": 20}]}}})
    counts = whoami_counts(gateway, "/api/predict/chat/whoami", 1000)
    assert abs(counts[a.port] / 1000 - 0.80) <= 0.04, counts


def test_mirror_50_percent_answers_from_primary(backends, gateways):
    a, b = backends[:2]
    gateway = gateways({"services": {"a": service(a), "b": service(b)},
                        "groups": {"chat": {"routes": [{"service": "a", "weight": 100},
                                                       {"service": "b", "weight": 0, "mirror_weight": 50}]}}})
    counts = whoami_counts(gateway, "/api/predict/chat/whoami", 1000)
    assert counts == {a.port: 1000}  # every client answer from the primary
    wait_until(lambda: sum(mirror_outcomes(gateway, "b").values()) >= 1000 * 0.42, 10, "mirror copies counted")
    time.sleep(0.5)
    copies = mirror_outcomes(gateway, "b")
    assert abs(copies.get("sent", 0) / 1000 - 0.50) <= 0.08, copies
    assert gateway.admin("/v1/stats").json()["services"]["b"]["requests_total"] == 0  # copies never count as demand


def test_no_mirror_copy_to_the_service_a_request_was_sent_to(backends, gateways):
    a, b = backends[:2]
    gateway = gateways({"services": {"a": service(a), "b": service(b)},
                        "groups": {"chat": {"routes": [{"service": "a", "weight": 50},
                                                       {"service": "b", "weight": 50, "mirror_weight": 100}]}}})
    counts = whoami_counts(gateway, "/api/predict/chat/whoami", 200)
    assert counts[a.port] and counts[b.port], counts
    sent = lambda: mirror_outcomes(gateway, "b").get("sent", 0.0)  # noqa: E731
    wait_until(lambda: sent() >= counts[a.port], 10, "mirror copies counted")
    time.sleep(0.3)
    assert sent() == counts[a.port]  # a copy of each request answered by a; none of those b answered itself


def test_mirror_copies_in_flight_are_bounded_and_the_rest_dropped_and_counted(backends, gateways):
    a, b = backends[:2]
    gateway = gateways({"services": {"a": service(a), "b": service(b)},
                        "groups": {"chat": {"routes": [{"service": "a", "weight": 100},
                                                       {"service": "b", "weight": 0, "mirror_weight": 100}]}}},
                       "--mirror-inflight", "1")
    answers: list[int] = []
    clients = [threading.Thread(target=lambda: answers.append(gateway.get("/api/predict/chat/slow?s=1").status_code))
               for _ in range(4)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(20)
    assert answers == [200] * 4  # every client answered, by the primary, whatever became of its copy
    wait_until(lambda: sum(mirror_outcomes(gateway, "b").values()) == 4, 10, "every copy counted")
    outcomes = mirror_outcomes(gateway, "b")
    assert outcomes.get("dropped", 0) >= 1 and outcomes.get("sent", 0) >= 1, outcomes


def test_header_route(backends, gateways):
    a, b = backends[:2]
    gateway = gateways({"services": {"a": service(a), "b": service(b)},
                        "groups": {"chat": {"routes": [{"service": "a", "weight": 100},
                                                       {"service": "b", "match": {"headers": {"User-Agent": "~^CherryStudio"}}}]}}})
    assert whoami_counts(gateway, "/api/predict/chat/whoami", 20, headers={"User-Agent": "CherryStudio/1.2"}) == {b.port: 20}
    assert whoami_counts(gateway, "/api/predict/chat/whoami", 20, headers={"User-Agent": "curl/8"}) == {a.port: 20}


def test_group_token_and_member_tokens(backends, gateways):
    a = backends[0]
    gateway = gateways({"services": {"a": service(a, token="member-token")},
                        "groups": {"chat": {"token": "group-token", "routes": [{"service": "a"}]}}})
    assert gateway.get("/api/predict/chat/echo", headers={"Authorization": "member-token"}).status_code == 401
    seen = gateway.get("/api/predict/chat/echo", headers={"Authorization": "Bearer group-token"}).json()
    assert seen["headers"]["Authorization"] == "Bearer member-token"  # the member is called with its own token


def test_weight_change_under_load_loses_nothing(backends, gateways):
    a, b = backends[:2]
    table = {"services": {"a": service(a), "b": service(b)},
             "groups": {"chat": {"routes": [{"service": "a", "weight": 90}, {"service": "b", "weight": 10}]}}}
    gateway = gateways(table)
    with SteadyLoad(lambda: [gateway.url], path="/api/predict/chat/whoami", rate_per_s=200, senders=4) as load:
        time.sleep(1.5)
        table["groups"]["chat"]["routes"] = [{"service": "a", "weight": 0}, {"service": "b", "weight": 100}]
        gateway.routes(table)
        changed = time.monotonic()
        time.sleep(2.5)
    assert load.outcomes and not load.failures(), load.failures()[:5]
    late = [o for o in load.outcomes if o.at > changed + 1.0]
    assert late and all(o.detail == str(b.port) for o in late)  # applied to new requests within 1 s


def test_held_request_answered_when_an_instance_appears(backends, gateways):
    a = backends[0]
    gateway = gateways({"services": {"later": {"instances": []}, "never": {"instances": [], "timeout_s": 1}}})
    answers: list[requests.Response] = []
    thread = threading.Thread(target=lambda: answers.append(gateway.get("/api/predict/later/whoami")))
    thread.start()
    wait_until(lambda: gateway.admin("/v1/stats").json()["services"]["later"]["held"] == 1, 10, "request held")
    metrics = gateway.admin("/metrics").text
    assert 'berth_gateway_held_requests{service="later"} 1.0' in metrics and 'berth_gateway_inflight_requests{service="later"} 1.0' in metrics, metrics
    gateway.routes({"services": {"later": service(a), "never": {"instances": [], "timeout_s": 1}}})
    thread.join(10)
    assert answers and answers[0].status_code == 200 and answers[0].text == str(a.port)
    refused = gateway.get("/api/predict/never/")
    assert refused.status_code == 503 and "Retry-After" in refused.headers and "no Ready instance" in refused.json()["error"]


def test_hold_queue_bound(backends, gateways):
    gateway = gateways({"services": {"later": {"instances": []}}}, "--hold-queue", "0")
    started = time.monotonic()
    response = gateway.get("/api/predict/later/")
    assert response.status_code == 503 and time.monotonic() - started < 2


def test_sse_streams_chunk_by_chunk(backends, gateways):
    gateway = gateways({"services": {"s": service(backends[0])}})
    arrivals = []
    with requests.get(gateway.url + "/api/predict/s/stream?n=4&gap=0.4", stream=True, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    assert arrivals[3] - arrivals[0] > 1.0  # each event came as written, not all at the end


def test_connection_refused_is_retried_on_another_instance(backends, gateways):
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = gateways({"services": {"s": {"instances": [{"id": "dead", "url": dead}, {"id": "alive", "url": backends[0].url}]}}})
    counts = whoami_counts(gateway, "/api/predict/s/whoami", 50)
    assert counts == {backends[0].port: 50}
    body = b"x" * 900_000  # kept for the retry: bodies up to the 1 MB limit
    for _ in range(10):
        echoed = requests.post(gateway.url + "/api/predict/s/echo", data=body, timeout=30)
        assert echoed.status_code == 200 and echoed.json()["body_length"] == len(body), echoed.text
    assert re.search(r'berth_gateway_retries_total\{service="s"\} [1-9]', gateway.admin("/metrics").text)


def test_bad_routes_file_is_refused_naming_the_field(tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"services": {"a": {"instances": []}}, "groups": {"g": {"routes": [{"service": "zzz"}]}}}))
    result = subprocess.run([sys.executable, "-m", "bootstrap.cli", "gateway", "--routes-file", str(path), "--listen",
                             "127.0.0.1:0", "--admin", "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "groups.g.routes[0].service" in result.stderr


def test_two_random_choices_prefer_the_less_loaded_and_idle_vllm():
    import random

    from serving.routing import Backend, pick

    busy, idle, queued = Backend("busy", "http://127.0.0.1:1", None), Backend("idle", "http://127.0.0.1:2", None), \
        Backend("queued", "http://127.0.0.1:3", None)
    busy.inflight, idle.inflight, queued.inflight, queued.waiting = 5, 1, 0, 2.0
    rng = random.Random(7)
    picks = collections.Counter(pick([busy, idle], rng=rng).id for _ in range(200))
    assert picks == {"idle": 200}  # of two, the one with fewer in flight, every time
    assert collections.Counter(pick([queued, idle], rng=rng).id for _ in range(200)) == {"idle": 200}  # vLLM waiting loses
    spread = collections.Counter(pick([busy, idle, queued], rng=rng).id for _ in range(600))
    # queued loses every pair (requests waiting), busy wins only against it, idle wins both of its pairs
    assert set(spread) == {"idle", "busy"} and spread["idle"] > 1.5 * spread["busy"]
    assert pick([busy], exclude=busy) is None and pick([busy, idle], exclude=busy) is idle


def test_a_vllm_instance_with_requests_waiting_loses_to_one_without(backends, gateways):
    """The gateway reads each vLLM instance's admin /metrics (every 100 ms): one with
    vllm:num_requests_waiting above zero gets no request while the other has none waiting."""
    import http.server

    waiting = {}

    class Admin(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f'vllm:num_requests_waiting{{model_name="m"}} {waiting[self.server.server_port]}\n'.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    admins = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Admin) for _ in range(2)]
    for admin in admins:
        threading.Thread(target=admin.serve_forever, daemon=True).start()
    try:
        a, b = backends[:2]
        waiting.update({admins[0].server_port: 3, admins[1].server_port: 0})
        gateway = gateways({"services": {"llm": {"engine": "vllm", "instances": [
            {"id": "a", "url": a.url, "admin": f"http://127.0.0.1:{admins[0].server_port}"},
            {"id": "b", "url": b.url, "admin": f"http://127.0.0.1:{admins[1].server_port}"}]}}})
        time.sleep(1.0)  # several reads of both admin pages
        assert whoami_counts(gateway, "/api/predict/llm/whoami", 40) == {b.port: 40}
        waiting.update({admins[0].server_port: 0, admins[1].server_port: 5})
        time.sleep(1.0)
        assert whoami_counts(gateway, "/api/predict/llm/whoami", 40) == {a.port: 40}
    finally:
        for admin in admins:
            admin.shutdown()
            admin.server_close()


def test_websocket_is_tunnelled_and_the_access_log_has_a_line_per_request(backends, gateways, tmp_path):
    import asyncio
    import json

    import aiohttp

    log = tmp_path / "access.jsonl"
    gateway = gateways({"services": {"s": service(backends[0], token="ws-token")}}, "--access-log", str(log))

    async def talk() -> list[str]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(gateway.url + "/api/predict/s/ws", headers={"Authorization": "ws-token"}) as ws:
                answers = []
                for word in ("one", "two"):
                    await ws.send_str(word)
                    answers.append((await ws.receive(timeout=5)).data)
                return answers

    assert asyncio.run(talk()) == ["echo: one", "echo: two"]
    assert gateway.get("/api/predict/s/whoami", headers={"Authorization": "ws-token"}).status_code == 200
    wait_until(lambda: len(log.read_text().splitlines()) >= 2, 10, "access log lines")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["path"], line["status"]) for line in lines] == [("/api/predict/s/ws", 101), ("/api/predict/s/whoami", 200)]
    assert "ws-token" not in log.read_text()


def test_latency_lands_in_the_first_bucket_whose_bound_holds_it():
    stats = Stats()
    for seconds in (0.001, 0.0011, 0.3, 10_000.0):  # on a bound, just past it, between, past all (+Inf)
        stats.observe("n", "s", "i", 200, seconds)
    histogram = stats.latency[("n", "s")]
    counts = [*histogram.counts, histogram.sum]
    placed = {index: count for index, count in enumerate(counts[:-1]) if count}
    assert placed == {0: 1, 1: 1, LATENCY_BUCKETS.index(0.5): 1, len(LATENCY_BUCKETS): 1}
    assert counts[-1] == pytest.approx(0.001 + 0.0011 + 0.3 + 10_000.0)
