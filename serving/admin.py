"""The admin port (9090): /ready, /live, /status, /metrics.

/ready is what load balancers and the agent ask: 200 only in READY (and while the spec's
readiness_check passes). /live is 200 unless the bootstrap FAILED, the child is gone, or the
spec's liveness_check fails. Both answer at once from the start, so a probe during a long
prepare gets an honest 503, not a refused connection.
"""

from __future__ import annotations

import json

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from serving.engine import Engine
from serving.metrics import Metrics
from serving.state import BootState


def admin_app(state: BootState, metrics: Metrics, engine: Engine, app_port: int) -> web.Application:
    async def ready(_: web.Request) -> web.Response:
        return _verdict(state.ready, state)

    async def live(_: web.Request) -> web.Response:
        return _verdict(state.alive, state)

    async def status(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(state.to_json_dict(), indent=2) + "\n", content_type="application/json")

    async def prometheus(_: web.Request) -> web.Response:
        body = metrics.render()
        extra = await engine.metrics_text(app_port)
        if extra:
            body += extra.encode() if extra.endswith("\n") else (extra + "\n").encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/live", live)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", prometheus)
    return app


def _verdict(ok: bool, state: BootState) -> web.Response:
    return web.Response(status=200 if ok else 503, text=f"{state.state.value}\n")


async def start_admin(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner
