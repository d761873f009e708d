"""`berth boot` under faults: its child's whole tree dies with it, and only its child makes it ready."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from tests.apps.runner import Boot
from tests.harness.parts import free_port, wait_until


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_of_boot_ends_the_child_and_its_workers_within_1_s(tmp_path):
    boot = Boot(tmp_path, app_args=("--workers", "2"))
    try:
        boot.wait_ready()
        child = boot.status()["child_pid"]
        workers = [proc.pid for proc in psutil.Process(child).children()]
        assert len(workers) == 2 and all(_alive(pid) for pid in [child, *workers])
        boot.signal(signal.SIGKILL)
        boot.wait()
        tree = [child, *workers]
        deadline = time.monotonic() + 1.0
        while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = [pid for pid in tree if _alive(pid)]
        assert not left, f"still running 1 s after berth boot was SIGKILLed: {left}"
    finally:
        boot.close()


class _Stranger:
    """Someone else's HTTP server on a port: answers every GET with 200."""

    def __init__(self, port: int) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_app_port_held_by_another_process_fails_the_boot_at_once_naming_it(tmp_path):
    port = free_port()
    stranger = _Stranger(port)
    boot = Boot(tmp_path, app_port=port)
    try:
        started = time.monotonic()
        assert boot.wait() == 1
        assert time.monotonic() - started < 10
        error = boot.file_status()["last_error"]
        assert f"the app port {port} is already in use by pid {os.getpid()}" in error
        assert "slowapp starting" not in boot.output()  # the child was never launched
    finally:
        boot.close()
        stranger.close()


def test_a_listener_outside_the_childs_tree_never_makes_it_ready(tmp_path):
    port = free_port()
    # The child never listens; someone else takes its port once it runs.
    boot = Boot(tmp_path, app_port=port, command=[sys.executable, "-c", "import time; time.sleep(60)"])
    stranger = None
    try:
        wait_until(lambda: boot.ready_status() == 503 and boot.status()["state"] == "LAUNCHING", 20, "LAUNCHING")
        stranger = _Stranger(port)
        wait_until(lambda: "the listener is not berth's child" in boot.output(), 10, "the foreign listener named")
        assert f"held by pid {os.getpid()}" in boot.output()
        assert boot.ready_status() == 503 and boot.status()["state"] == "LAUNCHING"
    finally:
        boot.close()
        if stranger is not None:
            stranger.close()


def test_the_leftover_scan_finds_this_runs_processes_and_never_another_runs():
    from tests.conftest import RUN_MARKER, _leftovers

    ours = subprocess.Popen(["sleep", "30"])  # inherits this run's marker
    theirs = subprocess.Popen(["sleep", "30"], env={**os.environ, RUN_MARKER: "another-run"})
    try:
        found = _leftovers(os.environ[RUN_MARKER])
        assert ours.pid in found and "sleep 30" in found[ours.pid]
        assert theirs.pid not in found
    finally:
        for process in (ours, theirs):
            process.kill()
            process.wait()
