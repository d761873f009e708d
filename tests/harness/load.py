"""Steady HTTP load over a service's current endpoints, as a client of the agent would send it.

The client learns where to send from the agent (`endpoints` of `GET /v1/services/{name}`: every
Ready instance, of either revision during a rollout), refreshes that list every 100 ms and
round-robins over it. Each request opens its own connection, so a connection an instance
closed while draining is never reused. The sending is berth's one load generator
(agent/stress/generator.py), in a thread of this process.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from agent.stress.generator import Generator, Load, Request, Result, percentile

__all__ = ["Outcome", "SteadyLoad", "percentile"]


@dataclass
class Outcome:
    at: float  # time.monotonic() when it was due
    latency_s: float
    ok: bool
    detail: str  # the body (first 40 bytes) or the error


@dataclass
class SteadyLoad:
    endpoints: Callable[[], list[str]]
    path: str = "/"
    rate_per_s: float = 300
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 10
    # Closed loop, each sender paced to its share of the rate, as a client of a service sends:
    # what this load checks is that no request fails during a rollout, not how a queue grows
    # (`berth stress` is for that). Open loop at a rate the starved 2-core box cannot always
    # serve piles connections into a draining instance's accept queue.
    senders: int = 6

    def __post_init__(self) -> None:
        request = Request(self.path, headers=tuple(self.headers.items()), expect_status=200)
        self._generator = Generator([request], self.endpoints, timeout=self.timeout_s, keep_alive=False)
        self._results: list[Result] = []
        self._started = 0.0
        self._thread = threading.Thread(target=self._send, daemon=True)

    def __enter__(self) -> "SteadyLoad":
        self._started = time.monotonic() + 0.05  # the generator starts its schedule 50 ms out
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._generator.stop()
        self._thread.join(timeout=30)
        self._generator.close()

    def _send(self) -> None:
        self._generator.run(Load(rate=self.rate_per_s, concurrency=self.senders), self._results)

    @property
    def outcomes(self) -> list[Outcome]:
        return [Outcome(self._started + r.scheduled, r.latency, r.ok,
                        r.head.decode(errors="replace") if r.ok else (r.error or f"HTTP {r.status}"))
                for r in list(self._results)]

    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if not outcome.ok]

    def between(self, start: float, end: float) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if start <= outcome.at < end]
