"""`berth boot` under faults: its child's whole tree dies with it, and only its child makes it ready."""

from __future__ import annotations

import signal
import socket
import time

import psutil

from tests.apps.runner import Boot
from tests.harness.parts import wait_until


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
