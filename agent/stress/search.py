"""The modes: which load each step gets, and when to stop.

- scan: from a start rate up by `growth` each step until a limit breaks (EAS's scan mode).
- rate / concurrency: fixed steps, in the order given.
- find: the highest rate (or concurrency) that meets the SLO: bracketed by doubling, narrowed by
  bisection, each verdict from two agreeing trials (AIPerf's search).

A probe runs one step and returns its summary with `slo.passed` and `slo.broken`; it raises
OutOfTime when `--duration` has no room for another step. The search keeps what it learned in
`best` (the highest passing step) and `failing` (the first failing one), so a search cut short
by Ctrl-C still has a verdict.
"""

from __future__ import annotations


from typing import Callable

Probe = Callable[[str, float], dict]


class OutOfTime(Exception):
    """--duration leaves no room for another step."""


class Search:
    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.best: dict | None = None
        self.failing: dict | None = None
        self.limit: str | None = None

    def _record(self, step: dict) -> bool:
        if step["slo"]["passed"]:
            if self.best is None or step["achieved_rate"] > self.best["achieved_rate"]:
                self.best = step
            return True
        if self.failing is None or _load(step) < _load(self.failing):
            self.failing = step
            self.limit = step["slo"]["broken"][0]["limit"]
        return False

    def scan(self, start: float, growth: float, max_rate: float) -> None:
        rate = min(start, max_rate)
        try:
            while True:
                if not self._record(self.probe("rate", rate)):
                    return
                if rate >= max_rate:
                    self.limit = "max_rate"
                    return
                rate = min(rate * growth, max_rate)
        except OutOfTime:
            self.limit = "duration"

    def fixed(self, kind: str, values: list[float]) -> None:
        try:
            for value in values:
                self._record(self.probe(kind, value))
        except OutOfTime:
            self.limit = self.limit or "duration"
            return
        self.limit = self.limit or "max_rate"

    def find(self, kind: str, start: float, maximum: float, precision: float) -> None:
        """Double from `start` until a verdict fails, then bisect until the bracket is narrow:
        within `precision` (relative) for a rate, 1 for a concurrency."""
        step_of = (lambda v: max(1, round(v))) if kind == "concurrency" else (lambda v: v)
        low, high = None, None
        value = step_of(min(start, maximum))
        try:
            while high is None:
                if self._verdict(kind, value):
                    low = value
                    if value >= maximum:
                        self.limit = "max_rate"
                        return
                    value = step_of(min(value * 2, maximum))
                else:
                    high = value
            while low is not None and not _narrow(kind, low, high, precision):
                middle = step_of((low + high) / 2)
                if middle in (low, high):
                    break
                if self._verdict(kind, middle):
                    low = middle
                else:
                    high = middle
        except OutOfTime:
            self.limit = self.limit or "duration"

    def _verdict(self, kind: str, value: float) -> bool:
        """Trials until two agree (at most three); the verdict's last agreeing trial stands for it."""
        trials: list[dict] = []
        while True:
            trials.append(self.probe(kind, value))
            for answer in (True, False):
                agreeing = [step for step in trials if step["slo"]["passed"] is answer]
                if len(agreeing) >= 2:
                    if answer:
                        self.best = agreeing[-1]
                    else:
                        self.failing, self.limit = agreeing[-1], agreeing[-1]["slo"]["broken"][0]["limit"]
                    return answer


def _narrow(kind: str, low: float, high: float, precision: float) -> bool:
    return high - low <= 1 if kind == "concurrency" else (high - low) / high <= precision


def _load(step: dict) -> float:
    """A step's place on the load axis: its offered rate (open loop) or its concurrency."""
    return step["offered_rate"] if step["offered_rate"] is not None else step["value"]



