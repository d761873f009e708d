"""A real `berth gateway` process over a routes file, and slowapp backends to route to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import requests

from tests.harness.parts import free_port, port_open, wait_until

BERTH = [sys.executable, "-m", "bootstrap.cli"]


class Backend:
    """One `tests.apps.slowapp` process on a port of its own (`/whoami` answers that port)."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        log = open(root / f"backend-{self.port}.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "tests.apps.slowapp", "--port", str(self.port)],
                                        stdout=log, stderr=log)
        wait_until(lambda: port_open("127.0.0.1", self.port), 20, f"backend on {self.port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class Gateway:
    """`berth gateway --routes-file` on free ports; `routes(...)` rewrites the file."""

    def __init__(self, root: Path, routes: dict, *extra: str) -> None:
        self.root = root
        self.routes_file = root / "routes.json"
        self.state_dir = root / "gateway-state"
        self.state_dir.mkdir(exist_ok=True)
        self.routes(routes)
        self.log_path = root / "gateway.log"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([*BERTH, "gateway", "--routes-file", str(self.routes_file), "--listen", "127.0.0.1:0",
                                         "--admin", "127.0.0.1:0", "--state-dir", str(self.state_dir), *extra],
                                        stdout=log, stderr=log)
        wait_until(lambda: (self.state_dir / "gateway.json").exists() or self.process.poll() is not None, 20, "gateway start")
        assert self.process.poll() is None, self.log_path.read_text()[-2000:]
        addresses = json.loads((self.state_dir / "gateway.json").read_text())
        self.url, self.admin_url = addresses["url"], addresses["admin_url"]

    def routes(self, table: dict) -> None:
        partial = self.routes_file.with_suffix(".part")
        partial.write_text(json.dumps(table))
        partial.replace(self.routes_file)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def admin(self, path: str) -> requests.Response:
        return requests.get(self.admin_url + path, timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=40)


def service(*backends: Backend, token: str | None = None) -> dict:
    entry: dict = {"instances": [{"id": f"i{b.port}", "url": b.url} for b in backends]}
    if token:
        entry["token"] = token
    return entry
