"""A small client of the agent's API for the `berth` client commands (standard library only).

The agent is found through `--agent URL` or BERTH_AGENT_URL (http://HOST:PORT, https://HOST:PORT
or unix:/path), the token through BERTH_TOKEN or the token file in the agent's state directory.
An agent with a private CA's certificate is trusted through BERTH_AGENT_CA (a PEM file).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from agent.config import DEFAULT_LISTEN, DEFAULT_STATE_DIR
from bootstrap.errors import CommandFailed, UsageError

DEFAULT_AGENT_URL = f"http://{DEFAULT_LISTEN}"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class ApiError(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def find_token(state_dir: str | None) -> str | None:
    if token := os.environ.get("BERTH_TOKEN"):
        return token
    path = Path(state_dir or os.environ.get("BERTH_STATE_DIR") or DEFAULT_STATE_DIR) / "token"
    try:
        return path.read_text().strip()
    except PermissionError:
        raise UsageError(f"cannot read the agent's token file {path}: permission denied; run as its owner or set BERTH_TOKEN") from None
    except OSError:
        return None


class AgentClient:
    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        self.url = url or os.environ.get("BERTH_AGENT_URL") or DEFAULT_AGENT_URL
        self.token = token
        if not self.url.startswith(("http://", "https://", "unix:")):
            raise UsageError(f"--agent {self.url!r}: give http://HOST:PORT, https://HOST:PORT or unix:/path/to.sock")

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.url.startswith("unix:"):
            return _UnixConnection(self.url[5:], timeout)
        parts = urlsplit(self.url)
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=os.environ.get("BERTH_AGENT_CA") or None)
            return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout, context=context)
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)

    def _send(self, method: str, path: str, body: bytes | None, timeout: float | None) -> http.client.HTTPResponse:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        connection = self._connection(timeout)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
        except OSError as exc:
            raise CommandFailed(f"cannot reach the agent at {self.url} ({exc.strerror or exc}); is `berth agent` running? "
                                "Point to it with --agent URL or BERTH_AGENT_URL") from None
        if response.status == 401:
            raise CommandFailed(f"the agent at {self.url} refused the token (401): set BERTH_TOKEN, or --state-dir / "
                                "BERTH_STATE_DIR to the agent's state directory (its token file)")
        if response.status >= 400:
            raw = response.read()
            try:
                detail = json.loads(raw).get("detail", raw.decode())
            except (ValueError, AttributeError):
                detail = raw.decode(errors="replace")
            raise ApiError(response.status, detail)
        return response

    def call(self, method: str, path: str, payload: bytes | None = None) -> Any:
        response = self._send(method, path, payload, timeout=60)
        return json.loads(response.read() or b"null")

    def stream(self, path: str) -> Iterator[bytes]:
        response = self._send("GET", path, None, timeout=None)
        while chunk := response.read1(65536):
            yield chunk
