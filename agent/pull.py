"""Image pulls the way Nomad's Docker driver does them, and a little better.

- Names are resolved as Docker resolves them (`app` -> docker.io/library/app:latest).
- Operator mirrors of a registry are tried first; the image is then tagged with its own name.
- Concurrent pulls of one image share one pull (every waiter sees its progress and result).
- A pull that makes no progress for the stall timeout is aborted: the Engine API client's
  socket read timeout *is* the stall watchdog, since the engine streams a progress line for
  every chunk it receives. An overall timeout bounds the whole pull.
- Transient registry errors are retried with doubling delays; "not found" and "denied" are not.
- Credentials (a spec's `dockerAuth`, or the operator's per registry) never reach a log line.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import docker
import docker.auth
import docker.utils
from docker.errors import APIError, DockerException
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import ReadTimeout

from agent.config import Timings
from bootstrap.units import format_bytes

log = logging.getLogger("berth.agent.pull")

PERMANENT_MARKERS = ("not found", "manifest unknown", "unauthorized", "denied", "authentication required",
                     "invalid reference", "repository does not exist", "no such host")


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
        # The read timeout of this client is the stall watchdog (see the module's docstring).
        api = self._connect(self._timings.pull_stall_timeout_s)
        progress = _Progress(self._timings.pull_progress_period_s, report)
        report(f"pulling {source} ({ref.reference})")
        try:
            for line in api.pull(source, tag=ref.reference, stream=True, decode=True, auth_config=auth_config):
                if "error" in line:
                    message = line.get("errorDetail", {}).get("message") or line["error"]
                    raise PullError(f"{ref}: {message}", permanent=_is_permanent(message))
                progress.update(line)
                if time.monotonic() - started > self._timings.pull_timeout_s:
                    raise PullError(f"{ref}: not pulled within {self._timings.pull_timeout_s:.0f} s (pull_timeout_s)",
                                    permanent=True)
            if registry != ref.registry:
                api.tag(f"{source}{'@' if ref.is_digest else ':'}{ref.reference}", ref.name(), None if ref.is_digest else ref.reference)
        except ReadTimeout:
            raise PullError(f"{ref}: no progress for {self._timings.pull_stall_timeout_s:.0f} s (pull_stall_timeout_s)",
                            permanent=False) from None
        except APIError as exc:
            message = str(exc.explanation or exc)
            raise PullError(f"{ref}: {message}", permanent=_is_permanent(message) or exc.status_code in (401, 403, 404)) from None
        except (RequestsConnectionError, DockerException) as exc:
            raise PullError(f"{ref}: {exc}", permanent=False) from None
        finally:
            api.close()
        report(progress.summary().replace("pulling:", "pulled:"))
