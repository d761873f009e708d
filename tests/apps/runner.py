"""Runs `berth boot` as a user would: a real process on free ports around a real child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.harness.parts import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
APP = [sys.executable, "-m", "tests.apps.slowapp"]


def http(method: str, url: str, *, body: bytes | None = None, headers: dict | None = None, timeout: float = 10) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class Boot:
    """`berth boot [flags] -- python -m tests.apps.slowapp --port P [app args]`."""

    def __init__(self, tmp_path: Path, *flags: str, app_args: tuple[str, ...] = (), command: list[str] | None = None,
                 env: dict[str, str] | None = None, app_port: int | None = None) -> None:
        self.app_port, self.proxy_port, self.admin_port = app_port or free_port(), free_port(), free_port()
        self.status_file = tmp_path / f"status-{self.admin_port}.json"
        self.log_path = tmp_path / f"boot-{self.admin_port}.log"
        argv = [sys.executable, "-m", "bootstrap.cli", "boot", "--port", str(self.app_port),
                "--proxy-port", str(self.proxy_port), "--admin-port", str(self.admin_port),
                "--status-file", str(self.status_file), "--drain-delay", "0.5", "--stop-timeout", "2", *flags, "--"]
        argv += command if command is not None else [*APP, "--port", str(self.app_port), *app_args]
        full_env = {**os.environ, "BERTH_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def ready_status(self) -> int | None:
        try:
            return http("GET", self.admin + "/ready", timeout=2)[0]
        except OSError:
            return None

    def status(self) -> dict:
        return json.loads(http("GET", self.admin + "/status")[2])

    def wait_ready(self, timeout: float = 20) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"berth boot exited {self.process.returncode}:\n{self.output()}")
            return self.ready_status() == 200

        wait_until(ready, timeout, "berth boot READY")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"berth boot still running after {timeout} s:\n{self.output()}") from None

    def file_status(self) -> dict:
        return json.loads(self.status_file.read_text())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()
