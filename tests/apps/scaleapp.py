"""A service for the autoscaling tests: a concurrency limit, CPU work and its own /metrics gauge.

    python -m tests.apps.scaleapp --port 8000 [--limit N]

GET /                 200 "ok"
GET /work?s=          holds one of `--limit` slots for s seconds (requests beyond the limit wait)
GET /burn?s=          spins the CPU for s seconds
GET /set?queue_depth= sets the `queue_depth` gauge of /metrics
GET /metrics          Prometheus text: queue_depth, app_requests_in_flight
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

gauges = {"queue_depth": 0.0, "app_requests_in_flight": 0}


async def root(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def work(request: web.Request) -> web.Response:
    async with request.app["slots"]:
        gauges["app_requests_in_flight"] += 1
        try:
            await asyncio.sleep(float(request.query.get("s", "0.5")))
        finally:
            gauges["app_requests_in_flight"] -= 1
    return web.Response(text="done")


async def burn(request: web.Request) -> web.Response:
    until = time.monotonic() + float(request.query.get("s", "0.2"))
    while time.monotonic() < until:
        sum(range(10_000))
    return web.Response(text="burnt")


async def set_gauge(request: web.Request) -> web.Response:
    gauges["queue_depth"] = float(request.query["queue_depth"])
    return web.Response(text="set")


async def metrics(_: web.Request) -> web.Response:
    lines = []
    for name, value in gauges.items():
        lines += [f"# HELP {name} the test app's {name}", f"# TYPE {name} gauge", f"{name} {value}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--limit", type=int, default=2)
    args = parser.parse_args()
    app = web.Application()
    app["slots"] = asyncio.Semaphore(args.limit)
    app.router.add_get("/", root)
    app.router.add_get("/work", work)
    app.router.add_get("/burn", burn)
    app.router.add_get("/set", set_gauge)
    app.router.add_get("/metrics", metrics)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
