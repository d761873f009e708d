"""Steady HTTP load over a service's current endpoints, as a client of the agent would send it.

The client learns where to send from the agent (`endpoints` of `GET /v1/services/{name}`: every
Ready instance, of either revision during a rollout), refreshes that list every 100 ms and
round-robins over it. Each request opens its own connection, so a connection an instance
closed while draining is never reused.
"""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit


@dataclass
class Outcome:
    at: float  # time.monotonic() when sent
    latency_s: float
    ok: bool
    detail: str  # the body (first 40 bytes) or the error


@dataclass
class SteadyLoad:
    endpoints: Callable[[], list[str]]
    path: str = "/"
    rate_per_s: float = 300
    workers: int = 6
    headers: dict[str, str] = field(default_factory=dict)
    refresh_s: float = 0.1
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._current: list[str] = self.endpoints()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._turn = itertools.count()

    def __enter__(self) -> "SteadyLoad":
        self._threads = [threading.Thread(target=self._refresh, daemon=True)]
        self._threads += [threading.Thread(target=self._send, daemon=True) for _ in range(self.workers)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                found = self.endpoints()
            except Exception:  # noqa: BLE001 - keep the last list when the agent is slow to answer
                continue
            if found:
                self._current = found

    def _send(self) -> None:
        interval = self.workers / self.rate_per_s
        next_at = time.monotonic()
        while not self._stop.is_set():
            endpoints = self._current
            url = urlsplit(endpoints[next(self._turn) % len(endpoints)])
            started = time.monotonic()
            try:
                connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
                connection.request("GET", self.path, headers={"Connection": "close", **self.headers})
                response = connection.getresponse()
                body = response.read()
                connection.close()
                outcome = Outcome(started, time.monotonic() - started, response.status == 200,
                                  body[:40].decode(errors="replace") if response.status == 200 else f"HTTP {response.status}")
            except OSError as exc:
                outcome = Outcome(started, time.monotonic() - started, False, f"{type(exc).__name__}: {exc}")
            self.outcomes.append(outcome)
            next_at = max(next_at + interval, time.monotonic() - interval)
            time.sleep(max(0.0, next_at - time.monotonic()))

    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if not outcome.ok]

    def between(self, start: float, end: float) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if start <= outcome.at < end]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")
