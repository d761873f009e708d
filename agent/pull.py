"""Image pulls the way Nomad's Docker driver does them, and a little better.

- Names are resolved as Docker resolves them (`app` -> docker.io/library/app:latest).
- Operator mirrors of a registry are tried first; the image is then tagged with its own name.
- Concurrent pulls of one image share one pull (every waiter sees its progress and result).
- A pull that makes no progress for the stall timeout is aborted: the socket read timeout of
  the Engine API call *is* the stall watchdog, since the engine streams a progress line for
  every chunk it receives (the SDK's own `pull` sends no timeout at all, so the call is made
  here). Closing the call makes the engine abandon the pull. An overall timeout bounds it all.
- Transient registry errors are retried with doubling delays; "not found" and "denied" are not,
  and a refused or missing credential says where credentials are set.
- Credentials (a spec's `dockerAuth`, or the operator's per registry) never reach a log line.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterator

import docker
import docker.auth
import docker.utils
import requests
from docker.errors import DockerException
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import ReadTimeout
from urllib3.exceptions import ReadTimeoutError

from agent.config import Timings
from bootstrap.units import format_bytes

log = logging.getLogger("berth.agent.pull")

CREDENTIAL_MARKERS = ("unauthorized", "denied", "authentication required", "no basic auth credentials")
PERMANENT_MARKERS = (*CREDENTIAL_MARKERS, "not found", "manifest unknown", "invalid reference",
                     "repository does not exist", "no such host")
CREDENTIALS_HINT = ("; give the registry's credentials as the spec's dockerAuth (base64 of 'user:password'), "
                    "or the agent's registry_auth for {registry}")


class PullError(Exception):
    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class ImageRef:
    registry: str  # "docker.io" for Docker Hub
    repository: str  # without the registry: "library/python"
    reference: str  # a tag, or "sha256:..." digest

    @property
    def is_digest(self) -> bool:
        return self.reference.startswith("sha256:")

    def name(self, registry: str | None = None) -> str:
        """The repository with its registry, as Docker names it (docker.io stays implicit)."""
        registry = registry or self.registry
        return self.repository if registry == "docker.io" else f"{registry}/{self.repository}"

    def __str__(self) -> str:
        separator = "@" if self.is_digest else ":"
        return f"{self.name()}{separator}{self.reference}"


def resolve(image: str) -> ImageRef:
    """`python` -> docker.io/library/python:latest; `reg:5000/a/b@sha256:...` kept as it is."""
    repository, reference = docker.utils.parse_repository_tag(image)
    registry, path = docker.auth.resolve_repository_name(repository)
    if registry in ("index.docker.io", "docker.io") and "/" not in path:
        path = f"library/{path}"
    return ImageRef("docker.io" if registry == "index.docker.io" else registry, path, reference or "latest")


def decode_auth(value: str) -> dict[str, str]:
    """EAS's dockerAuth is base64('user:password'); plain 'user:password' is accepted too."""
    text = value
    try:
        decoded = base64.b64decode(value, validate=True).decode()
        if ":" in decoded:
            text = decoded
    except (binascii.Error, UnicodeDecodeError):
        pass
    user, sep, password = text.partition(":")
    if not sep:
        raise PullError("dockerAuth must be base64 of 'user:password' (as in EAS) or 'user:password'", permanent=True)
    return {"username": user, "password": password}


def _is_permanent(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in PERMANENT_MARKERS)


class _Progress:
    """Bytes done over bytes known, summed across layers, reported every period."""

    def __init__(self, period_s: float, report: Callable[[str], None]) -> None:
        self.layers: dict[str, tuple[int, int]] = {}
        self.period_s = period_s
        self.report = report
        self.last_report = time.monotonic()

    def update(self, line: dict) -> None:
        detail = line.get("progressDetail") or {}
        if line.get("status") == "Downloading" and detail.get("total"):
            self.layers[line.get("id", "")] = (detail.get("current", 0), detail["total"])
        elif line.get("status") in ("Download complete", "Pull complete") and line.get("id") in self.layers:
            total = self.layers[line["id"]][1]
            self.layers[line["id"]] = (total, total)
        now = time.monotonic()
        if now - self.last_report >= self.period_s:
            self.last_report = now
            self.report(self.summary())

    def summary(self) -> str:
        done = sum(current for current, _ in self.layers.values())
        total = sum(size for _, size in self.layers.values())
        if not total:
            return "pulling: waiting for layer sizes"
        return f"pulling: {format_bytes(done)} of {format_bytes(total)} ({100 * done / total:.0f}%) in {len(self.layers)} layers"


class Puller:
    def __init__(self, connect: Callable[[float], docker.APIClient], timings: Timings, mirrors: dict[str, list[str]],
                 operator_auth: dict[str, str]) -> None:
        self._connect = connect  # an Engine API client with the given read timeout
        self._timings = timings
        self._mirrors = mirrors
        self._operator_auth = operator_auth
        self._lock = threading.Lock()
        self._inflight: dict[str, tuple[Future, list[Callable[[str], None]]]] = {}

    def pull(self, image: str, *, auth: str | None, progress: Callable[[str], None]) -> None:
        """Pull `image`, joining a pull of the same image already under way. Raises PullError."""
        ref = resolve(image)
        key = str(ref)
        with self._lock:
            shared = self._inflight.get(key)
            if shared is None:
                future: Future = Future()
                listeners = [progress]
                self._inflight[key] = (future, listeners)
            else:
                future, listeners = shared
                listeners.append(progress)
        if shared is not None:
            progress("pulling: joined a pull of this image already under way")
            future.result()  # re-raises the leader's PullError
            return

        def report(message: str) -> None:
            for listener in list(listeners):
                listener(message)

        try:
            self._pull_with_retries(ref, auth, report)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _pull_with_retries(self, ref: ImageRef, auth: str | None, report: Callable[[str], None]) -> None:
        started = time.monotonic()
        delay = self._timings.pull_retry_delay_s
        for attempt in range(self._timings.pull_retries + 1):
            try:
                self._pull_from_mirrors(ref, auth, report, started)
                log.info("pulled %s in %.1f s", ref, time.monotonic() - started)
                return
            except PullError as exc:
                if exc.permanent or attempt == self._timings.pull_retries:
                    raise
                report(f"pulling: {exc}; retry {attempt + 1} of {self._timings.pull_retries} in {delay:.0f} s")
                time.sleep(delay)
                delay *= 2

    def _pull_from_mirrors(self, ref: ImageRef, auth: str | None, report: Callable[[str], None], started: float) -> None:
        for mirror in self._mirrors.get(ref.registry, []):
            try:
                self._pull_once(ref, mirror, auth, report, started)
                return
            except PullError as exc:
                log.warning("mirror %s failed for %s: %s; trying the next source", mirror, ref, exc)
        self._pull_once(ref, ref.registry, auth, report, started)

    def _pull_once(self, ref: ImageRef, registry: str, auth: str | None, report: Callable[[str], None], started: float) -> None:
        credentials = auth or self._operator_auth.get(registry)
        auth_config = decode_auth(credentials) if credentials else None
        source = ref.name(registry)
        stall_s = self._timings.pull_stall_timeout_s
        api = self._connect(stall_s)
        progress = _Progress(self._timings.pull_progress_period_s, report)
        report(f"pulling {source} ({ref.reference})")
        try:
            for line in _create_image(api, source, ref.reference, auth_config, stall_s):
                if "error" in line:
                    message = line.get("errorDetail", {}).get("message") or line["error"]
                    raise _pull_error(ref, registry, message)
                progress.update(line)
                if time.monotonic() - started > self._timings.pull_timeout_s:
                    raise PullError(f"{ref}: not pulled within {self._timings.pull_timeout_s:.0f} s (pull_timeout_s)",
                                    permanent=True)
            if registry != ref.registry:
                api.tag(f"{source}{'@' if ref.is_digest else ':'}{ref.reference}", ref.name(), None if ref.is_digest else ref.reference)
        except _EngineRefused as exc:
            raise _pull_error(ref, registry, exc.message, exc.status) from None
        except (ReadTimeout, ReadTimeoutError):
            raise PullError(f"{ref}: no progress for {stall_s:g} s (pull_stall_timeout_s)", permanent=False) from None
        except RequestsConnectionError as exc:
            if exc.args and isinstance(exc.args[0], ReadTimeoutError):  # requests' name for a read timeout mid-stream
                raise PullError(f"{ref}: no progress for {stall_s:g} s (pull_stall_timeout_s)", permanent=False) from None
            raise PullError(f"{ref}: {exc}", permanent=False) from None
        except DockerException as exc:
            raise PullError(f"{ref}: {exc}", permanent=False) from None
        finally:
            api.close()
        report(progress.summary().replace("pulling:", "pulled:"))


class _EngineRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _create_image(api: docker.APIClient, source: str, reference: str, auth_config: dict[str, str] | None,
                  read_timeout_s: float) -> Iterator[dict]:
    """The Engine API's image create, as the SDK's `pull` makes it, but with a read timeout."""
    registry, _ = docker.auth.resolve_repository_name(source)
    header = docker.auth.encode_header(auth_config) if auth_config else docker.auth.get_config_header(api, registry)
    response = api.post(f"{api.base_url}/v{api.api_version}/images/create", params={"fromImage": source, "tag": reference},
                        headers={"X-Registry-Auth": header} if header else {}, stream=True,
                        timeout=(read_timeout_s, read_timeout_s))
    with response:
        if response.status_code != 200:
            try:
                message = response.json().get("message") or response.text
            except (ValueError, requests.RequestException):
                message = response.text
            raise _EngineRefused(response.status_code, message.strip())
        for raw in response.iter_lines():
            if raw.strip():
                yield json.loads(raw)


def _pull_error(ref: ImageRef, registry: str, message: str, status: int | None = None) -> PullError:
    lowered = message.lower()
    hint = CREDENTIALS_HINT.format(registry=registry) if any(marker in lowered for marker in CREDENTIAL_MARKERS) else ""
    return PullError(f"{ref}: {message}{hint}", permanent=_is_permanent(message) or status in (401, 403, 404))
