"""What the bootstrap is doing now: one state, the phases' timings, the requests in flight.

Everything that shows the bootstrap's progress (/ready, /status, /metrics, the status file
the agent reads, the log) reads this one object, so they never disagree.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("berth.boot")


class State(str, enum.Enum):
    STARTING = "STARTING"
    PREPARING = "PREPARING"
    LAUNCHING = "LAUNCHING"
    WARMING = "WARMING"
    READY = "READY"
    DRAINING = "DRAINING"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


class Inflight:
    """Requests in flight, with the time-weighted average that autoscalers should read.

    The average is the integral of the count over time divided by the window: a request that
    lasted 0.5 s of the last second counts 0.5, which a sampled gauge cannot tell.
    """

    def __init__(self) -> None:
        self.count = 0
        self._area = 0.0
        self._changed_at = self._window_start = time.monotonic()
        # The drain's wait for zero, made only when it waits: no event toggled per request.
        self._idle: asyncio.Future[None] | None = None

    def add(self, delta: int) -> None:
        now = time.monotonic()
        count = self.count
        self._area += count * (now - self._changed_at)
        self._changed_at = now
        self.count = count = count + delta
        if count == 0 and self._idle is not None:
            self._idle.set_result(None)
            self._idle = None

    def take_average(self) -> float:
        """The time-weighted average since the last call; starts a new window."""
        now = time.monotonic()
        area = self._area + self.count * (now - self._changed_at)
        span = now - self._window_start
        self._area, self._changed_at, self._window_start = 0.0, now, now
        return area / span if span > 0 else float(self.count)

    async def wait_idle(self) -> None:
        """Until no request is in flight (at once if none is)."""
        if self.count == 0:
            return
        if self._idle is None:
            self._idle = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._idle)  # a waiter cancelled (its deadline) leaves it for the others


class BootState:
    """The bootstrap's state, phase timings and last error; listeners hear every change."""

    def __init__(self, status_file: Path | None = None) -> None:
        self.state = State.STARTING
        self.started_at = time.time()
        self.phases: dict[str, float] = {}
        self.prepare_steps: dict[str, float] = {}
        self.warmup: list[dict[str, Any]] = []
        self.inflight = Inflight()
        self.queued = 0
        self.child_pid: int | None = None
        self.last_error: str | None = None
        self.exit_code: int | None = None
        self.live = True  # the spec's liveness_check verdict, when there is one
        self.ready_check_passing = True  # the spec's readiness_check verdict, once READY
        self.refusing = False  # draining, past the quiet period: new requests get 503
        self.ready_event = asyncio.Event()
        self._status_file = status_file
        self._listeners: list[Callable[[State], None]] = []

    @property
    def ready(self) -> bool:
        return self.state is State.READY and self.ready_check_passing

    @property
    def alive(self) -> bool:
        return self.state is not State.FAILED and self.live and (self.child_pid is not None or self.state.value in _NO_CHILD_YET)

    @property
    def failure_reason(self) -> str:
        """Why berth boot failed, in one line: `last_error`'s first (the child's output follows it)."""
        return (self.last_error or "").partition("\n")[0]

    def on_change(self, listener: Callable[[State], None]) -> None:
        self._listeners.append(listener)

    def set(self, state: State, error: str | None = None) -> None:
        if error is not None:
            self.last_error = error
        if state is self.state and error is None:
            return
        log.info("state %s -> %s", self.state.value, state.value)
        self.state = state
        if state is State.READY:
            self.ready_event.set()
        else:
            self.ready_event.clear()
        self.write_status_file()
        for listener in self._listeners:
            listener(state)

    def record_phase(self, name: str, seconds: float) -> None:
        self.phases[name] = round(seconds, 4)
        log.info("phase %s: done in %.2f s", name, seconds, extra={"fields": {"phase": name, "seconds": round(seconds, 4)}})

    def record_prepare_step(self, step: str, seconds: float) -> None:
        self.prepare_steps[step] = round(seconds, 4)
        self.write_status_file()

    def finish(self, exit_code: int) -> None:
        self.exit_code = exit_code
        self.write_status_file()

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "ready": self.ready,
            "live": self.alive,
            "phases": dict(self.phases),
            "prepare_steps": dict(self.prepare_steps),
            "warmup": list(self.warmup),
            "inflight": self.inflight.count,
            "queued": self.queued,
            "child_pid": self.child_pid,
            # berth boot never restarts its child (that is the agent's job): always 0 here.
            "restarts": 0,
            "last_error": self.last_error,
            "failure_reason": self.failure_reason,
            "exit_code": self.exit_code,
            "uptime_s": round(time.time() - self.started_at, 3),
        }

    def write_status_file(self) -> None:
        """Write the state JSON atomically (temp file + rename): a reader never sees half of it."""
        if self._status_file is None:
            return
        target = self._status_file
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            with os.fdopen(handle, "w") as out:
                json.dump(self.to_json_dict(), out)
            os.replace(temp, target)
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", target, exc)


# Before the child is launched, "no child" is not a failure.
_NO_CHILD_YET = {State.STARTING.value, State.PREPARING.value, State.LAUNCHING.value}
