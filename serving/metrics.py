"""The bootstrap's Prometheus metrics: what an autoscaler and an operator need.

`berth_inflight_requests_avg` is the time-weighted average of the in-flight count over the
last second: the concurrency that LLM autoscaling should use (a sampled gauge misses short
bursts and long requests alike). Child CPU and RSS are read with psutil at scrape time,
summed over the child's whole process tree (engines run workers).

The per-request series (requests by code, latency, time to first byte) are plain counts kept
by the event loop's one thread and turned into Prometheus families at scrape time: no lock,
label lookup or bucket scan per request (prometheus_client's Histogram.observe costs about
1.5 us, three of them per request; these cost about 0.2 us).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from typing import Callable

import psutil
from prometheus_client import CollectorRegistry, Enum, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from serving.state import BootState, State

# Buckets in seconds: sub-millisecond for the proxy's own cost, minutes for LLM streams.
disable_created_metrics()  # *_created series double the output and tell an autoscaler nothing

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, state: BootState) -> None:
        self.state = state
        self.registry = CollectorRegistry()
        r = self.registry
        self.inflight = Gauge("berth_inflight_requests", "Requests in flight through the proxy now", registry=r)
        self.inflight.set_function(lambda: state.inflight.count)
        self.inflight_avg = Gauge(
            "berth_inflight_requests_avg", "Time-weighted average of in-flight requests over the last second", registry=r
        )
        self.queue_depth = Gauge("berth_queue_depth", "Requests waiting for a concurrency slot", registry=r)
        self.queue_depth.set_function(lambda: state.queued)
        self.by_status: dict[int, int] = {}
        self.latency = LoopHistogram()  # berth_request_duration_seconds
        self.ttfb = LoopHistogram()  # berth_time_to_first_byte_seconds
        r.register(_RequestCollector(self))
        self.state_enum = Enum("berth_state", "The bootstrap's state", states=[s.value for s in State], registry=r)
        self.state_enum.state(state.state.value)
        state.on_change(lambda new: self.state_enum.state(new.value))
        self.phase = Gauge("berth_phase_duration_seconds", "How long each startup phase took", ["phase"], registry=r)
        self._child_pid: Callable[[], int | None] = lambda: state.child_pid
        r.register(_ChildCollector(self._child_pid))

    def count(self, status: int) -> None:
        """A request answered with `status` (berth's own answers are counted here too)."""
        self.by_status[status] = self.by_status.get(status, 0) + 1

    def observe(self, status: int, seconds: float, first_byte_seconds: float) -> None:
        """One request through the proxy: its code, duration and time to first byte."""
        self.by_status[status] = self.by_status.get(status, 0) + 1
        latency, ttfb = self.latency, self.ttfb  # LoopHistogram.observe, inlined: this runs per request
        latency.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency.sum += seconds
        ttfb.counts[bisect_left(LATENCY_BUCKETS, first_byte_seconds)] += 1
        ttfb.sum += first_byte_seconds

    def record_phase(self, name: str, seconds: float) -> None:
        self.phase.labels(name).set(seconds)

    async def sample_average(self, window: float = 1.0) -> None:
        """Every `window` seconds, publish the time-weighted in-flight average."""
        while True:
            await asyncio.sleep(window)
            self.inflight_avg.set(self.state.inflight.take_average())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoopHistogram:
    """A histogram observed from the event loop only: bucket counts in a list, no lock."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: over every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # Prometheus buckets are "less or equal"
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(bound, count of values at or under it) per bucket, +Inf last: what Prometheus exposes."""
        total, buckets = 0, []
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts):
            total += count
            buckets.append((bound, total))
        return buckets


class _RequestCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        requests = CounterMetricFamily("berth_requests", "Requests answered, by HTTP status code", labels=["code"])
        for status, count in sorted(self.metrics.by_status.items()):
            requests.add_metric([str(status)], count)
        yield requests
        latency, ttfb = self.metrics.latency, self.metrics.ttfb
        yield HistogramMetricFamily("berth_request_duration_seconds", "Time from request to the end of the response",
                                    buckets=latency.cumulative(), sum_value=latency.sum)
        yield HistogramMetricFamily("berth_time_to_first_byte_seconds", "Time from request to the response's first byte",
                                    buckets=ttfb.cumulative(), sum_value=ttfb.sum)


class _ChildCollector:
    """CPU seconds and resident memory of the child's process tree, read at scrape time."""

    def __init__(self, child_pid: Callable[[], int | None]) -> None:
        self._child_pid = child_pid

    def collect(self):
        cpu = CounterMetricFamily("berth_child_cpu_seconds", "CPU time used by the child's process tree")
        rss = GaugeMetricFamily("berth_child_rss_bytes", "Resident memory of the child's process tree")
        pid = self._child_pid()
        if pid is not None:
            total_cpu, total_rss = 0.0, 0
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        times = proc.cpu_times()
                        total_cpu += times.user + times.system
                        total_rss += proc.memory_info().rss
                    except psutil.Error:
                        continue
                cpu.add_metric([], total_cpu)
                rss.add_metric([], total_rss)
            except psutil.Error:
                pass
        yield cpu
        yield rss
