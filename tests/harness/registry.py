"""A real image registry: Debian's docker-registry on 127.0.0.1:5000.

The engine treats registries on 127.0.0.0/8 as insecure by default, so pushes and pulls go
over plain HTTP without daemon configuration.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
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


class AuthRegistry:
    """A second docker-registry that asks for Basic auth (htpasswd, bcrypt) on a free port.

    It is a pull-through cache of `upstream`, so an image pushed there is pullable here with
    credentials, without pushing its layers a second time. Registry 2.8 takes Basic auth
    over plain HTTP (it only logs that TLS is advised), and the engine sends the credentials
    it is given to an insecure 127.0.0.0/8 registry.
    """

    def __init__(self, workdir: Path, upstream: str, users: dict[str, str]) -> None:
        import bcrypt  # a test dependency: the registry accepts bcrypt hashes alone

        from tests.harness.parts import free_port

        self.address = f"127.0.0.1:{free_port()}"
        self._workdir = workdir
        self._workdir.mkdir(parents=True, exist_ok=True)
        htpasswd = self._workdir / "htpasswd"
        htpasswd.write_text("".join(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                                    for user, password in users.items()))
        self._config = self._workdir / "config.yml"
        self._config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {self._workdir / 'data'}}}}}\n"
            f"http: {{addr: {self.address}}}\n"
            f"auth: {{htpasswd: {{realm: berth-test, path: {htpasswd}}}}}\n"
            f"proxy: {{remoteurl: 'http://{upstream}'}}\n"
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        log = open(self._workdir / "registry.log", "ab")
        self._process = subprocess.Popen([binary, "serve", str(self._config)], stdout=log, stderr=log, start_new_session=True)
        wait_until(lambda: self._asks_for_credentials() or self._process.poll() is not None, 30, "auth registry start")
        if not self._asks_for_credentials():
            raise RuntimeError(f"docker-registry with auth did not start; see {self._workdir / 'registry.log'}")
        return self.address

    def _asks_for_credentials(self) -> bool:
        try:
            urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1)
        except urllib.error.HTTPError as exc:
            return exc.code == 401
        except OSError:
            return False
        return False

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
