"""A Docker engine: the one reachable, else Debian's dockerd started for the session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import docker
from docker.errors import DockerException

from tests.harness.parts import wait_until


class Engine:
    def __init__(self) -> None:
        self.client: docker.DockerClient | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, log_path: Path) -> docker.DockerClient:
        """Connect to the engine, starting dockerd (as root) when none answers."""
        client = _connect()
        if client is None:
            dockerd = shutil.which("dockerd")
            if dockerd is None:
                raise RuntimeError("no engine answers and dockerd is not installed (apt-get install docker.io)")
            log = open(log_path, "ab")
            self._process = subprocess.Popen([dockerd], stdout=log, stderr=log, start_new_session=True)
            wait_until(lambda: _connect() is not None or self._process.poll() is not None, 60, "dockerd start")
            client = _connect()
            if client is None:
                raise RuntimeError(f"dockerd did not start; see {log_path}")
        self.client = client
        return client

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()


def _connect() -> docker.DockerClient | None:
    try:
        client = docker.from_env(timeout=120)
        client.ping()
        return client
    except DockerException:
        return None
