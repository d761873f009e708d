"""The service-level objective a stress step must meet: `--slo "p99<=500ms,ttft_p99<=2s"`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from bootstrap.errors import UsageError

# The limit's name -> where its value is in a step's summary (milliseconds).
PLAIN = {"p50": ("latency_ms", "p50"), "p90": ("latency_ms", "p90"), "p99": ("latency_ms", "p99")}
LLM = {f"{metric}_{q}": ("llm", f"{metric}_ms", q) for metric in ("ttft", "itl", "e2e") for q in ("p50", "p90", "p99")}
UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
DEFAULT = "p99<=1s"
TERM = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|<)\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)\s*$")


@dataclass(frozen=True)
class Bound:
    name: str  # p99, ttft_p99, ...
    limit_ms: float
    strict: bool  # `<` rather than `<=`

    def holds(self, value_ms: float) -> bool:
        return value_ms < self.limit_ms if self.strict else value_ms <= self.limit_ms

    def describe(self) -> str:
        return f"{self.name} {'<' if self.strict else '<='} {format_ms(self.limit_ms)}"


def parse(text: str, openai: bool) -> list[Bound]:
    """`p99<=500ms,ttft_p99<=2s` -> bounds; errors name --slo and what is valid."""
    valid = sorted(PLAIN) + (sorted(LLM) if openai else [])
    bounds = []
    for term in filter(None, (part.strip() for part in text.split(","))):
        match = TERM.match(term.lower())
        if not match:
            raise UsageError(f"--slo {term!r}: write NAME<=VALUE with a unit (us, ms, s), e.g. \"p99<=500ms\"; "
                             f"names: {', '.join(valid)}")
        name, op, value, unit = match.groups()
        if name not in valid:
            hint = " (token timings need --openai or --sharegpt)" if name in LLM else ""
            raise UsageError(f"--slo {term!r}: unknown limit {name!r}{hint}; names: {', '.join(valid)}")
        bounds.append(Bound(name, float(value) * UNITS_MS[unit], op == "<"))
    if not bounds:
        raise UsageError(f"--slo {text!r}: give at least one limit, e.g. \"{DEFAULT}\"")
    return bounds


def value_ms(step: dict, name: str) -> float | None:
    """The step's value for a limit's name, in ms (None when the step has none)."""
    node = step
    for key in (PLAIN.get(name) or LLM[name]):
        node = (node or {}).get(key)
    return node


def broken(step: dict, bounds: list[Bound], max_errors: float) -> list[dict]:
    """The limits this step broke, errors first: [{"limit", "value", "bound"}]."""
    out = []
    if step["requests"] and step["error_rate"] > max_errors:
        out.append({"limit": "errors", "value": step["error_rate"], "bound": max_errors})
    for bound in bounds:
        value = value_ms(step, bound.name)
        if value is None or value != value:  # no answers at all: the errors limit says so
            continue
        if not bound.holds(value):
            out.append({"limit": bound.name, "value": value, "bound": bound.limit_ms})
    if not step["ok"] and not out:
        out.append({"limit": "errors", "value": step["error_rate"], "bound": max_errors})
    return out


def format_ms(ms: float) -> str:
    return f"{ms / 1000:g} s" if ms >= 1000 else f"{ms:g} ms"
