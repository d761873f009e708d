"""A real image registry: Debian's docker-registry on 127.0.0.1:5000.

The engine treats registries on 127.0.0.0/8 as insecure by default, so pushes and pulls go
over plain HTTP without daemon configuration.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

from tests.harness.parts import wait_until

ADDRESS = "127.0.0.1:5000"


def answers(address: str = ADDRESS) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/v2/", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


class Registry:
    def __init__(self, workdir: Path) -> None:
        self.address = ADDRESS
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        if answers(self.address):
            return self.address
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        self._workdir.mkdir(parents=True, exist_ok=True)
        config = self._workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {self._workdir / 'data'}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: {self.address}}}\n"
        )
        log = open(self._workdir / "registry.log", "ab")
        self._process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log, start_new_session=True)
        wait_until(lambda: answers(self.address) or self._process.poll() is not None, 30, "registry start")
        if not answers(self.address):
            raise RuntimeError(f"docker-registry did not start; see {self._workdir / 'registry.log'}")
        return self.address

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
