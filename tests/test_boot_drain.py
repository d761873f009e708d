"""SIGTERM under load: nothing sent before or during the quiet period is lost, SSE streams
in flight arrive whole, then the child is stopped and the boot exits 0."""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.error

from tests.apps.runner import Boot, http
from tests.harness.parts import wait_until

DRAIN_DELAY = 1.5


def _stream(port: int, events: int, out: list) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /stream?n={events}&gap=0.1 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        data = b""
        while not data.endswith(b"0\r\n\r\n"):  # the chunked stream's end
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    out.append(data)


def test_sigterm_under_load_loses_nothing_sent_before_the_quiet_period_ends(tmp_path):
    boot = Boot(tmp_path, "--drain-delay", str(DRAIN_DELAY), "--grace", "20")
    try:
        boot.wait_ready()
        streams: list[bytes] = []
        results: list[tuple[float, int | str, dict]] = []
        stop_load = threading.Event()

        def load() -> None:
            while not stop_load.is_set():
                sent = time.monotonic()
                try:
                    status, headers, _ = http("GET", boot.proxy + "/slow?s=0.3", timeout=10)
                except (OSError, urllib.error.URLError) as exc:
                    status, headers = type(exc).__name__, {}
                results.append((sent, status, headers))

        stream_threads = [threading.Thread(target=_stream, args=(boot.proxy_port, 30, streams)) for _ in range(3)]
        load_threads = [threading.Thread(target=load) for _ in range(6)]
        for thread in stream_threads + load_threads:
            thread.start()
        time.sleep(0.5)
        sigterm_at = time.monotonic()
        boot.signal(signal.SIGTERM)
        wait_until(lambda: boot.ready_status() == 503, 0.5, "/ready turning 503")
        time.sleep(DRAIN_DELAY + 0.7)
        stop_load.set()
        for thread in stream_threads + load_threads:
            thread.join(15)
        assert boot.wait() == 0, boot.output()

        quiet_end = sigterm_at + DRAIN_DELAY - 0.1  # margin for the time the signal takes to land
        during = [r for r in results if r[0] < quiet_end]
        after = [r for r in results if r[0] > sigterm_at + DRAIN_DELAY + 0.1]
        assert len(during) >= 20
        assert all(status == 200 for _, status, _ in during), [r for r in during if r[1] != 200]
        assert after and all(status == 503 or isinstance(status, str) for _, status, _ in after)
        refused = [headers for _, status, headers in after if status == 503]
        assert all(headers.get("Connection") == "close" for headers in refused)
        assert len(streams) == 3
        for data in streams:  # whole: every event and the end marker, over a stream 3 s long
            assert data.count(b"data: ") == 31 and b"[DONE]" in data
        assert boot.file_status()["state"] == "STOPPED"
        assert boot.file_status()["phases"]["drain"] >= DRAIN_DELAY
    finally:
        boot.close()


def test_no_proxy_mode_gates_ready_and_drains(tmp_path):
    boot = Boot(tmp_path, "--no-proxy", "--drain-delay", "0.5")
    try:
        boot.wait_ready()
        assert http("GET", f"http://127.0.0.1:{boot.app_port}/")[0] == 200  # straight to the child
        try:
            http("GET", boot.proxy + "/", timeout=1)
            raise AssertionError("the proxy port should not be bound with --no-proxy")
        except (OSError, urllib.error.URLError):
            pass
        boot.signal(signal.SIGTERM)
        wait_until(lambda: boot.ready_status() == 503, 0.5, "/ready turning 503")
        assert http("GET", f"http://127.0.0.1:{boot.app_port}/")[0] == 200  # the quiet period
        assert boot.wait() == 0
    finally:
        boot.close()


def test_a_short_grace_period_still_leaves_a_quiet_period(tmp_path):
    """With grace 4 s and the default 10 s stop timeout, the child gets half the grace, not all of it."""
    boot = Boot(tmp_path, "--grace", "4", "--stop-timeout", "10", "--drain-delay", "1")
    try:
        boot.wait_ready()
        boot.signal(signal.SIGTERM)
        wait_until(lambda: boot.ready_status() == 503, 2, "/ready turning 503")
        assert http("GET", boot.proxy + "/")[0] == 200  # still served in the quiet period
        assert boot.wait() == 0
    finally:
        boot.close()
