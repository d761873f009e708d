"""One stress step's figures, from the generator's results and the service-side samples."""

from __future__ import annotations

import math
import statistics
from collections import Counter

from agent.stress.generator import Run, percentile


def spread_ms(values: list[float]) -> dict | None:
    """p50/p90/p99/max/mean of seconds, in milliseconds (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return {"p50": _ms(percentile(ordered, 0.5)), "p90": _ms(percentile(ordered, 0.9)), "p99": _ms(percentile(ordered, 0.99)),
            "max": _ms(ordered[-1]), "mean": _ms(statistics.fmean(ordered))}


def summarize(run: Run, kind: str, value: float, started_s: float, service: list[dict] | None, llm: bool) -> dict:
    """The step as report.json holds it. `started_s`: the step's start since the run's."""
    results = run.results
    wall = max(run.wall_s, 1e-9)
    answered = [r for r in results if r.ok]
    # Little's law over the step: the time-weighted average of requests in flight at the service.
    concurrency = sum(r.latency - r.lag for r in results) / wall
    statuses = Counter(str(r.status) for r in results if r.status)
    error_kinds = Counter(r.error for r in results if not r.ok and r.error)
    lags = [r.lag for r in results]
    scheduled_span = run.load.seconds if run.load.seconds is not None and not run.stopped else wall
    step = {
        "kind": kind, "value": value, "started_s": round(started_s, 3), "seconds": round(wall, 3),
        "offered_rate": round(len(results) / scheduled_span, 3) if run.load.open and scheduled_span else None,
        "achieved_rate": round(len(answered) / wall, 3), "concurrency": round(concurrency, 3),
        "requests": len(results), "ok": len(answered), "errors": len(results) - len(answered),
        "error_rate": round((len(results) - len(answered)) / len(results), 6) if results else 0.0,
        "statuses": dict(statuses), "error_kinds": dict(error_kinds.most_common(5)),
        "latency_ms": spread_ms([r.latency for r in answered]),
        "llm": _llm(answered, wall) if llm else None,
        "service": _service(service, len(answered) / wall, concurrency) if service is not None else None,
        "generator": {
            "workers": run.workers, "cpu_fraction": round(run.cpu_s / (wall * run.workers), 3),
            "cpu_ms_per_1000": round(run.cpu_s / len(results) * 1e6, 1) if results else None,
            "lag_p99_ms": _ms(percentile(lags, 0.99)) if lags else None, "lag_max_ms": _ms(max(lags)) if lags else None,
            "limit": run.generator_limit(),
        },
        "interrupted": run.stopped,
    }
    return step


def _llm(answered: list, wall: float) -> dict:
    tpot = [(r.latency - r.ttft) / (r.tokens - 1) for r in answered if r.ttft is not None and r.tokens > 1]
    tokens = sum(r.tokens for r in answered)
    prompts = [r.prompt_tokens for r in answered if r.prompt_tokens is not None]
    return {
        "ttft_ms": spread_ms([r.ttft for r in answered if r.ttft is not None]),
        "itl_ms": spread_ms([gap for r in answered for gap in (r.itl or ())]),
        "tpot_ms": spread_ms(tpot),
        "e2e_ms": spread_ms([r.latency for r in answered]),
        "output_tokens": tokens, "output_tokens_per_s": round(tokens / wall, 2),
        "prompt_tokens_mean": round(statistics.fmean(prompts), 1) if prompts else None,
    }


def _service(samples: list[dict], rate: float, concurrency: float) -> dict:
    """Averages of the agent's view over the step; per-instance figures over Ready instances."""
    if not samples:
        return {"samples": 0, "instances_ready_avg": None, "per_instance": None}
    ready = statistics.fmean(s["ready"] for s in samples)

    def mean_of(key: str) -> float | None:
        values = [sum(i[key] for i in s["instances"].values() if i.get(key) is not None) for s in samples
                  if any(i.get(key) is not None for i in s["instances"].values())]
        return round(statistics.fmean(values), 3) if values else None

    return {
        "samples": len(samples), "instances_ready_avg": round(ready, 3),
        "instances_ready_min": min(s["ready"] for s in samples), "instances_ready_max": max(s["ready"] for s in samples),
        "inflight_avg": mean_of("inflight"), "vllm_running_avg": mean_of("running"), "vllm_waiting_avg": mean_of("waiting"),
        "per_instance": {"rate": round(rate / ready, 3), "concurrency": round(concurrency / ready, 3)} if ready > 0 else None,
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3) if not math.isnan(seconds) else math.nan


def timeline(run: Run, started_s: float) -> list[dict]:
    """Per second of the step: requests due, answered and failed, in flight at mid-second, p99 (ms)."""
    import bisect

    if not run.results:
        return []
    starts = sorted(r.scheduled + r.lag for r in run.results)
    ends = sorted(r.scheduled + r.latency for r in run.results)
    buckets: dict[int, list] = {}
    for r in run.results:
        buckets.setdefault(int(r.scheduled), []).append(r)
    span = run.load.seconds if run.load.seconds is not None else max(r.scheduled for r in run.results)
    rows = []
    for second in range(max(1, math.ceil(span))):
        due = buckets.get(second, [])
        middle = second + 0.5
        answered = [r.latency for r in due if r.ok]
        rows.append({
            "t": round(started_s + second, 3), "due": len(due), "ok": len(answered), "errors": len(due) - len(answered),
            "inflight": bisect.bisect_right(starts, middle) - bisect.bisect_right(ends, middle),
            "p99_ms": _ms(percentile(answered, 0.99)) if answered else None,
        })
    return rows
