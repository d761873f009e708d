"""The proxy on a real port in front of the suite's app, both real processes: streaming,
limits (413/504/401/503), the upstream keep-alive race, forwarding headers, WebSocket."""

from __future__ import annotations

import http.client as httpclient
import json
import os
import re
import socket
import threading
import time

import aiohttp
import asyncio
import pytest

from tests.apps.runner import Boot, http
from tests.harness.parts import wait_until


@pytest.fixture
def boot(tmp_path, request):
    marker = request.node.get_closest_marker("boot")
    flags, env = (marker.args if marker else ()), (marker.kwargs.get("env") if marker else None)
    process = Boot(tmp_path, *flags, env=env)
    try:
        process.wait_ready()
        yield process
    finally:
        process.close()


def test_server_sent_events_pass_chunk_by_chunk(boot):
    """Each event reaches the client within 50 ms of the app writing it (no buffering)."""
    with socket.create_connection(("127.0.0.1", boot.proxy_port)) as sock:
        sock.sendall(b"GET /stream?n=8&gap=0.15 HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
        received, data = [], b""
        while b"[DONE]" not in data:
            chunk = sock.recv(65536)
            assert chunk, "the stream ended early"
            now = time.time()
            data += chunk
            for written in re.findall(rb"data: \d+ (\d+\.\d+)", chunk):
                received.append(now - float(written))
    assert len(received) == 8
    assert max(received) < 0.05, f"event delays {received}"
    assert b"transfer-encoding: chunked" in data.lower()


def test_request_body_over_the_limit_gets_413(tmp_path):
    boot = Boot(tmp_path, "--max-body", "1Ki")
    try:
        boot.wait_ready()
        assert http("POST", boot.proxy + "/echo", body=b"x" * 1024)[0] == 200
        assert http("POST", boot.proxy + "/echo", body=b"x" * 1025)[0] == 413
        # A chunked body has no Content-Length to check up front: counted as it arrives.
        conn = httpclient.HTTPConnection("127.0.0.1", boot.proxy_port, timeout=5)
        conn.request("POST", "/echo", body=iter([b"y" * 700, b"y" * 700]), encode_chunked=True)
        assert conn.getresponse().status == 413
    finally:
        boot.close()


def test_slow_answer_gets_504_after_the_request_timeout(tmp_path):
    boot = Boot(tmp_path, "--request-timeout", "0.5")
    try:
        boot.wait_ready()
        started = time.monotonic()
        status, _, body = http("GET", boot.proxy + "/slow?s=3")
        assert status == 504, body
        assert time.monotonic() - started < 2
        assert http("GET", boot.proxy + "/slow?s=0.1")[0] == 200
    finally:
        boot.close()


def test_service_token_is_required_and_never_shown(tmp_path):
    token = "tok-3f9a-secret"
    boot = Boot(tmp_path, env={"BERTH_SERVICE_TOKEN": token})
    try:
        boot.wait_ready()
        status, headers, _ = http("GET", boot.proxy + "/echo")
        assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
        assert http("GET", boot.proxy + "/echo", headers={"Authorization": "wrong"})[0] == 401
        assert http("GET", boot.proxy + "/echo", headers={"Authorization": token})[0] == 200
        status, _, body = http("GET", boot.proxy + "/echo", headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and "Authorization" not in json.loads(body)["headers"]  # checked here, kept from the app
        for second in (f"Authorization: {token}\r\nAuthorization: other", "Authorization: Bearer \udcff\udcfe"):
            with socket.create_connection(("127.0.0.1", boot.proxy_port), timeout=5) as sock:
                sock.sendall(f"GET /echo HTTP/1.1\r\nHost: t\r\n{second}\r\n\r\n".encode("utf-8", "surrogateescape"))
                assert sock.recv(65536).split(b" ")[1] == (b"400" if "other" in second else b"401")  # two: 400; not UTF-8: 401
        # The child does not get the token in its environment; /status and logs never show it.
        status_text = http("GET", boot.admin + "/status")[2].decode()
        boot.signal()
        assert boot.wait() == 0
        assert token not in status_text and token not in boot.output() and token not in boot.status_file.read_text()
        assert "Traceback" not in boot.output()
    finally:
        boot.close()


def test_before_ready_requests_get_503_with_retry_after(tmp_path):
    boot = Boot(tmp_path, app_args=("--start-delay", "1.5"))
    try:
        wait_until(lambda: boot.ready_status() == 503, 10, "the admin port answering 503")
        status, headers, body = http("GET", boot.proxy + "/")
        assert status == 503 and headers["Retry-After"] == "1", body
        assert b"not ready" in body and headers["X-Berth-Reject"] == "not-ready"
        boot.wait_ready()
        assert http("GET", boot.proxy + "/")[0] == 200
    finally:
        boot.close()


def test_wait_ready_holds_requests_until_ready(tmp_path):
    boot = Boot(tmp_path, "--wait-ready", "10", app_args=("--start-delay", "1"))
    try:
        wait_until(lambda: boot.ready_status() == 503, 10, "the admin port answering 503")
        assert http("GET", boot.proxy + "/", timeout=15)[0] == 200
    finally:
        boot.close()


def test_concurrency_limit_queues_then_refuses_with_503(tmp_path):
    boot = Boot(tmp_path, "--concurrency", "1", "--queue", "1")
    try:
        boot.wait_ready()
        results = []
        threads = [threading.Thread(target=lambda: results.append(http("GET", boot.proxy + "/slow?s=1")[0])) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_until(lambda: boot.status()["queued"] == 1, 5, "one request queued")
        status, headers, _ = http("GET", boot.proxy + "/")
        assert status == 503 and "Retry-After" in headers
        for thread in threads:
            thread.join()
        assert results == [200, 200]  # the queued one waited its turn
    finally:
        boot.close()


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_pooled_connection_closed_by_the_child_is_not_a_502(boot, method):
    """The keep-alive race: the child closes a pooled connection as the proxy sends on it;
    an idempotent request without a body is sent again on a new connection."""
    conn = httpclient.HTTPConnection("127.0.0.1", boot.proxy_port, timeout=5)
    for _ in range(5):
        conn.request("GET", "/arm-close")
        assert conn.getresponse().read() == b"armed"
        conn.request(method, "/echo")
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert json.loads(response.read())["method"] == method


def test_a_post_is_never_sent_twice_after_the_keep_alive_race(boot):
    """The child read the POST before closing: sending it again could run it twice (502, as nginx)."""
    conn = httpclient.HTTPConnection("127.0.0.1", boot.proxy_port, timeout=5)
    conn.request("GET", "/arm-close")
    assert conn.getresponse().read() == b"armed"
    conn.request("POST", "/echo", body=b"payload")
    response = conn.getresponse()
    assert response.status == 502, response.read()
    response.read()
    conn.request("POST", "/echo", body=b"payload")  # the next one goes on a new connection
    assert conn.getresponse().status == 200


def test_forwarding_headers_and_keep_alive(boot):
    conn = httpclient.HTTPConnection("127.0.0.1", boot.proxy_port, timeout=5)
    for _ in range(3):  # one client connection, several requests
        conn.request("GET", "/echo?a=1", headers={
            "X-Forwarded-For": "10.0.0.7", "X-Forwarded-Proto": "https", "Connection": "keep-alive, X-Hop",
            "X-Hop": "not for the app", "Keep-Alive": "timeout=5", "TE": "trailers", "X-End": "for the app"})
        response = conn.getresponse()
        echoed = json.loads(response.read())
    assert echoed["path"] == "/echo?a=1"
    headers = echoed["headers"]
    assert headers["X-Forwarded-For"] == "10.0.0.7, 127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"  # from the connection: a plain-HTTP client cannot claim https
    assert headers["X-Forwarded-Host"] == f"127.0.0.1:{boot.proxy_port}"
    assert headers["X-End"] == "for the app"
    assert not {"X-Hop", "Keep-Alive", "TE"} & set(headers), headers


def test_a_websocket_upgrade_the_app_does_not_make_is_502(boot):
    """The app answers 200 to an upgrade (no WebSocket there): 502; its own 404 goes back as it is."""
    upgrade = "Host: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    for path, status in (("/", b"502"), ("/nowhere", b"404")):
        with socket.create_connection(("127.0.0.1", boot.proxy_port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\n{upgrade}".encode())
            assert sock.recv(65536).split(b" ")[1] == status


def test_expect_100_continue_is_answered_once_the_limits_pass(tmp_path):
    boot = Boot(tmp_path, "--max-body", "1Ki")
    try:
        boot.wait_ready()
        with socket.create_connection(("127.0.0.1", boot.proxy_port), timeout=5) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")  # no 100 Continue: the body is never sent
        with socket.create_connection(("127.0.0.1", boot.proxy_port), timeout=5) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"hello")
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"body_length": 5' in answer
    finally:
        boot.close()


def test_draining_refusals_say_so(tmp_path):
    boot = Boot(tmp_path, "--drain-delay", "0.2", "--grace", "10")
    try:
        boot.wait_ready()
        holding = threading.Thread(target=http, args=("GET", boot.proxy + "/slow?s=2"))
        holding.start()  # keeps the drain waiting, so the proxy is still there to refuse
        wait_until(lambda: boot.status()["inflight"] == 1, 5, "the slow request in flight")
        boot.signal()
        wait_until(lambda: boot.status()["state"] == "DRAINING", 5, "DRAINING")
        time.sleep(0.4)
        status, headers, _ = http("GET", boot.proxy + "/")
        holding.join()
        assert (status, headers.get("X-Berth-Reject"), headers.get("Connection")) == (503, "draining", "close")
    finally:
        boot.close()


@pytest.mark.parametrize("flag, value", [("--request-timeout", "nan"), ("--request-timeout", "0"), ("--header-timeout", "-1"),
                                         ("--grace", "-1"), ("--body-timeout", "inf")])
def test_impossible_durations_are_refused_at_start(tmp_path, flag, value):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bootstrap.cli", "boot", flag, value, "--", "true"],
                            capture_output=True, text=True, timeout=30, env={**os.environ, "BERTH_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert flag in result.stderr and "seconds" in result.stderr


def test_client_that_disconnects_cancels_its_upstream_request(boot):
    app = f"http://127.0.0.1:{boot.app_port}/counters"  # asked directly, not through the proxy's pool
    with socket.create_connection(("127.0.0.1", boot.proxy_port)) as sock:
        sock.sendall(b"GET /slow?s=5 HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: json.loads(http("GET", app)[2])["slow_started"] == 1, 5, "the request reaching the app")
    wait_until(lambda: boot.status()["inflight"] == 0, 2, "the proxy dropping the request")
    wait_until(lambda: json.loads(http("GET", app)[2])["slow_abandoned"] == 1, 2, "the app seeing it dropped")


def test_metrics_show_inflight_average_and_status_codes(boot):
    assert http("GET", boot.proxy + "/")[0] == 200
    thread = threading.Thread(target=http, args=("GET", boot.proxy + "/slow?s=2.5"))
    thread.start()
    time.sleep(2.2)
    metrics = http("GET", boot.admin + "/metrics")[2].decode()
    thread.join()
    assert "berth_inflight_requests 1.0" in metrics
    average = float(re.search(r"^berth_inflight_requests_avg (\S+)$", metrics, re.M).group(1))
    assert 0.9 <= average <= 1.0
    assert re.search(r'^berth_requests_total\{code="200"\} \d', metrics, re.M)
    assert 'berth_state{berth_state="READY"} 1.0' in metrics
    assert re.search(r"^berth_child_rss_bytes [1-9]", metrics, re.M)
    assert 'berth_phase_duration_seconds{phase="launch"}' in metrics


def test_websocket_passes_through(boot):
    async def talk() -> list[str]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(boot.proxy + "/ws") as ws:
                replies = []
                for word in ("one", "two"):
                    await ws.send_str(word)
                    replies.append((await ws.receive(timeout=5)).data)
                return replies

    assert asyncio.run(talk()) == ["echo: one", "echo: two"]
